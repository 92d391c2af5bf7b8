"""The one epoch loop every trainer runs: serial backprop, the distributed baselines and
both layer-parallel phases.

Per step it sets the learning rate of every optimiser from one schedule (a function of
the global step, so a resume continues it), labels the step for the hang watchdog, runs
the trainer's step, adds up what the step reports and advances the progress bar. Every
`sync_every` steps, and after an epoch's last, it reads what the host must see: the
stop vote (passed to the StopPoint; a NaN loss raises there) and the progress bar's
numbers. What a step does is the trainer's business: it returns a dict of numbers, as
floats or as tensors on the device, summed over the epoch on the device and read once at
its end, so that on a GPU the steps between two reads never wait for the device.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from hpcaux.train.run.optim import set_lr
from hpcaux.train.run.schedules import learning_rate
from hpcaux.train.run.stop_request import StopPoint, StopVote


def sync_interval(train_cfg, device) -> int:
    """Steps between two host reads (train.sync_every; 0 = 1 on CPUs, where a read costs
    nothing and a stop lands after the current step, and 50 on GPUs)."""
    if train_cfg.sync_every:
        return train_cfg.sync_every
    return 50 if getattr(device, "type", str(device)) == "cuda" else 1


@dataclass
class LrSchedule:
    """The learning rate at a global step: warm-up and decay over `total_steps`."""
    optim_cfg: object
    total_steps: int
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        return learning_rate(self.optim_cfg, step, self.total_steps, self.steps_per_epoch)


@dataclass
class EpochTotals:
    """What the steps of one epoch reported, summed; `steps` of them in `seconds`, of which
    `input_seconds` waiting for the next batch (the loader: decoding, augmentation)."""
    sums: dict = field(default_factory=lambda: defaultdict(float))
    steps: int = 0
    seconds: float = 0.0
    input_seconds: float = 0.0
    lr: float = 0.0

    @property
    def input_ms(self) -> float:
        """Milliseconds per step spent waiting for input: near 0 when the loader keeps up."""
        return self.input_seconds / max(self.steps, 1) * 1e3

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)

    def read(self):
        """Turn the sums kept on the device into floats (one host read for all of them)."""
        keys = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        if keys:
            values = torch.stack([self.sums[k].detach().double().reshape(()) for k in keys]).tolist()
            self.sums.update(zip(keys, values))


@dataclass
class EpochLoop:
    optimizers: list
    schedule: LrSchedule
    step_fn: Callable            # (x, y, idx) -> dict of numbers (floats or device tensors)
    progress: object             # hpcaux.train.run.progress.Progress
    watchdog_context: dict       # the hang watchdog's context; "step" is set per step
    describe: Callable[[int, dict], str] = lambda epoch, values: f"ep {epoch + 1}"
    stop: StopPoint | None = None
    vote: StopVote | None = None  # read every sync_every steps; passed to `stop`
    sync_every: int = 1          # steps between two host reads (sync_interval)
    label: str = ""              # prefix of the watchdog's step label, e.g. "finetune "
    step: int = 0                # global step, for the schedule

    def run_epoch(self, epoch: int, batches: Iterable, first_step_in_epoch: int = 0) -> EpochTotals:
        totals, start = EpochTotals(), time.perf_counter()
        step_in_epoch, unread = first_step_in_epoch, False
        batches = iter(batches)
        while (batch := self._next_batch(batches, totals)) is not None:
            x, y, idx = batch
            totals.lr = self.schedule(self.step)
            for optimizer in self.optimizers:
                set_lr(optimizer, totals.lr)
            self.watchdog_context["step"] = f"{self.label}{self.step}" if self.label else self.step
            values = self.step_fn(x, y, idx)
            step_in_epoch += 1
            totals.steps += 1
            for key, value in values.items():
                totals.sums[key] += value
            unread = step_in_epoch % self.sync_every != 0
            if not unread:
                self._read(epoch, step_in_epoch, values)
            else:
                self.progress.update(None)
            self.step += 1
        if unread:  # the epoch's last steps: read before the epoch is recorded
            self._read(epoch, step_in_epoch, None)
        totals.seconds = time.perf_counter() - start
        totals.read()
        return totals

    @staticmethod
    def _next_batch(batches, totals: EpochTotals):
        """The next (x, y, idx), or None at the epoch's end; the wait counts as input time."""
        started = time.perf_counter()
        batch = next(batches, None)
        totals.input_seconds += time.perf_counter() - started
        return batch

    def _read(self, epoch: int, step_in_epoch: int, values: dict | None):
        """The host's read: the progress bar's numbers and the agreed stop vote (a NaN loss
        raises NonFiniteLoss here, with the watchdog's step label still this step's)."""
        agreed = self.vote.verdict() if self.vote is not None else False
        if values is not None:
            self.progress.update(self.describe(epoch, values))
        if self.stop is not None:
            self.stop.after_step(agreed, epoch, step_in_epoch)
