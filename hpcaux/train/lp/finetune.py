"""The serial-parallel hybrid's fine-tune step (docs/design.md §1): end-to-end backprop of the
composed network across the ranks of a replica (StageChain.backprop_step, a GPipe pipeline
of parallel.microbatches micro-batches over send/recv), the stage gradients averaged over
the replicas when D > 1, and the stop vote in an allreduce of its own (this phase has no
world allreduce to carry it). It goes on with the stage's own optimiser, momentum and all,
and the trainer's one learning-rate schedule over both phases (a fresh optimiser and
schedule for the fine-tune lost accuracy and was retired: docs/results.md).
"""
from __future__ import annotations

import torch


class FinetuneStep:
    def __init__(self, trainer):
        self.trainer = trainer
        self.optimizer = trainer.stage_opt

    def gradients(self, x, y) -> torch.Tensor | None:
        """Leaves the stage's end-to-end gradient, averaged over the replicas; the loss on the last stage."""
        t = self.trainer
        self.optimizer.zero_grad(set_to_none=True)
        loss = t.chain.backprop_step(x, y, t.step.criterion, t.cfg.parallel.microbatches)
        if t.layout.D > 1:
            grads = [p.grad for p in t.stage.parameters()]
            t.comm.allreduce(grads, op="mean", group=t.step.stage_group, what="allreduce stage gradients")
        return loss

    def __call__(self, x, y, _idx) -> dict:
        loss = self.gradients(x, y)
        vote = self.trainer.stop_vote
        vote.loss_finite = torch.isfinite(loss) if loss is not None else True
        self.optimizer.step()
        vote.agree_alone(self.trainer.comm)  # read by the epoch loop
        return {"loss": loss if loss is not None else 0.0}
