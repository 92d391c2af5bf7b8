"""The serial-parallel hybrid's fine-tune step (docs/design.md §1): end-to-end backprop of the
composed network across the ranks of a replica (StageChain.train_step, the gpipe timetable
of parallel.microbatches micro-batches), the stage gradients averaged over the replicas
when D > 1 before the optimiser steps, and the stop vote in an allreduce of its own (this
phase has no world allreduce to carry it). It goes on with the stage's own optimiser,
momentum and all, and the trainer's one learning-rate schedule over both phases (a fresh
optimiser and schedule for the fine-tune lost accuracy and was retired: docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcaux.comm import Comm, Group
from hpcaux.train.lp.composed import StageChain
from hpcaux.train.run.stop_request import StopVote


@dataclass
class FinetuneParts:
    """What the fine-tune of one stage works with (the trainer's, handed over as such)."""
    chain: StageChain
    optimizer: torch.optim.Optimizer
    criterion: object
    microbatches: int
    comm: Comm
    stage_group: Group          # the D replicas of this stage
    stop_vote: StopVote


class FinetuneStep:
    def __init__(self, parts: FinetuneParts):
        self.parts = parts
        self.optimizer = parts.optimizer

    def __call__(self, x, y, _idx) -> dict:
        p = self.parts
        self.optimizer.zero_grad(set_to_none=True)
        loss = p.chain.train_step(x, y, p.criterion, p.microbatches, self._apply, self._vote)
        return {"loss": loss if loss is not None else 0.0}

    def _apply(self):
        """Average the stage gradients over the replicas (D > 1) and step."""
        p = self.parts
        if len(p.stage_group.ranks) > 1:
            grads = [param.grad for param in p.chain.stage.parameters()]
            p.comm.allreduce(grads, op="mean", group=p.stage_group, what="allreduce stage gradients")
        self.optimizer.step()

    def _vote(self, loss: torch.Tensor | None):
        """The stop vote, read by the epoch loop; a non-finite loss on the last stage stops."""
        vote = self.parts.stop_vote
        vote.loss_finite = torch.isfinite(loss) if loss is not None else True
        vote.agree_alone(self.parts.comm)
