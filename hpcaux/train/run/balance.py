"""Where to cut the model: stage times measured side by side, in the run's own setting.

The slowest stage sets a pipeline's pace, so the cut should even out the stages' times
as they run in the job: every rank on its own threads and all ranks at once (on a CPU
they share memory bandwidth and caches), in the run's precision and memory format, on
one micro-batch. Blocks timed one at a time in a quiet process mispredict that. On the
project's two-core machine the full-resolution blocks of ResNet-20 ran faster side by
side, and the low-resolution ones slower (docs/benchmarks.md). With `parallel.balance:
time` (the default), therefore:

1. Every rank times every block at the same moment, and the model is cut at balanced
   mean block times (partition.balanced_cuts, an exact split).
2. Every rank times its own stage of that cut, all ranks at once, holding as many
   forward graphs alive as its stage does in training (a pipeline stage keeps those
   whose gradients are still on their way: their activations compete for the caches).
   Then one cut point at a
   time moves by one block, as long as that makes the stages faster by more than the
   timing noise, slowest stage first (a local search from the split of step 1).
3. The stage times of the chosen cut, and their imbalance, go to the job log and to
   summary.json. The same is measured and reported for configured cuts, for the
   `flops` and `params` balances, and on a resume.

Rank 0 decides each step and broadcasts it, so every rank cuts the model alike, even
though each rank's timings differ. Timing runs leave the model as it was: the BatchNorm
statistics are restored and the gradients are dropped.
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from hpcaux.errors import UserError
from hpcaux.models.blocks import BlockSequence
from hpcaux.models.partition import (balanced_cuts, block_flops, block_inputs, block_params, check_cuts,
                                     check_stage_count, make_stages)

NOISE = 0.02       # a move must shorten a stage by more than this fraction
WINDOW_S = 0.25    # every rank runs the timed code for at least this long, so all overlap
MIN_RUNS = 3       # and at least this often (a block: this often, with no window)


@dataclass
class Partition:
    """The cut points and the stage times measured side by side for them, in ms per
    `samples` images (one micro-batch), forward and backward."""
    cuts: list[int]
    stage_ms: list[float]
    samples: int
    how: str

    @property
    def imbalance(self) -> float:
        """Slowest stage over the mean stage, minus one: what the slowest costs the step."""
        return max(self.stage_ms) / (sum(self.stage_ms) / len(self.stage_ms)) - 1

    def describe(self) -> str:
        """One line for the job log."""
        times = "/".join(f"{t:.1f}" for t in self.stage_ms)
        return (f"cuts {self.cuts} ({self.how}): stages take {times} ms per {self.samples} images "
                f"side by side, imbalance {100 * self.imbalance:.1f} %")

    def summary(self) -> dict:
        """What summary.json records of it."""
        return {"cuts": self.cuts, "cut_by": self.how, "cut_stage_ms": self.stage_ms,
                "cut_samples": self.samples, "cut_imbalance": self.imbalance}


def agree_on_partition(parallel_cfg, comm, model: BlockSequence, sample: torch.Tensor, my_stage: int,
                       forward=None, boundary_norm: bool = True, cuts: list[int] | None = None,
                       in_flight: int = 0) -> Partition:
    """The partition every rank uses, and its stage times side by side.

    `cuts` given (a resume's): those. Otherwise the configured `parallel.cuts`, or cuts
    balanced by `parallel.balance`. `comm` is the run's hpcaux.comm.Comm; `my_stage` the
    stage this rank trains; `forward(module, x)` runs a training forward pass as the
    run does (precision, memory format); `boundary_norm` as the run's stages have it;
    `in_flight`: the forward graphs this rank's stage keeps alive in training.
    """
    K, n = parallel_cfg.K, len(model)
    check_stage_count(K, n)
    forward = forward or (lambda module, x: module(x))
    with _leaves_no_trace(model):
        timer = SideBySide(comm, model, sample, my_stage, forward, boundary_norm, in_flight)
        if cuts is not None or parallel_cfg.cuts:
            how = "from the checkpoint" if cuts is not None else "configured"
            cuts = list(cuts if cuts is not None else parallel_cfg.cuts)
            if cuts and cuts[-1] >= n:
                raise UserError(f"config key 'parallel.cuts' {cuts} is beyond the model's {n} blocks")
            check_cuts(n, cuts)
            return Partition(cuts, timer.stage_ms(cuts), len(sample), how)
        if parallel_cfg.balance == "time":
            costs = timer.mean_block_ms()
            cuts = comm.broadcast_object(balanced_cuts(costs, K) if comm.rank == 0 else None)
            cuts, stage_ms = refine_cuts(cuts, n, timer.stage_ms, comm.broadcast_object)
            return Partition(cuts, stage_ms, len(sample), "balanced by time side by side")
        costs = block_flops(model, sample) if parallel_cfg.balance == "flops" else block_params(model)
        cuts = balanced_cuts(costs, K)  # the same on every rank: counts, not timings
        return Partition(cuts, timer.stage_ms(cuts), len(sample), f"balanced by {parallel_cfg.balance}")


def refine_cuts(cuts: list[int], n_blocks: int, stage_ms, agree=lambda decision: decision,
                noise: float = NOISE) -> tuple[list[int], list[float]]:
    """Local search from `cuts`: move one cut point by one block while that makes the
    stages faster (`_faster`), as `stage_ms(cuts)` measures them. `agree(decision)` makes
    every rank take rank 0's decision (a broadcast); each call of `stage_ms` is a
    measurement every rank takes part in. Returns the cuts and their stage times."""
    best = stage_ms(cuts)
    improved = True
    while improved:
        improved = False
        for candidate in _neighbours(cuts, n_blocks):
            times = stage_ms(candidate)
            if agree(_faster(times, best, noise)):
                cuts, best, improved = candidate, times, True
                break
    return cuts, best


def _faster(times: list[float], than: list[float], noise: float) -> bool:
    """Stage times compared slowest first: faster where one is shorter by more than
    `noise` and none before it is longer. Comparing beyond the slowest stage lets K > 2
    move a middle cut that shortens the second-slowest stage, so that a later move can
    shorten the slowest. The slowest never gets longer and each accepted move is a strict
    decrease, so the search ends."""
    for mine, theirs in zip(sorted(times, reverse=True), sorted(than, reverse=True)):
        if mine < (1 - noise) * theirs:
            return True
        if mine > theirs:
            return False
    return False


def _neighbours(cuts: list[int], n_blocks: int) -> list[list[int]]:
    """The cuts with one cut point moved by one block, still increasing and inside the model."""
    found = []
    for i in range(len(cuts)):
        for step in (-1, 1):
            moved = cuts[:i] + [cuts[i] + step] + cuts[i + 1:]
            if 0 < moved[i] < n_blocks and sorted(set(moved)) == moved:
                found.append(moved)
    return found


class SideBySide:
    """Forward and backward timings that every rank takes at the same moment."""

    def __init__(self, comm, model: BlockSequence, sample: torch.Tensor, my_stage: int, forward, boundary_norm: bool,
                 in_flight: int = 0):
        self.comm, self.model, self.my_stage = comm, model, my_stage
        self.forward, self.boundary_norm, self.in_flight = forward, boundary_norm, in_flight
        self.inputs = block_inputs(model, sample)

    def mean_block_ms(self) -> list[float]:
        """Each block's time, measured on every rank at once and averaged over the ranks."""
        self.comm.barrier("barrier before timing the blocks")
        mine = {f"block {i}": self._median_ms(block, i, window_s=0.0) for i, block in enumerate(self.model)}
        table = self.comm.gather_per_rank(mine)
        return [float(table[name].mean()) for name in mine]

    def stage_ms(self, cuts: list[int]) -> list[float]:
        """Each stage's time for `cuts` while every rank runs its own stage; a stage that
        several ranks (replicas) train counts at its slowest."""
        stage = make_stages(self.model, cuts, self.boundary_norm)[self.my_stage]
        self.comm.barrier("barrier before timing the stages side by side")
        ms = self._median_ms(stage, stage.start, WINDOW_S, self.in_flight)
        table = self.comm.gather_per_rank({"stage": float(self.my_stage), "ms": ms})
        per_stage = [0.0] * (len(cuts) + 1)
        for s, t in zip(table["stage"].tolist(), table["ms"].tolist()):
            per_stage[int(s)] = max(per_stage[int(s)], t)
        return per_stage

    def _median_ms(self, module, first_block: int, window_s: float, in_flight: int = 0) -> float:
        """Median ms of a training forward pass of `module` on the input of block
        `first_block` and a backward pass, the backward of the forward `in_flight` runs
        earlier; repeated MIN_RUNS times and for `window_s`, after warm-up runs that fill
        the graphs in flight. The image needs no gradient, as in training."""
        x = self.inputs[first_block]
        device = x.device
        waiting = collections.deque()

        def once():
            inp = x.detach().requires_grad_(first_block > 0)
            waiting.append(self.forward(module, inp).float().sum())
            if len(waiting) > in_flight:
                waiting.popleft().backward()

        def synchronize():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(in_flight + 1):
            once()
        runs, began = [], time.perf_counter()
        while len(runs) < MIN_RUNS or time.perf_counter() - began < window_s:
            synchronize()
            t0 = time.perf_counter()
            once()
            synchronize()
            runs.append(1e3 * (time.perf_counter() - t0))
        waiting.clear()  # their graphs go, unused
        return statistics.median(runs)


@contextlib.contextmanager
def _leaves_no_trace(model: torch.nn.Module):
    """Timing runs must not move BatchNorm statistics or leave gradients behind."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
