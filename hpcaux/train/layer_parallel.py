"""Layer-parallel training with an auxiliary-variable network (docs/design.md §1–§2).

Rank r owns stage r mod K of replica r div K. Every step, each rank
  1. runs the AuxNet heads it needs (A_{k-1}(x) as its input, A_k(x) as its target),
     or reads the stored z of the batch (aux_source: stored);
  2. runs forward and backward of its own stage term (hpcaux.train.losses.stage_term);
  3. back-propagates the input/target gradients into the AuxNet (a separate backward,
     so its cost is measured on its own);
  4. joins ONE allreduce: AuxNet gradients summed over stages and averaged over
     replicas, AuxNet BatchNorm buffers averaged (stored mode: the z gradients of the
     batch, summed over the replica's stages) — plus, when D > 1, the stage-gradient
     average over the stage's process set.
No activation crosses ranks during training. Evaluation is always the true composition,
run across the ranks by hpcaux.train.composed. Per-sample state (stored z, AL
multipliers) lives in RUN/aux.h5 (hpcaux.train.lp_store) and is read and written batch by
batch; checkpoints every `ckpt.every` epochs make a run resumable (lp_checkpoint).
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import torch

from hpcaux.data.sets import load_data
from hpcaux.errors import UserError
from hpcaux.models import build_model
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.blocks import ClassifierHead
from hpcaux.models.partition import boundary_shapes, choose_cuts, make_stages
from hpcaux.store.aux_store import open_store_for_run
from hpcaux.train.composed import StageChain
from hpcaux.train.layout import Layout
from hpcaux.train.losses import al_update, relative_gap, stage_term
from hpcaux.train.lp_checkpoint import (read_resume_manifest, restore_finetune_optimizer, restore_trainer,
                                        save_trainer)
from hpcaux.train.lp_store import RunStore, SampleStats, lambda_name, z_name
from hpcaux.train.progress import Progress
from hpcaux.train.rundir import MetricsLog, write_json
from hpcaux.train.runtime import peak_memory_mb, seed_everything
from hpcaux.train.schedules import learning_rate, rho_at_epoch, set_lr
from hpcaux.train.serial import make_optimizer
from hpcaux.train.stop_request import StopRequest

TIMERS = ("aux_s", "stage_s", "comm_s", "step_s")


def aux_buffers(auxnet) -> list[torch.Tensor]:
    """Floating-point BatchNorm buffers (running mean/var), averaged with the weights."""
    return [b for b in auxnet.buffers() if b.is_floating_point()]


def build_local_head(shapes, stage: int, num_classes: int, seed: int) -> ClassifierHead:
    """Stage `stage`'s local classifier, seeded by (seed, stage) alone so any process can rebuild it."""
    torch.manual_seed(seed + 2 + stage)
    return ClassifierHead(shapes[stage][0], num_classes)


def agree_on_cuts(cfg, comm, model, data, device) -> list[int]:
    """The configured cut points, or balanced ones chosen on rank 0 (timings differ per
    rank) and sent to all."""
    if cfg.parallel.cuts:
        if cfg.parallel.cuts[-1] >= len(model):
            raise UserError(f"config key 'parallel.cuts' {cfg.parallel.cuts} is beyond the model's {len(model)} blocks")
        return list(cfg.parallel.cuts)
    cuts = None
    if comm.rank == 0:
        sample = data.normalized_train(torch.arange(min(32, data.n_train)), device)
        cuts = choose_cuts(model, cfg.parallel.K, cfg.parallel.balance, sample)
    return comm.broadcast_object(cuts, root=0)


def build_auxnet(cfg, shapes, image_shape) -> AuxNet:
    """The AuxNet, seeded by the run seed alone: every rank builds the same replica."""
    torch.manual_seed(cfg.seed + 1)
    return AuxNet(shapes, cfg.auxnet.width, cfg.auxnet.depth, image_shape[0], image_shape[-1])


class StoppedBySignal(Exception):
    """Raised on every rank, after the checkpoint is committed, when a stop was agreed."""


class LayerParallelTrainer:
    def __init__(self, cfg, run_dir: Path, comm, device: torch.device, resume: bool = False,
                 stop: StopRequest | None = None, create_run=None):
        """Every start-up check runs before `create_run()` (rank 0) writes the run directory."""
        self.cfg, self.run_dir, self.comm, self.device, self.stop = cfg, run_dir, comm, device, stop
        K = cfg.parallel.K
        if K < 2:
            raise UserError("config key 'parallel.K' must be >= 2 for method: layer_parallel")
        self.layout = Layout.for_world(K, cfg.parallel.D, comm.rank, comm.size)
        D = self.layout.D
        if cfg.lp.aux_source == "stored" and D > 1:
            raise UserError("config key 'lp.aux_source' stored needs parallel.D=1 (each replica would update different z)")
        if cfg.lp.multipliers == "per_sample" and D > 1 and cfg.store.mode == "per_rank":
            raise UserError("config key 'lp.multipliers' per_sample with parallel.D > 1 needs store.mode mpio "
                            "(the replicas of a stage share one multiplier array)")
        s = self.layout.stage
        comm.watchdog.context.update(stage=s, replica=self.layout.replica)
        self.resume_from, manifest = comm.agree(lambda: read_resume_manifest(run_dir, K), "the checkpoint") \
            if resume else (None, None)
        self.data = comm.agree(lambda: load_data(cfg.data, cfg.seed), "the data set")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model.arch, self.data.num_classes).to(device)
        self.cuts = manifest["cuts"] if manifest else agree_on_cuts(cfg, comm, model, self.data, device)
        stages = make_stages(model, self.cuts, boundary_norm=True)
        self.shapes = boundary_shapes(stages, self.data.image_shape, device)
        self.stage = stages[s]
        self.local_head = None
        if s < K - 1 and cfg.lp.local_cls_weight > 0:
            self.local_head = build_local_head(self.shapes, s, self.data.num_classes, cfg.seed).to(device)
        self.auxnet = build_auxnet(cfg, self.shapes, self.data.image_shape).to(device) if cfg.lp.aux_source == "auxnet" else None
        # Process sets, created by every rank in the same order (Horovod and gloo need that).
        stage_groups = [comm.new_group(self.layout.stage_ranks(k)) for k in range(K)]
        self.stage_group = stage_groups[s]
        self.replica_group = [comm.new_group(self.layout.replica_ranks(r)) for r in range(D)][self.layout.replica]
        self.stage_params = list(self.stage.parameters()) + (list(self.local_head.parameters()) if self.local_head else [])
        self.stage_opt = make_optimizer(self.stage_params, cfg.optim)
        self.aux_opt = make_optimizer(self.auxnet.parameters(), cfg.optim) if self.auxnet else None
        self.in_boundary = s - 1 if s > 0 else None
        self.out_boundary = s if s < K - 1 else None
        self.has_multipliers = cfg.lp.multipliers == "per_sample" and self.out_boundary is not None
        if self.resume_from is not None:  # before the store is opened: a bad checkpoint touches nothing
            comm.agree(lambda: restore_trainer(self, self.resume_from), "restoring the checkpoint")
        if create_run is not None:
            comm.agree(lambda: create_run() if comm.rank == 0 else None, "creating the run directory")
        self.store = comm.agree(lambda: open_store_for_run(run_dir, comm, cfg.store.mode), "the HDF5 store")
        self.run_store = comm.agree(lambda: RunStore(self.store, cfg, self.layout, self.shapes, self.data.n_train),
                                    "the HDF5 store layout")
        if cfg.lp.aux_source == "stored" and not resume:
            self._init_stored_z(stages)
        self.chain = StageChain(comm, self.layout, self.stage, self.shapes, device)
        self.steps = self.data.steps_per_epoch(cfg.train.batch_size, D)
        self.allreduce_values = 0
        self.start_epoch = manifest["epoch"] if manifest else 0
        # A checkpoint taken on a signal sits inside an epoch: skip the steps it already made.
        self.start_step_in_epoch = manifest.get("step_in_epoch", 0) if manifest else 0
        self.stop_votes = torch.zeros(1, device=device)
        self.epoch_stats = {"multiplier": SampleStats(), "z": SampleStats()}

    # --- set-up ------------------------------------------------------------------------
    @torch.no_grad()
    def _init_stored_z(self, stages):
        """z_k of every training sample, from a forward pass of the initial composed network.

        Every rank holds the whole initial model (same seed), so ranks k and k+1 compute
        the same z_k without communicating; they write it to the store (its owner only,
        in mpio mode).
        """
        wanted = [b for b in (self.in_boundary, self.out_boundary) if b is not None]
        for st in stages:
            st.eval()
        batch = self.cfg.train.eval_batch_size
        for start in range(0, self.data.n_train, batch):
            idx = torch.arange(start, min(start + batch, self.data.n_train))
            h = self.data.normalized_train(idx, self.device)
            for b in range(max(wanted) + 1):
                h = stages[b](h)
                if b in wanted:
                    self.store.fill_rows(z_name(b), start, h)
        for st in stages:
            st.train()
        self.store.flush(self.comm.barrier)

    # --- one step ----------------------------------------------------------------------
    def _inputs(self, x, idx):
        """(stage input, target, AuxNet outputs to back-propagate into) for a batch."""
        if self.auxnet is None:
            def stored(b):
                return self.store.read_rows(z_name(b), idx).to(self.device).requires_grad_()
            inp = x if self.in_boundary is None else stored(self.in_boundary)
            target = None if self.out_boundary is None else stored(self.out_boundary)
            return inp, target, {}
        wanted = [b for b in (self.in_boundary, self.out_boundary) if b is not None]
        preds = self.auxnet(x, wanted)
        inp = x if self.in_boundary is None else preds[self.in_boundary].detach().requires_grad_()
        target = None if self.out_boundary is None else preds[self.out_boundary].detach().requires_grad_()
        return inp, target, preds

    def compute_gradients(self, x, y, idx, rho: float):
        """Forward, backward and the step's communication; leaves synchronised .grad.

        Returns (stage term, this rank's stage output, target, multiplier, timings).
        """
        t0 = time.perf_counter()
        inp, target, preds = self._inputs(x, idx)
        t1 = time.perf_counter()
        multiplier = self.store.read_rows(lambda_name(self.out_boundary), idx).to(self.device) \
            if self.has_multipliers else None
        out = self.stage(inp)
        term = stage_term(out, target, y, is_last=self.layout.is_last, rho=rho, multiplier=multiplier,
                          local_head=self.local_head, local_weight=self.cfg.lp.local_cls_weight)
        self.stage_opt.zero_grad(set_to_none=True)
        term.loss.backward()
        t2 = time.perf_counter()
        if self.auxnet is not None:
            self.aux_opt.zero_grad(set_to_none=True)
            pairs = [(preds[b], t.grad) for b, t in ((self.in_boundary, inp), (self.out_boundary, target)) if b is not None]
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        t3 = time.perf_counter()
        self._synchronise(inp, target, idx)
        t4 = time.perf_counter()
        timer = {"aux_s": (t1 - t0) + (t3 - t2), "stage_s": t2 - t1, "comm_s": t4 - t3}
        return term, out.detach(), target, multiplier, timer

    def train_step(self, x, y, idx, rho: float) -> dict:
        t0 = time.perf_counter()
        term, out, target, multiplier, timer = self.compute_gradients(x, y, idx, rho)
        t1 = time.perf_counter()
        self.stage_opt.step()
        if self.aux_opt:
            self.aux_opt.step()
        if self.has_multipliers:
            updated = al_update(multiplier, term.residual, rho)
            self.store.write_rows(lambda_name(self.out_boundary), idx, updated)
            self.epoch_stats["multiplier"].add(updated)
        t2 = time.perf_counter()
        timer["stage_s"] += t2 - t1
        timer["step_s"] = t2 - t0
        gap = relative_gap(out, target.detach()) if target is not None else (0.0, 0.0)
        return {"loss": term.loss.item(), **term.parts, "gap_num": gap[0], "gap_den": gap[1], **timer,
                "stop": self.stop_votes.item() > 0}

    def _cast_stop_vote(self) -> torch.Tensor:
        """This rank's stop vote, to ride in a world allreduce (a sum > 0 means stop)."""
        return self.stop_votes.fill_(self.stop.vote() if self.stop else 0.0)

    def _stop_agreed_alone(self) -> bool:
        """The stop vote in an allreduce of its own (the fine-tune has no world allreduce)."""
        self.comm.allreduce([self._cast_stop_vote()], op="sum", what="allreduce stop votes")
        return self.stop_votes.item() > 0

    def _stop_now(self, epoch: int, step_in_epoch: int, phase: str, finetune_opt=None):
        """Checkpoint inside epoch `epoch + 1` after `step_in_epoch` steps, then unwind."""
        step = epoch * self.steps + step_in_epoch
        self.save(f"stop_step_{step}", epoch, phase, finetune_opt, step_in_epoch=step_in_epoch)
        raise StoppedBySignal(step)

    def _synchronise(self, inp, target, idx):
        """The step's communication: one world allreduce, plus the stage-replica average."""
        D, size = self.layout.D, self.comm.size
        if self.auxnet is not None:
            for p in self.auxnet.parameters():
                if p.grad is None:  # heads this rank did not use
                    p.grad = torch.zeros_like(p)
                p.grad.div_(D)
            buffers = aux_buffers(self.auxnet)
            for b in buffers:
                b.div_(size)
            grads = [p.grad for p in self.auxnet.parameters()]
            self.comm.allreduce(grads + buffers + [self._cast_stop_vote()], op="sum",
                                what="allreduce AuxNet gradients")
            self.allreduce_values = sum(t.numel() for t in grads + buffers)
        else:
            self._synchronise_stored_z(inp, target, idx)
        if D > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.stage_params]
            self.comm.allreduce(grads, op="mean", group=self.stage_group, what="allreduce stage gradients")
            for p, g in zip(self.stage_params, grads):
                p.grad = g

    def _synchronise_stored_z(self, inp, target, idx):
        """Sum each boundary's z gradient over the two stages that see it, then step z.

        The step is preconditioned by batch size x elements, undoing the means of the
        loss, so the penalty alone moves z by z_lr * (rho * residual + lambda).
        """
        batch = len(idx)
        grads = [torch.zeros(batch, *shape, device=self.device) for shape in self.shapes]
        if self.in_boundary is not None:
            grads[self.in_boundary] += inp.grad
        if self.out_boundary is not None:
            grads[self.out_boundary] += target.grad
        # D = 1 in stored mode, so the replica group is the world and carries the stop vote.
        self.comm.allreduce(grads + [self._cast_stop_vote()], op="sum", group=self.replica_group,
                            what="allreduce stored-z gradients")
        self.allreduce_values = sum(g.numel() for g in grads)
        for b, t in ((self.in_boundary, inp), (self.out_boundary, target)):
            if b is None:
                continue
            scale = self.cfg.lp.z_lr * batch * math.prod(self.shapes[b])
            updated = t.detach() - scale * grads[b]
            self.store.write_rows(z_name(b), idx, updated)
            if b == self.out_boundary:
                self.epoch_stats["z"].add(updated)

    # --- per-epoch measurements ---------------------------------------------------------
    def _eval_batches(self, subset):
        return self.data.test_batches(self.cfg.train.eval_batch_size, device=self.device, subset=subset,
                                      seed=self.cfg.seed, shard=self.layout.replica, shards=self.layout.D)

    @torch.no_grad()
    def held_out_metrics(self, subset: int) -> dict:
        """Composed accuracy, and (AuxNet mode) AuxNet-path accuracy and relative gaps."""
        K = self.layout.K
        correct, total = self.chain.correct_count(self._eval_batches(subset))
        stats = torch.zeros(2 * (K - 1) + 4, dtype=torch.float64)
        stats[-2:] = torch.tensor([correct, total], dtype=torch.float64)
        if self.auxnet is not None:
            modules = [m for m in (self.auxnet, self.stage, self.local_head) if m is not None]
            modes = [m.training for m in modules]
            for m in modules:
                m.eval()
            for x, y in self._eval_batches(subset):
                inp, target, _ = self._inputs(x, None)
                out = self.stage(inp)
                if target is not None:
                    num, den = relative_gap(out, target)
                    stats[2 * self.out_boundary] += num
                    stats[2 * self.out_boundary + 1] += den
                else:
                    stats[-4] += (out.argmax(1) == y).sum().item()
                    stats[-3] += len(y)
            for m, mode in zip(modules, modes):
                m.train(mode)
        # Each replica measured its own shard of the held-out set: the sum counts each image once.
        self.comm.allreduce([stats], op="sum", what="allreduce held-out metrics")
        result = {"composed_acc": (stats[-2] / stats[-1]).item()}
        if self.auxnet is not None:
            result["auxnet_path_acc"] = (stats[-4] / stats[-3]).item()
            result["rel_gap"] = [(stats[2 * k] / stats[2 * k + 1]).item() for k in range(K - 1)]
        return result

    # --- the run -----------------------------------------------------------------------
    def _batches(self, epoch, augment):
        return self.data.train_batches(self.cfg.train.batch_size, seed=self.cfg.seed, epoch=epoch, augment=augment,
                                       device=self.device, replica=self.layout.replica, replicas=self.layout.D)

    def _probe_outputs(self) -> dict:
        """AuxNet head outputs on the fixed probe images, for the heads this rank owns."""
        if self.auxnet is None or self.layout.replica != 0 or self.out_boundary is None or not self.cfg.store.probe_size:
            return {}
        probe = next(self.data.test_batches(self.cfg.store.probe_size, device=self.device,
                                            subset=self.cfg.store.probe_size, seed=self.cfg.seed))[0]
        self.auxnet.eval()
        with torch.no_grad():
            out = self.auxnet(probe, [self.out_boundary])
        self.auxnet.train()
        return {b: v.cpu().numpy() for b, v in out.items()}

    def _end_of_epoch(self, epoch: int, record: dict, log, progress, last_epoch: int, finetune_opt=None):
        """Log the epoch, record it in aux.h5, and checkpoint when due (all ranks).

        Either way the store ends flushed (save() flushes it), so its writes are visible
        to the other ranks in the next epoch.
        """
        if self.comm.rank == 0:
            log.append(record)
            progress.note(self._epoch_line(record))
        self.run_store.record_epoch(epoch - 1, record)
        if record["phase"] == "layer_parallel" and self.auxnet is not None and self.cfg.store.probe_size:
            self.run_store.record_snapshots(epoch, self._probe_outputs())
        every = self.cfg.ckpt.every
        if epoch == last_epoch or (every > 0 and epoch % every == 0):
            self.save(f"epoch_{epoch}", epoch, record["phase"], finetune_opt)
        else:
            self.store.flush(self.comm.barrier)

    def _epoch_batches(self, epoch: int, augment: bool):
        """The epoch's batches; a resume inside this epoch skips those already trained on
        (drawn and dropped, so the augmentation draws stay those of an uninterrupted run)."""
        batches = self._batches(epoch, augment)
        if epoch == self.start_epoch and self.start_step_in_epoch:
            return itertools.islice(batches, self.start_step_in_epoch, None)
        return batches

    def run(self, max_epochs: int | None = None) -> dict:
        """Train from the start (or the resumed checkpoint) to the end, or for `max_epochs`
        epochs of this invocation — then checkpoint, so `--resume` continues the same
        schedule. A stop signal checkpoints after the current step instead."""
        try:
            return self._run(max_epochs)
        except StoppedBySignal as stopped:
            self.store.close(self.comm.barrier)
            return {"stopped_by_signal": self.stop.signal_name if self.stop and self.stop.requested else "peer",
                    "stopped_after_step": stopped.args[0]}

    def _run(self, max_epochs: int | None) -> dict:
        cfg, lay = self.cfg, self.layout
        is_root = self.comm.rank == 0
        log = MetricsLog(self.run_dir, fresh=self.resume_from is None) if is_root else None
        epochs, ft_epochs = cfg.train.epochs, cfg.lp.finetune_epochs
        last_epoch = epochs + ft_epochs
        if max_epochs:
            last_epoch = min(last_epoch, self.start_epoch + max_epochs)
        progress = Progress(self.steps * (last_epoch - self.start_epoch), cfg.train.progress, self.comm.rank)
        if self.resume_from is not None:
            within = f", step {self.start_step_in_epoch} of epoch {self.start_epoch + 1}" if self.start_step_in_epoch else ""
            progress.note(f"resumed from {self.resume_from} after epoch {self.start_epoch}{within}")
        augment = cfg.data.augment and cfg.lp.aux_source == "auxnet"
        # Every epoch has self.steps steps, so the step count (which the lr schedule
        # follows) is derived from the epoch, also when a resume changes D.
        started, train_time = time.perf_counter(), 0.0
        step = self.start_epoch * self.steps + (self.start_step_in_epoch if self.start_epoch < epochs else 0)
        total_steps = self.steps * epochs
        timers, steps_here = {k: 0.0 for k in TIMERS}, 0
        for epoch in range(self.start_epoch, min(epochs, last_epoch)):
            rho = rho_at_epoch(cfg.lp, epoch)
            epoch_start = time.perf_counter()
            sums = {"loss": 0.0, "gap_num": 0.0, "gap_den": 0.0}
            self.epoch_stats = {"multiplier": SampleStats(), "z": SampleStats()}
            done, stop_voted = 0, False
            for x, y, idx in self._epoch_batches(epoch, augment):
                lr = learning_rate(cfg.optim, step, total_steps, self.steps)
                set_lr(self.stage_opt, lr)
                if self.aux_opt:
                    set_lr(self.aux_opt, lr)
                self.comm.watchdog.context["step"] = step
                out = self.train_step(x, y, idx, rho)
                step += 1
                steps_here += 1
                done += 1
                for k in sums:
                    sums[k] += out[k]
                for k in TIMERS:
                    timers[k] += out[k]
                progress.update(f"ep {epoch + 1} stage {lay.stage + 1} loss {out['loss']:.3f}")
                stop_voted = out["stop"]
                if stop_voted and step - epoch * self.steps < self.steps:
                    self._stop_now(epoch, step - epoch * self.steps, "layer_parallel")
            epoch_s = time.perf_counter() - epoch_start
            train_time += epoch_s
            metrics = self.held_out_metrics(cfg.data.eval_subset)
            mult, zs = self.epoch_stats["multiplier"], self.epoch_stats["z"]
            per_rank = self.comm.gather_table([sums["loss"] / done, sums["gap_num"] / max(sums["gap_den"], 1e-12),
                                             *(timers[k] / steps_here for k in TIMERS),
                                             mult.rms(), zs.mean(), zs.std()])
            owners = per_rank[:lay.K - 1]  # stage k of replica 0 owns boundary k
            record = {"epoch": epoch + 1, "phase": "layer_parallel", "rho": rho, "lr": lr,
                      "stage_loss": per_rank[:lay.K, 0].tolist(), "train_rel_gap": owners[:, 1].tolist(),
                      **metrics,
                      "step_ms": (per_rank[:, 5] * 1e3).tolist(), "aux_ms": (per_rank[:, 2] * 1e3).tolist(),
                      "comm_ms": (per_rank[:, 4] * 1e3).tolist(),
                      "multiplier_rms": owners[:, 6].tolist() if cfg.lp.multipliers == "per_sample" else None,
                      "z_mean": owners[:, 7].tolist() if cfg.lp.aux_source == "stored" else None,
                      "z_std": owners[:, 8].tolist() if cfg.lp.aux_source == "stored" else None,
                      "allreduce_values": self.allreduce_values,
                      "samples_per_s": done * cfg.train.batch_size * lay.D / epoch_s, "epoch_s": epoch_s}
            self._end_of_epoch(epoch + 1, record, log, progress, last_epoch)
            if stop_voted and epoch + 1 < last_epoch:  # voted on the epoch's last step
                self._stop_now(epoch + 1, 0, "layer_parallel")
        ft_time = self._finetune(progress, log, last_epoch) if last_epoch > epochs else 0.0
        progress.close()
        if last_epoch < epochs + ft_epochs:
            self.store.close(self.comm.barrier)
            return {"stopped_after_epoch": last_epoch}
        final = self.held_out_metrics(cfg.data.test_subset)
        self.save("final", last_epoch, "done")
        self.store.close(self.comm.barrier)
        per_rank = self.comm.gather_table([timers[k] / max(steps_here, 1) for k in TIMERS] + [peak_memory_mb(self.device)])
        summary = {"method": "layer_parallel", "model": cfg.model.arch, "dataset": cfg.data.dataset,
                   "K": lay.K, "D": lay.D, "cuts": self.cuts, "loss": cfg.lp.loss, "aux_source": cfg.lp.aux_source,
                   "epochs": epochs, "finetune_epochs": ft_epochs, "train_samples": self.data.n_train,
                   "test_acc": final["composed_acc"], "auxnet_path_acc": final.get("auxnet_path_acc"),
                   "final_rel_gap": final.get("rel_gap"),
                   "wall_s": time.perf_counter() - started, "train_s": train_time, "finetune_s": ft_time,
                   "train_samples_per_s": steps_here * cfg.train.batch_size * lay.D / train_time if train_time else None,
                   "step_ms_per_rank": (per_rank[:, 3] * 1e3).tolist(),
                   "aux_ms_per_rank": (per_rank[:, 0] * 1e3).tolist(),
                   "stage_ms_per_rank": (per_rank[:, 1] * 1e3).tolist(),
                   "comm_ms_per_rank": (per_rank[:, 2] * 1e3).tolist(),
                   "aux_fraction_of_stage": (per_rank[:, 0] / per_rank[:, 1].clamp(min=1e-12)).max().item(),
                   "peak_mem_mb_per_rank": per_rank[:, 4].tolist(),
                   "allreduce_values_per_step": self.allreduce_values,
                   "threads": torch.get_num_threads(), "backend": self.comm.name, "store_mode": self.store.mode}
        if is_root:
            write_json(self.run_dir / "summary.json", summary)
        return summary

    @staticmethod
    def _epoch_line(r: dict) -> str:
        gaps = " ".join(f"{g:.4f}" for g in r.get("rel_gap", r.get("train_rel_gap", [])))
        aux = f" auxnet-path {r['auxnet_path_acc']:.3f}" if "auxnet_path_acc" in r else ""
        steps = "/".join(f"{t:.0f}" for t in r["step_ms"])
        return (f"epoch {r['epoch']} [{r['phase']}]: loss {'/'.join(f'{v:.3f}' for v in r['stage_loss'])} "
                f"composed {r['composed_acc']:.3f}{aux} gap {gaps} rho {r.get('rho', 0):.2f} "
                f"step ms {steps} ({r['samples_per_s']:.0f} samples/s)")

    def _finetune(self, progress, log, last_epoch: int) -> float:
        """Serial-parallel hybrid: end-to-end backprop of the composed network over send/recv."""
        cfg, lay = self.cfg, self.layout
        optimizer = make_optimizer(list(self.stage.parameters()), cfg.optim, lr=cfg.lp.finetune_lr)
        if self.resume_from is not None and self.start_epoch >= cfg.train.epochs:
            self.comm.agree(lambda: restore_finetune_optimizer(self, self.resume_from, optimizer),
                            "restoring the checkpoint")
        total = self.steps * cfg.lp.finetune_epochs
        first = max(self.start_epoch, cfg.train.epochs)
        step = (first - cfg.train.epochs) * self.steps + (self.start_step_in_epoch if first == self.start_epoch else 0)
        elapsed = 0.0
        for epoch in range(first, last_epoch):
            start, loss_sum, done, stop_voted = time.perf_counter(), 0.0, 0, False
            for x, y, _ in self._epoch_batches(epoch, cfg.data.augment):
                set_lr(optimizer, learning_rate(cfg.optim, step, total, self.steps, base_lr=cfg.lp.finetune_lr))
                self.comm.watchdog.context["step"] = f"finetune {step}"
                optimizer.zero_grad(set_to_none=True)
                loss = self.chain.backprop_step(x, y)
                if lay.D > 1:
                    grads = [p.grad for p in self.stage.parameters()]
                    self.comm.allreduce(grads, op="mean", group=self.stage_group, what="allreduce stage gradients")
                optimizer.step()
                loss_sum += loss or 0.0
                step += 1
                done += 1
                progress.update(f"finetune {epoch + 1 - cfg.train.epochs}")
                step_in_epoch = step - (epoch - cfg.train.epochs) * self.steps
                stop_voted = self._stop_agreed_alone()
                if stop_voted and step_in_epoch < self.steps:
                    self._stop_now(epoch, step_in_epoch, "finetune", optimizer)
            epoch_s = time.perf_counter() - start
            elapsed += epoch_s
            metrics = self.held_out_metrics(self.cfg.data.eval_subset)
            losses = self.comm.gather_table([loss_sum / done])
            record = {"epoch": epoch + 1, "phase": "finetune", "stage_loss": [0.0] * (lay.K - 1) + [losses[lay.K - 1, 0].item()],
                      **metrics, "step_ms": [epoch_s / done * 1e3] * self.comm.size,
                      "samples_per_s": done * cfg.train.batch_size * lay.D / epoch_s, "epoch_s": epoch_s}
            self._end_of_epoch(epoch + 1, record, log, progress, last_epoch, optimizer)
            if stop_voted and epoch + 1 < last_epoch:  # voted on the epoch's last step
                self._stop_now(epoch + 1, 0, "finetune", optimizer)
        return elapsed

    def save(self, tag: str, epoch: int, phase: str, finetune_opt=None, step_in_epoch: int = 0):
        self.store.flush(self.comm.barrier)
        save_trainer(self, tag, epoch, phase, finetune_opt, step_in_epoch)
