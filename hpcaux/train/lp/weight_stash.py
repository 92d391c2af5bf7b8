"""The weights a kept forward graph was built on, and where its gradients go.

A stage that keeps a micro-batch's graph until stage k+1 returns its gradient (the
`keep` and `fused` delayed gradients, exchange.py) takes one optimiser step or more in
between. The stash runs the forward on copies of the weights, so the step's in-place
update does not break the graph, and adds what reached the copies to the parameters
when the gradient is applied. SettledGradients is the same for a gradient settled at a
stop and restored from the checkpoint.
"""
from __future__ import annotations

import torch


def add_gradients(modules, gradients):
    """Add `gradients` (per module: parameter name -> gradient, or None) to the modules'
    parameters' .grad."""
    for module, named in zip(modules, gradients):
        if module is None or named is None:
            continue
        for name, p in module.named_parameters():
            g = named.get(name)
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


class WeightStash:
    """The weights a kept graph is built on, copied, so the optimiser's in-place steps of
    the two steps before its backward do not change them (`keep`, `fused`).

    The forward runs on copies of the stage's (and local head's) parameters, so the
    delayed gradient is taken at the weights the forward used, as delayed-gradient
    methods do, and `move_gradients` adds what reached the copies to the real parameters.
    It replaces torch's allow_mutation_on_saved_tensors, whose bookkeeping kept every
    step's graph alive until the context closed (14 GB per rank after a 78-step epoch)
    and sent every operation through a Python dispatch mode."""

    def __init__(self, *modules, optimizer: torch.optim.Optimizer | None = None, steps_ahead: int = 0):
        """`steps_ahead` > 0 (lp.weight_prediction): copy the weights predicted that many
        steps ahead by `optimizer`'s momentum, w - steps_ahead x lr x buffer, where the
        delayed gradient will be applied (SpecTrain's prediction for pipelines); the forward
        then runs there too, which also makes the output stage k+1 trains on less stale."""
        ahead = _predicted_steps(optimizer, steps_ahead) if steps_ahead else {}
        self.copies = [{n: (p.detach() - ahead[p] if p in ahead else p.detach().clone()).requires_grad_()
                        for n, p in m.named_parameters()} if m else None
                       for m in modules]
        self.modules = modules
        self.repeats_forward = False

    def run(self, which: int, *args):
        """Module `which` (in the order given) applied to args with the stashed weights. A
        restored stash runs a forward its step already counted in BatchNorm's running
        statistics, so it updates copies of them instead (put back after the forward, the
        originals would fail autograd's version check in the backward)."""
        module, tensors = self.modules[which], self.copies[which]
        if self.repeats_forward:
            tensors = {**tensors, **{n: b.clone() for n, b in module.named_buffers()}}
        return torch.func.functional_call(module, tensors, args)

    @classmethod
    def live(cls, modules: tuple) -> "WeightStash":
        """The modules' own parameters, with BatchNorm's running statistics counted in
        copies: for a forward made ahead of its step (the exchange's settle), which the step
        will count itself. Putting the statistics back in place instead would bump their
        version, and a graph kept on them would then fail autograd's version check."""
        return cls._on_buffer_copies(modules, [dict(m.named_parameters()) if m is not None else None
                                               for m in modules])

    def saved(self) -> list:
        """The copied weights, to save at a stop (`restored` makes the stash again)."""
        return [{n: c.detach().clone() for n, c in copies.items()} if copies is not None else None
                for copies in self.copies]

    @classmethod
    def restored(cls, modules: tuple, weights: list, device) -> "WeightStash":
        """The stash `saved` returned, on `device`."""
        return cls._on_buffer_copies(modules, [{n: w.to(device).requires_grad_() for n, w in named.items()}
                                               if named is not None else None for named in weights])

    @classmethod
    def _on_buffer_copies(cls, modules: tuple, copies: list) -> "WeightStash":
        """A stash of the given weights whose forwards count BatchNorm's running statistics
        in copies (`run`): for a forward its step has counted already, or will count itself."""
        stash = cls.__new__(cls)
        stash.modules, stash.copies, stash.repeats_forward = modules, copies, True
        return stash

    def take_gradients(self) -> list:
        """What the copies received since the last take, per module parameter name ->
        gradient; the copies start afresh (the kept graphs of a step's micro-batches share
        them, and each one's gradients are taken on their own)."""
        taken = [{name: c.grad for name, c in copies.items() if c.grad is not None} if copies is not None else None
                 for copies in self.copies]
        for copies in self.copies:
            for c in (copies or {}).values():
                c.grad = None
        return taken

    def move_gradients(self):
        """Add the gradients the copies received to the real parameters' .grad."""
        add_gradients(self.modules, self.take_gradients())


def _predicted_steps(optimizer: torch.optim.Optimizer, steps: int) -> dict:
    """Per parameter, how far `steps` more steps of SGD with momentum move it: steps x lr x
    the momentum buffer (nothing for a parameter without one yet, before the first step)."""
    moves = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                moves[p] = buffer * (steps * group["lr"])
    return moves


class SettledGradients:
    """A kept graph's parameter gradients, taken at a stop and restored from the
    checkpoint: applied like a WeightStash's at the step that was due to back-propagate it."""

    def __init__(self, modules, gradients: list):
        self.modules, self.saved = modules, gradients

    def move_gradients(self):
        add_gradients(self.modules, self.saved)
