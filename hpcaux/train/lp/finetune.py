"""The serial-parallel hybrid's fine-tune step (docs/design.md §1): end-to-end backprop of the
composed network across the ranks of a replica (StageChain.backprop_step over send/recv),
the stage gradients averaged over the replicas when D > 1, and the stop vote in an
allreduce of its own (this phase has no world allreduce to carry it).
"""
from __future__ import annotations

import math

from hpcaux.train.lp.checkpoint import restore_finetune_optimizer
from hpcaux.train.run.optim import make_optimizer


class FinetuneStep:
    def __init__(self, trainer, resuming_inside: bool):
        """`resuming_inside`: the checkpoint was taken during the fine-tune (restore its optimiser)."""
        self.trainer = trainer
        self.optimizer = make_optimizer(list(trainer.stage.parameters()), trainer.cfg.optim, lr=trainer.cfg.lp.finetune_lr)
        if resuming_inside:
            trainer.comm.agree(lambda: restore_finetune_optimizer(trainer, trainer.resume_from, self.optimizer),
                               "restoring the checkpoint")

    def gradients(self, x, y) -> float | None:
        """Leaves the stage's end-to-end gradient, averaged over the replicas; the loss on the last stage."""
        t = self.trainer
        self.optimizer.zero_grad(set_to_none=True)
        loss = t.chain.backprop_step(x, y, t.step.criterion)
        if t.layout.D > 1:
            grads = [p.grad for p in t.stage.parameters()]
            t.comm.allreduce(grads, op="mean", group=t.step.stage_group, what="allreduce stage gradients")
        return loss

    def __call__(self, x, y, _idx) -> dict:
        loss = self.gradients(x, y)
        self.trainer.stop_vote.loss_finite = loss is None or math.isfinite(loss)
        self.optimizer.step()
        return {"loss": loss or 0.0, "stop": self.trainer.stop_vote.agree_alone(self.trainer.comm)}
