"""The distributed baselines `hpcaux bench` compares layer-parallel training with.

* data_parallel: D replicas of the whole network, each on 1/D of the batch
  (`train.batch_size` is per replica), gradients averaged by Horovod's
  DistributedOptimizer (comm.backend horovod) or DistributedDataParallel (torch), both
  of which overlap the allreduce with the backward pass.
* pipeline: the network cut into K stages (the same cut as layer-parallel training,
  without boundary normalisation: this is the serial network), trained by GPipe-style
  micro-batching with torch.distributed.pipelining (comm.backend torch).

Both are exact backprop of the serial network, so their accuracy is serial's up to
BatchNorm batch statistics (per replica / per micro-batch). They log what the serial
and layer-parallel trainers log, so the bench reads every method alike.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.data.sets import cut_timing_sample, heldout_summary, load_data
from hpcaux.errors import UserError
from hpcaux.models import block_count, build_model
from hpcaux.models.partition import boundary_shapes, check_stage_count, make_stages
from hpcaux.train.loop import EpochLoop, LrSchedule
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.run.balance import agree_on_partition
from hpcaux.train.run.evaluate import evaluate_model
from hpcaux.train.run.layout import Layout
from hpcaux.train.run.optim import make_criterion, make_optimizer
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.progress import Progress
from hpcaux.train.run.rundir import MetricsLog, discard_set_aside, write_json
from hpcaux.train.run.runtime import peak_memory_mb, seed_everything


class BaselineTrainer:
    """Batches, per-epoch held-out accuracy and the summary around the shared epoch loop.
    Subclasses provide `layout`, `replicas`, `optimizer`, `gradients(x, y)` (leaves the
    step's synchronised gradients) and `_accuracy(split, subset)`."""

    method = ""
    replicas = 1
    step_s = 0.0

    def __init__(self, cfg: Config, run_dir: Path, comm: Comm, device: torch.device, create_run):
        self.cfg, self.run_dir, self.comm, self.device = cfg, run_dir, comm, device
        self.data = comm.agree(lambda: load_data(cfg.data, cfg.seed), "the data set")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model.arch, self.data.num_classes).to(device)
        self.precision = Precision(cfg.train, device)
        self.precision.prepare(self.model)
        self.criterion = make_criterion(cfg.optim)
        self.create_run = create_run

    def _batches(self, epoch: int):
        """This replica's share of the epoch. The pipeline has one replica: every rank
        draws the same batch, stage 0 feeds its images and the last stage its labels."""
        return self.data.train_batches(self.cfg.train.batch_size, seed=self.cfg.seed, epoch=epoch,
                                       augment=self.cfg.data.augment, device=self.device,
                                       replica=self.layout.replica, replicas=self.replicas)

    def run(self) -> dict:
        cfg, is_root = self.cfg, self.comm.rank == 0
        steps = self.data.steps_per_epoch(cfg.train.batch_size, self.replicas)
        self.comm.agree(lambda: self.create_run() if is_root else None, "creating the run directory")
        log = MetricsLog(self.run_dir, fresh=True) if is_root else None
        progress = Progress(steps * cfg.train.epochs, cfg.train.progress, self.comm.rank)
        for line in self._start_notes():
            progress.note(line)
        loop = EpochLoop([self.optimizer], LrSchedule(cfg.optim, steps * cfg.train.epochs, steps), self._timed_step,
                         progress, self.comm.watchdog.context)
        started, train_time = time.perf_counter(), 0.0
        for epoch in range(cfg.train.epochs):
            totals = loop.run_epoch(epoch, self._batches(epoch))
            train_time += totals.seconds
            self.step_s += totals.sums["step_s"]
            acc = self._accuracy(self.data.monitor_split, cfg.data.eval_subset)
            record = {"epoch": epoch + 1, "phase": self.method, "eval_acc": acc, "lr": totals.lr,
                      "epoch_s": totals.seconds, "input_ms": totals.input_ms,
                      "samples_per_s": totals.steps * cfg.train.batch_size * self.replicas / totals.seconds}
            if is_root:
                log.append(record)
                progress.note(f"epoch {epoch + 1} [{self.method}]: eval acc {acc:.3f} "
                              f"({record['samples_per_s']:.0f} samples/s)")
        progress.close()
        test_acc = self._accuracy("test", cfg.data.test_subset)
        per_rank = self.comm.gather_per_rank({"step_ms": self.step_s / max(loop.step, 1) * 1e3,
                                            "peak_mem_mb": peak_memory_mb(self.device)})
        summary = {"method": self.method, "model": cfg.model.arch, "dataset": cfg.data.dataset,
                   "K": cfg.parallel.K, "D": self.replicas, "epochs": cfg.train.epochs,
                   "train_samples": self.data.n_train,
                   **heldout_summary(self.data, cfg.data), "test_acc": test_acc, "wall_s": time.perf_counter() - started,
                   "train_s": train_time,
                   "train_samples_per_s": loop.step * cfg.train.batch_size * self.replicas / train_time,
                   "step_ms_per_rank": per_rank["step_ms"].tolist(), "peak_mem_mb_per_rank": per_rank["peak_mem_mb"].tolist(),
                   "threads": torch.get_num_threads(), "backend": self.comm.name, **self.precision.summary(),
                   **self._extra_summary()}
        if is_root:
            write_json(self.run_dir / "summary.json", summary)
            discard_set_aside(self.run_dir)
        return summary

    def _timed_step(self, x, y, _idx) -> dict:
        """One optimiser step on the batch; its time excludes data loading and evaluation."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad()  # Horovod's DistributedOptimizer takes no set_to_none
        self.gradients(x, y)
        self.apply()
        return {"step_s": time.perf_counter() - t0}

    def apply(self):
        self.optimizer.step()

    def _start_notes(self) -> list[str]:
        """Lines for the job log before the first epoch."""
        return []

    def _extra_summary(self) -> dict:
        return {}


class DataParallelTrainer(BaselineTrainer):
    method = "data_parallel"

    def __init__(self, cfg: Config, run_dir: Path, comm: Comm, device: torch.device, create_run):
        if cfg.parallel.K != 1:
            raise UserError("config key 'parallel.K' must be 1 for method: data_parallel (replicas are parallel.D)")
        self.layout = Layout.for_world(1, cfg.parallel.D, comm.rank, comm.size)
        self.replicas = self.layout.D
        super().__init__(cfg, run_dir, comm, device, create_run)
        optimizer = make_optimizer(self.model.parameters(), cfg.optim)
        if comm.name == "horovod":
            import horovod.torch as hvd
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=self.model.named_parameters())
            self.net = self.model
        elif comm.name == "torch":
            self.optimizer = optimizer
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        else:
            raise UserError(f"method data_parallel needs comm.backend horovod or torch, not {comm.name}")

    def gradients(self, x, y):
        with self.comm.watchdog.guard("data-parallel step (gradient allreduce)", self.layout.stage_ranks(0)):
            self.criterion(self.precision.forward(self.net, x), y).backward()
            if self.comm.name == "horovod":
                self.optimizer.synchronize()  # the averaged gradients, under the watchdog

    def apply(self):
        if self.comm.name != "horovod":
            return self.optimizer.step()
        with self.optimizer.skip_synchronize():  # gradients() synchronised them already
            self.optimizer.step()

    def _accuracy(self, split, subset):
        """Rank 0 evaluates (the replicas are identical); the others learn the result."""
        acc = None
        if self.comm.rank == 0:
            acc = evaluate_model(self.model, self.data, split, self.cfg.train.eval_batch_size, self.device,
                                 subset=subset, seed=self.cfg.seed)
        return self.comm.broadcast_object(acc, root=0)


class PipelineTrainer(BaselineTrainer):
    method = "pipeline"

    def __init__(self, cfg: Config, run_dir: Path, comm: Comm, device: torch.device, create_run):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe


        if comm.name != "torch":
            raise UserError(f"method pipeline needs comm.backend torch (torch.distributed.pipelining), not {comm.name}")
        if cfg.train.precision != "fp32" or cfg.train.channels_last:
            raise UserError("method pipeline runs in float32 and the default memory format: set train.precision=fp32 "
                            "and train.channels_last=false")
        check_stage_count(cfg.parallel.K, block_count(cfg.model.arch))
        self.layout = Layout.for_world(cfg.parallel.K, 1, comm.rank, comm.size)
        super().__init__(cfg, run_dir, comm, device, create_run)
        sample = cut_timing_sample(self.data, device, cfg.train.batch_size // cfg.parallel.microbatches)
        # GPipe runs every micro-batch's forward before the backwards: M graphs alive at once.
        self.partition = agree_on_partition(cfg.parallel, comm, self.model, sample, self.layout.stage,
                                            boundary_norm=False, in_flight=cfg.parallel.microbatches - 1)
        stages = make_stages(self.model, self.cuts, boundary_norm=False)
        shapes = boundary_shapes(stages, self.data.image_shape, device)
        self.stage = stages[self.layout.stage]
        self.optimizer = make_optimizer(self.stage.parameters(), cfg.optim)
        pipe_stage = PipelineStage(self.stage, self.layout.stage, cfg.parallel.K, device)
        self.schedule = ScheduleGPipe(pipe_stage, n_microbatches=cfg.parallel.microbatches,
                                      loss_fn=self.criterion)
        self.chain = StageChain(comm, self.layout, self.stage, shapes, device)

    def gradients(self, x, y):
        lay = self.layout
        with self.comm.watchdog.guard("pipeline step (micro-batch send/recv)", [lay.rank_of(k) for k in range(lay.K)]):
            if lay.is_first:
                self.schedule.step(x)
            elif lay.is_last:
                self.schedule.step(target=y)
            else:
                self.schedule.step()

    def _accuracy(self, split, subset):
        batches = self.data.heldout_batches(split, self.cfg.train.eval_batch_size, device=self.device, subset=subset,
                                            seed=self.cfg.seed)
        correct, total = self.chain.correct_count(batches)
        stats = torch.tensor([correct, total], dtype=torch.float64)
        self.comm.allreduce([stats], op="sum", what="allreduce held-out accuracy")
        return (stats[0] / stats[1]).item()

    @property
    def cuts(self) -> list[int]:
        return self.partition.cuts

    def _start_notes(self):
        return [self.partition.describe()]

    def _extra_summary(self):
        return {**self.partition.summary(), "microbatches": self.cfg.parallel.microbatches}
