"""Stored auxiliary variables (lp.aux_source: stored): where a stage's input and target
come from when there is no AuxNet to predict them.

z_k, the activation at boundary k of every training sample, is a free variable in
RUN/aux.h5 (docs/algorithm.md): stage k reads it as its target and stage k+1 as its
input, and after each step both sides' gradients move the batch's rows. The first forward
of the initial composed network fills it.
"""
from __future__ import annotations

import math

import torch

from hpcaux.store.names import z_name


class StoredZ:
    """A rank's stored z: the rows of its input and target boundaries (None at an end)."""

    def __init__(self, store, comm, group, shapes, in_boundary: int | None, out_boundary: int | None,
                 z_lr: float, device):
        self.store, self.comm, self.group, self.shapes = store, comm, group, shapes
        self.z_lr, self.device = z_lr, device
        self.in_boundary, self.out_boundary = in_boundary, out_boundary

    @torch.no_grad()
    def initialise(self, stages, data, batch: int, barrier):
        """z of every training sample for this rank's boundaries, from a forward pass of
        the initial composed network. Every rank holds the whole initial model (same
        seed), so ranks k and k+1 compute the same z_k without communicating; they write
        it to the store (its owner only, in mpio mode)."""
        boundaries = [b for b in (self.in_boundary, self.out_boundary) if b is not None]
        for st in stages:
            st.eval()
        for start in range(0, data.n_train, batch):
            idx = torch.arange(start, min(start + batch, data.n_train))
            h = data.normalized_train(idx, self.device)
            for b in range(max(boundaries) + 1):
                h = stages[b](h)
                if b in boundaries:
                    self.store.fill_rows(z_name(b), start, h)
        for st in stages:
            st.train()
        self.store.flush(barrier)

    def read(self, x, idx) -> tuple:
        """(input, target) of a batch: its z rows as leaves to differentiate (the image as
        the first stage's input, no target on the last)."""
        def rows(b):
            return self.store.read_rows(z_name(b), idx).to(self.device).requires_grad_()
        return (x if self.in_boundary is None else rows(self.in_boundary),
                None if self.out_boundary is None else rows(self.out_boundary))

    def step(self, inp, target, idx, rho: float, vote, stats) -> int:
        """Step each boundary's z of the batch with the gradients of the two stages that see
        it; returns the values allreduced.

        The two sides are preconditioned apart (docs/algorithm.md): the consistency term
        of stage k (z is its target) by B x elements / rho, so it moves z a fraction z_lr
        of the way to its minimiser F_k + lambda/rho; stage k+1's term (z is its input) by
        B, so it moves z by z_lr x its per-sample gradient. Preconditioning both by
        B x elements, as first built, multiplied stage k+1's gradient by the element count
        (16,384 for ResNet-20 cut after block 4) and z diverged.
        """
        batch = len(idx)
        grads = [torch.zeros(batch, *shape, device=self.device) for shape in self.shapes]
        if self.in_boundary is not None:
            grads[self.in_boundary] += inp.grad * batch
        if self.out_boundary is not None:
            grads[self.out_boundary] += target.grad * (batch * math.prod(self.shapes[self.out_boundary]) / rho)
        # D = 1 in stored mode, so the replica group is the world and carries the stop vote.
        self.comm.allreduce(grads + [vote.cast()], op="sum", group=self.group, what="allreduce stored-z gradients")
        for b, t in ((self.in_boundary, inp), (self.out_boundary, target)):
            if b is None:
                continue
            updated = t.detach() - self.z_lr * grads[b]
            self.store.write_rows(z_name(b), idx, updated)
            if b == self.out_boundary:
                stats.add(updated)
        return sum(g.numel() for g in grads)
