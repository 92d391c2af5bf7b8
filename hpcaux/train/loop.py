"""The one epoch loop every trainer runs: serial backprop, the distributed baselines and
both layer-parallel phases.

Per step it sets the learning rate of every optimiser from one schedule (a function of
the global step, so a resume continues it), labels the step for the hang watchdog, runs
the trainer's step, adds up what the step reports, advances the progress bar and passes
the agreed stop vote to the StopPoint. What a step does is the trainer's business: it
returns a dict of numbers (summed over the epoch), and "stop" with the agreed vote where
the trainer carries one.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from hpcaux.train.run.optim import set_lr
from hpcaux.train.run.schedules import learning_rate
from hpcaux.train.run.stop_request import StopPoint


@dataclass
class LrSchedule:
    """The learning rate at a global step: warm-up and decay over `total_steps`."""
    optim_cfg: object
    total_steps: int
    steps_per_epoch: int
    base_lr: float | None = None

    def __call__(self, step: int) -> float:
        return learning_rate(self.optim_cfg, step, self.total_steps, self.steps_per_epoch, base_lr=self.base_lr)


@dataclass
class EpochTotals:
    """What the steps of one epoch reported, summed; `steps` of them in `seconds`."""
    sums: dict = field(default_factory=lambda: defaultdict(float))
    steps: int = 0
    seconds: float = 0.0
    lr: float = 0.0

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)


@dataclass
class EpochLoop:
    optimizers: list
    schedule: LrSchedule
    step_fn: Callable            # (x, y, idx) -> dict of numbers (+ "stop": bool)
    progress: object             # hpcaux.train.run.progress.Progress
    watchdog_context: dict       # the hang watchdog's context; "step" is set per step
    describe: Callable[[int, dict], str] = lambda epoch, values: f"ep {epoch + 1}"
    stop: StopPoint | None = None
    label: str = ""              # prefix of the watchdog's step label, e.g. "finetune "
    step: int = 0                # global step, for the schedule

    def run_epoch(self, epoch: int, batches: Iterable, first_step_in_epoch: int = 0) -> EpochTotals:
        totals, start = EpochTotals(), time.perf_counter()
        step_in_epoch = first_step_in_epoch
        for x, y, idx in batches:
            totals.lr = self.schedule(self.step)
            for optimizer in self.optimizers:
                set_lr(optimizer, totals.lr)
            self.watchdog_context["step"] = f"{self.label}{self.step}" if self.label else self.step
            values = self.step_fn(x, y, idx)
            agreed = values.pop("stop", False)
            self.step += 1
            step_in_epoch += 1
            totals.steps += 1
            for key, value in values.items():
                totals.sums[key] += value
            self.progress.update(self.describe(epoch, values))
            if self.stop is not None:
                self.stop.after_step(agreed, epoch, step_in_epoch)
        totals.seconds = time.perf_counter() - start
        return totals
