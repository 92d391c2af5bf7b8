"""Layer-parallel training with an auxiliary-variable network (docs/design.md §1–§2).

Rank r owns stage r mod K of replica r div K. The trainer wires a rank's pieces and runs
the epochs; the pieces live in hpcaux.train.lp: the step (lp.step), the fine-tune step
(lp.finetune), held-out metrics (lp.metrics), epoch records and the summary (lp.records),
the store view (lp.store), epoch ends and checkpoints (lp.saving, lp.checkpoint). Both
phases run the shared epoch loop (hpcaux.train.loop). Evaluation is always the true
composition, run across the ranks by lp.composed.
"""
from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.data.sets import load_data
from hpcaux.errors import UserError
from hpcaux.store.aux_store import open_store_for_run
from hpcaux.train.loop import EpochLoop, LrSchedule, sync_interval
from hpcaux.train.lp.checkpoint import read_resume_manifest, restore_exchange
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.lp.exchange import NeighbourExchange
from hpcaux.train.lp.finetune import FinetuneParts, FinetuneStep
from hpcaux.train.lp.metrics import HeldOutMetrics
from hpcaux.train.lp.parts import build_stage_parts, checked_layout
from hpcaux.train.lp.records import TIMERS, finetune_record, layer_parallel_record, run_summary
from hpcaux.train.lp.saving import RunSaver
from hpcaux.train.lp.step import LayerParallelStep
from hpcaux.train.lp.store import RunStore
from hpcaux.train.lp.stored_real import StoredRealInputs
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.progress import Progress
from hpcaux.train.run.rundir import MetricsLog, write_json
from hpcaux.train.run.runtime import peak_memory_mb
from hpcaux.train.run.schedules import rho_at_epoch
from hpcaux.train.run.stop_request import NonFiniteLoss, StopPoint, StoppedBySignal, StopRequest, StopVote


class LayerParallelTrainer:
    def __init__(self, cfg: Config, run_dir: Path, comm: Comm, device: torch.device, resume: bool = False,
                 stop: StopRequest | None = None, create_run=None):
        """Every start-up check runs before `create_run()` (rank 0) writes the run directory."""
        self.cfg, self.run_dir, self.comm, self.device = cfg, run_dir, comm, device
        K = cfg.parallel.K
        self.layout = lay = checked_layout(cfg, comm)
        s = lay.stage
        comm.watchdog.context.update(stage=s, replica=lay.replica)
        self.hosts = comm.gather_text(socket.gethostname())
        self.resume_from, manifest = comm.agree(lambda: read_resume_manifest(run_dir, K), "the checkpoint") \
            if resume else (None, None)
        self.data = comm.agree(lambda: load_data(cfg.data, cfg.seed), "the data set")
        self.steps = self.data.steps_per_epoch(cfg.train.batch_size, lay.D)  # same on every rank
        held_out = self.data.heldout_count(self.data.monitor_split)
        if cfg.store.probe_size > held_out:
            raise UserError(f"config key 'store.probe_size' ({cfg.store.probe_size}) exceeds the "
                            f"{held_out} held-out images it is drawn from")
        precision = Precision(cfg.train, device)
        self.parts, stages = build_stage_parts(cfg, comm, lay, self.data, device, precision,
                                               cuts=manifest["cuts"] if manifest else None)
        parts = self.parts
        # Process sets, created by every rank in the same order (Horovod and gloo need that).
        stage_group = [comm.new_group(lay.stage_ranks(k)) for k in range(K)][s]
        replica_group = [comm.new_group(lay.replica_ranks(r)) for r in range(lay.D)][lay.replica]
        self.resumed_exchange = None
        if self.resume_from is not None:  # before the store is opened: a bad checkpoint touches nothing
            comm.agree(lambda: parts.load(self.resume_from, device), "restoring the checkpoint")
            if cfg.lp.exchanges:
                self.resumed_exchange = comm.agree(lambda: restore_exchange(lay, self.resume_from, manifest, device),
                                                   "restoring the neighbour exchange")
        if create_run is not None:
            comm.agree(lambda: create_run() if comm.rank == 0 else None, "creating the run directory")
        self.store = comm.agree(lambda: open_store_for_run(run_dir, comm, cfg.store.mode, resume=resume),
                                "the HDF5 store")
        self.run_store = comm.agree(lambda: RunStore(self.store, cfg, lay, parts.shapes, self.data.n_train),
                                    "the HDF5 store layout")
        self.stop_request, self.stop_vote = stop, StopVote(stop, device, comm.rank, comm.size)
        # With parallel.microbatches M the exchange steps once per micro-batch, M times a step.
        M = cfg.parallel.microbatches
        exchange = NeighbourExchange(comm, lay, parts.shapes, cfg.train.batch_size // M, self.steps * M, device,
                                          cfg.lp.delayed_grad, (parts.stage, parts.local_head),
                                          chained=cfg.lp.aux_source == "none", relay=cfg.lp.relays) \
            if cfg.lp.exchanges else None
        stored_real = StoredRealInputs(self.store, s - 1 if s > 0 else None, s if s < K - 1 else None, device) \
            if cfg.lp.real_inputs == "stored" else None
        self.step = LayerParallelStep(cfg, lay, comm, device, stage=parts.stage, local_head=parts.local_head,
                                      auxnet=parts.auxnet, stage_opt=parts.stage_opt, aux_opt=parts.aux_opt,
                                      store=self.store, shapes=parts.shapes, stage_group=stage_group,
                                      replica_group=replica_group, stop_vote=self.stop_vote, precision=precision,
                                      exchange=exchange, stored_real=stored_real)
        if self.step.stored_z is not None and not resume:
            self.step.stored_z.initialise(stages, self.data, cfg.train.eval_batch_size, comm.barrier)
        self.chain = StageChain(comm, lay, parts.stage, parts.shapes, device, precision)
        self.metrics = HeldOutMetrics(self.step, self.chain, comm, self.data, cfg, lay, device)
        self.saver = RunSaver(run_dir, comm, cfg, parts, self.store, self.run_store, self.metrics.probe_outputs)
        self.start_epoch = manifest["epoch"] if manifest else 0
        # A checkpoint taken on a signal sits inside an epoch: skip the steps it already made
        # (and continue the neighbour exchange from what was in flight, resumed_exchange).
        self.start_step_in_epoch = manifest.get("step_in_epoch", 0) if manifest else 0

    def batches(self, epoch: int, augment: bool, images: bool = True):
        """This replica's batches of an epoch; a resume inside this epoch skips those already
        trained on (drawn and dropped, so the augmentation draws stay those of an
        uninterrupted run). `images=False`: labels only (the images are None)."""
        batches = self.data.train_batches(self.cfg.train.batch_size, seed=self.cfg.seed, epoch=epoch, augment=augment,
                                          device=self.device, replica=self.layout.replica, replicas=self.layout.D,
                                          images=images)
        if epoch == self.start_epoch and self.start_step_in_epoch:
            return itertools.islice(batches, self.start_step_in_epoch, None)
        return batches

    # --- the run -----------------------------------------------------------------------
    def run(self, max_epochs: int | None = None) -> dict:
        """Train from the start (or the resumed checkpoint) to the end, or for `max_epochs`
        epochs of this invocation — then checkpoint, so `--resume` continues the same
        schedule. A stop signal checkpoints after the current step instead."""
        try:
            return self._run(max_epochs)
        except NonFiniteLoss as bad:
            self.store.close(self.comm.barrier)
            raise UserError(bad.describe(self.comm.watchdog.context.get("step"), self.steps, self.layout.stage_of)) \
                from None
        except StoppedBySignal as stopped:
            self.store.close(self.comm.barrier)
            request = self.stop_request
            return {"stopped_by_signal": request.signal_name if request and request.requested else "peer",
                    "stopped_after_step": stopped.args[0]}

    def _run(self, max_epochs: int | None) -> dict:
        cfg, lay, steps = self.cfg, self.layout, self.steps
        epochs, ft_epochs = cfg.train.epochs, cfg.train.finetune_epochs
        last_epoch = epochs + ft_epochs
        if max_epochs:
            last_epoch = min(last_epoch, self.start_epoch + max_epochs)
        log = MetricsLog(self.run_dir, fresh=self.resume_from is None,
                         resumed_after=self.start_epoch if self.resume_from is not None else None) \
            if self.comm.rank == 0 else None
        progress = Progress(steps * (last_epoch - self.start_epoch), cfg.train.progress, self.comm.rank)
        progress.note(lay.describe_placement(self.hosts))
        progress.note(self.parts.partition.describe())
        if self.resume_from is not None:
            within = f", step {self.start_step_in_epoch} of epoch {self.start_epoch + 1}" if self.start_step_in_epoch else ""
            progress.note(f"resumed from {self.resume_from} after epoch {self.start_epoch}{within}")
        started = time.perf_counter()
        lp_totals = self._layer_parallel(progress, log, last_epoch)
        ft_totals = self._finetune(progress, log, last_epoch) if last_epoch > epochs else []
        progress.close()
        if last_epoch < epochs + ft_epochs:
            self.store.close(self.comm.barrier)
            return {"stopped_after_epoch": last_epoch}
        final = self.metrics(cfg.data.test_subset, "test", composed_trained=ft_epochs > 0)
        self.saver.save("final", last_epoch, "done")
        self.store.close(self.comm.barrier)
        timers = {k: sum(t.sums[k] for t in lp_totals) for k in TIMERS}
        times = {"wall_s": time.perf_counter() - started, "train_s": sum(t.seconds for t in lp_totals),
                 "finetune_s": sum(t.seconds for t in ft_totals)}
        summary = run_summary(self, final, timers, sum(t.steps for t in lp_totals), times, peak_memory_mb(self.device))
        if self.comm.rank == 0:
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _layer_parallel(self, progress, log, last_epoch: int) -> list:
        """The layer-parallel epochs (up to train.epochs, or the invocation's last)."""
        cfg, lay, steps = self.cfg, self.layout, self.steps
        samples = steps * cfg.train.batch_size * lay.D
        # Every epoch has `steps` steps, so the global step (which the schedules follow) is
        # derived from the epoch, also when a resume changes D.
        rho = 0.0
        loop = EpochLoop([self.parts.stage_opt] + ([self.parts.aux_opt] if self.parts.aux_opt else []),
                         self.lr_schedule(), lambda x, y, idx: self.step(x, y, idx, rho),
                         progress, self.comm.watchdog.context,
                         describe=lambda e, v: f"ep {e + 1} stage {lay.stage + 1} loss {v['loss']:.3f}",
                         stop=StopPoint(lambda e, s: self.saver.settle_and_save(self.step, f"stop_step_{e * steps + s}", e, s),
                                         steps),
                         vote=self.stop_vote, sync_every=sync_interval(cfg.train, self.device))
        # Without an AuxNet a later stage's input is its predecessor's output: it reads labels
        # only, which saves the images' augmentation.
        images = not (cfg.lp.aux_source == "none" and not lay.is_first)

        def start(epoch: int, within: int):
            nonlocal rho
            rho = rho_at_epoch(cfg.lp, epoch)
            self.step.epoch_stats = self.step.fresh_stats()
            if self.step.stored_real:
                self.step.stored_real.start_epoch(epoch)
            if self.step.exchange:
                self.step.exchange.start_epoch(within * cfg.parallel.microbatches,
                                               self.resumed_exchange if epoch == self.start_epoch else None)

        def end(epoch: int, totals) -> dict:
            if self.step.exchange:
                self.step.exchange.drain()
            return layer_parallel_record(epoch, rho, totals, self.step, self.comm, cfg, lay,
                                         self.metrics(cfg.data.eval_subset), samples)

        return self._run_phase(loop, range(self.start_epoch, min(cfg.train.epochs, last_epoch)), start, end, log,
                               progress, last_epoch, augment=cfg.data.augment and cfg.lp.aux_source != "stored",
                               images=images)

    def lr_schedule(self) -> LrSchedule:
        """The learning rate by step: one schedule over both phases (the fine-tune goes on
        with the stage optimisers where the layer-parallel epochs left them)."""
        steps = self.steps
        return LrSchedule(self.cfg.optim, steps * (self.cfg.train.epochs + self.cfg.train.finetune_epochs), steps)

    def _finetune(self, progress, log, last_epoch: int) -> list:
        """Serial-parallel hybrid: end-to-end backprop of the composed network, pipelined over send/recv."""
        cfg, steps, epochs = self.cfg, self.steps, self.cfg.train.epochs
        first = max(self.start_epoch, epochs)
        step = self.finetune_step()
        loop = EpochLoop([step.optimizer], self.lr_schedule(),
                         step, progress, self.comm.watchdog.context, label="finetune ",
                         describe=lambda e, _: f"finetune {e + 1 - epochs}",
                         stop=StopPoint(lambda e, s: self.saver.save(f"stop_step_{e * steps + s}", e, "finetune",
                                                                     step_in_epoch=s), steps),
                         vote=self.stop_vote, sync_every=sync_interval(cfg.train, self.device))

        def record(epoch: int, totals) -> dict:
            held_out = self.metrics(cfg.data.eval_subset, composed_trained=True)
            return finetune_record(epoch, totals, self.comm, self.layout, held_out, steps * cfg.train.batch_size * self.layout.D)

        return self._run_phase(loop, range(first, last_epoch), None, record, log, progress, last_epoch,
                               augment=cfg.data.augment)

    def _run_phase(self, loop: EpochLoop, epochs: range, start, end, log, progress, last_epoch: int, *,
                   augment: bool, images: bool = True) -> list:
        """The epochs of one phase (layer-parallel or fine-tune) on `loop`: `start(epoch,
        step_in_epoch)` before each (a resumed epoch starts at the step it stopped after),
        `end(epoch, totals)` after it returns the epoch's record, which is logged and
        recorded; a checkpoint or a stop follows where one is due. Returns the epochs' totals."""
        all_totals = []
        for epoch in epochs:
            within = self.start_step_in_epoch if epoch == self.start_epoch else 0
            loop.step = epoch * self.steps + within
            if start:
                start(epoch, within)
            totals = loop.run_epoch(epoch, self.batches(epoch, augment, images), within)
            all_totals.append(totals)
            self.saver.end_of_epoch(epoch + 1, end(epoch, totals), log, progress, last_epoch)
            loop.stop.after_epoch(epoch + 1, last_epoch)
        return all_totals

    def finetune_step(self) -> FinetuneStep:
        return FinetuneStep(FinetuneParts(self.chain, self.parts.stage_opt, self.step.criterion,
                                          self.cfg.parallel.microbatches, self.comm, self.step.stage_group,
                                          self.stop_vote))
