"""Real activations forward and input gradients back between neighbouring stages, each one
step late (docs/design.md §1, `lp.real_inputs`, `lp.delayed_grad`).

Within an epoch of T steps (step s of the epoch, batch b_s; every rank of a replica draws
the same batches):

* stage k sends its output on b_s to stage k+1 at step s (s <= T-2), non-blocking;
* stage k+1 takes it at step s+1 as a real input with b_s's labels, beside (or instead
  of) the AuxNet's prediction, and returns the gradient of its loss with respect to that
  input (s <= T-3), non-blocking;
* stage k applies that gradient at step s+2 to its output on b_s: through the graph it
  kept of that batch (`keep`: one more batch of activations in memory, the gradient taken
  at the weights of step s, as delayed-gradient methods do) or by running the batch
  again (`replay`: one more forward, at the current weights, as Features Replay does).

Every receive is posted a step before it is needed, so in steady state no rank waits on
another. The exchange starts afresh every epoch (the first step has no real input, the
first two no delayed gradient) and every message of an epoch is received within it, so
the point-to-point traffic of evaluation never meets a training message.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import torch

from hpcaux.comm import Comm
from hpcaux.comm.base import Pending
from hpcaux.train.run.layout import Layout


def delayed_graphs_outlive_steps(enabled: bool):
    """`delayed_grad: keep` back-propagates through a graph built two optimiser steps ago.
    The optimiser updates the weights in place, which autograd refuses for tensors saved
    for backward; under this context such tensors are cloned on mutation instead, so the
    delayed gradient is taken at the weights the forward used."""
    return torch.autograd.graph.allow_mutation_on_saved_tensors() if enabled else contextlib.nullcontext()


@dataclass
class RealInput:
    """Stage k-1's output on the previous batch, and that batch's labels."""
    tensor: torch.Tensor       # requires grad: its .grad goes back to stage k-1
    labels: torch.Tensor


@dataclass
class DelayedGradient:
    """What stage k back-propagates this step: `grad` of its output on an earlier batch,
    whose graph it kept (`output`) or whose input it replays (`stage_input`)."""
    grad: torch.Tensor
    output: torch.Tensor | None = None
    stage_input: torch.Tensor | None = None


class NeighbourExchange:
    def __init__(self, comm: Comm, layout: Layout, shapes: list[tuple], batch_size: int, steps_per_epoch: int,
                 device: torch.device, delayed_grad: str):
        self.comm, self.steps, self.device, self.delayed_grad = comm, steps_per_epoch, device, delayed_grad
        s = layout.stage
        self.prev = layout.rank_of(s - 1) if s > 0 else None
        self.next = layout.rank_of(s + 1) if s < layout.K - 1 else None
        self.in_shape = (batch_size, *shapes[s - 1]) if s > 0 else None
        self.out_shape = (batch_size, *shapes[s]) if s < layout.K - 1 else None
        self.start_epoch(0)

    def start_epoch(self, first_step: int):
        """Fresh state for an epoch (or a resumed epoch) whose first step is `first_step`."""
        self.step = first_step
        self.sends: list[Pending] = []
        self.real: Pending | None = None       # real input of the previous step, in flight
        self.labels: torch.Tensor | None = None
        self.grads: deque = deque()            # (Pending grad, kept output or input), oldest first

    # --- the receiving side (stage k > 0) ---------------------------------------------
    def real_input(self, labels: torch.Tensor) -> RealInput | None:
        """The real input of the previous batch (None on an epoch's first step); posts the
        receive for this batch's, to be used next step."""
        if self.prev is None:
            return None
        real = None
        if self.real is not None:
            real = RealInput(self.real.wait().requires_grad_(), self.labels)
        self.real, self.labels = None, labels
        if self.step <= self.steps - 2:
            self.real = self.comm.irecv(torch.empty(self.in_shape, device=self.device), self.prev,
                                        what="irecv real activation")
        return real

    def return_gradient(self, real: RealInput | None):
        """Send the gradient of this rank's loss with respect to the real input back."""
        if real is None or self.delayed_grad == "none" or self.step - 1 > self.steps - 3:
            return
        grad = real.tensor.grad if real.tensor.grad is not None else torch.zeros_like(real.tensor)
        self.sends.append(self.comm.isend(grad, self.prev, what="isend boundary gradient"))

    # --- the sending side (stage k < K-1) ---------------------------------------------
    def send_output(self, output: torch.Tensor, stage_input: torch.Tensor):
        """Send this batch's output on; keep what the delayed gradient will need."""
        if self.next is None:
            return
        if self.step <= self.steps - 2:
            self.sends.append(self.comm.isend(output, self.next, what="isend real activation"))
        if self.delayed_grad != "none" and self.step <= self.steps - 3:
            pending = self.comm.irecv(torch.empty(self.out_shape, device=self.device), self.next,
                                      what="irecv boundary gradient")
            kept = output if self.delayed_grad == "keep" else stage_input.detach()
            self.grads.append((self.step, pending, kept))

    def keeps_graph(self) -> bool:
        """Whether this step's forward graph must outlive its backward (`keep` mode)."""
        return self.next is not None and self.delayed_grad == "keep" and self.step <= self.steps - 3

    def delayed_gradient(self) -> DelayedGradient | None:
        """The gradient for the output of two steps ago, once it is due."""
        if not self.grads or self.grads[0][0] > self.step - 2:
            return None
        _, pending, kept = self.grads.popleft()
        grad = pending.wait()
        if self.delayed_grad == "keep":
            return DelayedGradient(grad, output=kept)
        return DelayedGradient(grad, stage_input=kept)

    def end_step(self):
        """Complete the sends of earlier steps (their receivers have posted them long ago)."""
        done, self.sends = self.sends[:-2], self.sends[-2:]
        for pending in done:
            pending.wait()
        self.step += 1

    def drain(self):
        """Complete everything in flight (end of an epoch, or before a stop's save).

        After a stop inside an epoch, stage k still waits for the gradient of its last
        output, which stage k+1 would have computed next step: stage k+1 sends zeros in
        its place, so every posted receive is matched and nobody hangs."""
        if self.real is not None:
            owed = self.real.wait()
            if self.delayed_grad != "none" and self.step - 1 <= self.steps - 3:
                self.sends.append(self.comm.isend(torch.zeros_like(owed), self.prev, what="isend boundary gradient"))
        for _, pending, _ in self.grads:
            pending.wait()
        for pending in self.sends:
            pending.wait()
        self.start_epoch(self.step)
