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
  `fused` keeps the graph too and holds back stage k's own term of b_s (its local
  classifier and its side of the consistency term) to go through that graph in the same
  backward: one backward of the stage per step instead of two, the own term's gradient
  two steps late like the returned one.

Every receive is posted a step before it is needed, so in steady state no rank waits on
another. The exchange starts afresh every epoch (the first step has no real input, the
first two no delayed gradient) and every message of an epoch is received within it, so
the point-to-point traffic of evaluation never meets a training message.

A stop inside an epoch (`settle`) leaves two steps' work in flight: stage k+1 holds stage
k's output of the last step, and stage k owes the kept graphs of its last two batches
their returned gradients. Neither a message nor a graph can be saved, so `settle` finishes
what can be finished without changing the run: stage k+1 computes the gradient of that
real input now (at the weights the next step would use; BatchNorm's running statistics
left as they were) and returns it, and stage k back-propagates both returned gradients
through their kept graphs into the weight copies. What is left is saved (`state`): the
real input and its labels, and per pending batch the parameter gradients (`keep`,
`fused`) or the input and the returned gradient (`replay`). A resume (`start_epoch` with
that state) applies them at the steps the uninterrupted run would have, so it ends with
the same weights.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from hpcaux.comm import Comm
from hpcaux.comm.base import Pending
from hpcaux.train.run.layout import Layout


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

    def run(self, which: int, *args):
        """Module `which` (in the order given) applied to args with the stashed weights."""
        return torch.func.functional_call(self.modules[which], self.copies[which], args)

    def gradients(self) -> list:
        """What the copies received so far: per module, parameter name -> gradient."""
        return [{name: c.grad for name, c in copies.items() if c.grad is not None} if copies is not None else None
                for copies in self.copies]

    def move_gradients(self):
        """Add the gradients the copies received to the real parameters' .grad."""
        add_gradients(self.modules, self.gradients())
        for copies in self.copies:
            for c in (copies or {}).values():
                c.grad = None


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


@dataclass
class RealInput:
    """Stage k-1's output on the previous batch, and that batch's labels."""
    tensor: torch.Tensor       # requires grad: its .grad goes back to stage k-1
    labels: torch.Tensor
    returned: bool = False     # its gradient went back already (at a stop, before the save)


@dataclass
class DelayedGradient:
    """What stage k back-propagates this step: `grad` of its output on an earlier batch,
    whose graph it kept (`output`) or whose input it replays (`stage_input`)."""
    grad: torch.Tensor | None            # set once it has arrived
    output: torch.Tensor | None = None
    stage_input: torch.Tensor | None = None
    own_loss: torch.Tensor | None = None   # `fused`: the stage's own term of that batch
    stash: WeightStash | SettledGradients | None = None  # `keep`, `fused`: the kept graph's weights

    def roots(self, stage) -> tuple[list, list]:
        """What its backward starts from, with their gradients: the kept output (or, in
        `replay`, the input run again through `stage`) with `grad`, and in `fused` mode the
        stage's own term of that batch."""
        tensors = [self.output if self.output is not None else stage(self.stage_input)]
        grads = [self.grad]
        if self.own_loss is not None:
            tensors.append(self.own_loss)
            grads.append(None)
        return tensors, grads


KEEPS_GRAPH = ("keep", "fused")


class NeighbourExchange:
    def __init__(self, comm: Comm, layout: Layout, shapes: list[tuple], batch_size: int, steps_per_epoch: int,
                 device: torch.device, delayed_grad: str, modules: tuple = ()):
        """`modules`: the stage and its local head (or None), whose parameters the delayed
        gradients reach."""
        self.comm, self.steps, self.device, self.delayed_grad = comm, steps_per_epoch, device, delayed_grad
        self.modules = modules
        s = layout.stage
        self.prev = layout.rank_of(s - 1) if s > 0 else None
        self.next = layout.rank_of(s + 1) if s < layout.K - 1 else None
        self.in_shape = (batch_size, *shapes[s - 1]) if s > 0 else None
        self.out_shape = (batch_size, *shapes[s]) if s < layout.K - 1 else None
        self.start_epoch(0)

    def start_epoch(self, first_step: int, state: dict | None = None):
        """Fresh state for an epoch (or a resumed epoch) whose first step is `first_step`;
        `state`: what `settle` left at a stop after step `first_step - 1`, to continue it."""
        self.step = first_step
        self.sends: list[Pending] = []
        self.real: Pending | None = None       # real input of the previous step, in flight
        self.labels: torch.Tensor | None = None
        self.real_returned = False
        self.grads: deque = deque()            # (step, Pending grad, DelayedGradient), oldest first
        if state:
            self._restore(state)

    # --- the receiving side (stage k > 0) ---------------------------------------------
    def real_input(self, labels: torch.Tensor) -> RealInput | None:
        """The real input of the previous batch (None on an epoch's first step); posts the
        receive for this batch's, to be used next step."""
        if self.prev is None:
            return None
        real = None
        if self.real is not None:
            real = RealInput(self.real.wait().requires_grad_(), self.labels, self.real_returned)
        self.real, self.labels, self.real_returned = None, labels, False
        if self.step <= self.steps - 2:
            self.real = self.comm.irecv(torch.empty(self.in_shape, device=self.device), self.prev,
                                        what="irecv real activation")
        return real

    def return_gradient(self, real: RealInput | None):
        """Send the gradient of this rank's loss with respect to the real input back."""
        if real is None or real.returned or not self._returns_gradient_of(self.step - 1):
            return
        grad = real.tensor.grad if real.tensor.grad is not None else torch.zeros_like(real.tensor)
        self.sends.append(self.comm.isend(grad, self.prev, what="isend boundary gradient"))

    # --- the sending side (stage k < K-1) ---------------------------------------------
    def send_output(self, output: torch.Tensor, stage_input: torch.Tensor, own_loss: torch.Tensor | None = None,
                    stash: WeightStash | None = None):
        """Send this batch's output on; keep what the delayed gradient will need: the graph
        and the weights it used (`stash`) or the input, and in `fused` mode the own term
        `own_loss` that waits for it."""
        if self.next is None:
            return
        if self.step <= self.steps - 2:
            self.sends.append(self.comm.isend(output, self.next, what="isend real activation"))
        if self.delayed_grad != "none" and self.step <= self.steps - 3:
            pending = self.comm.irecv(torch.empty(self.out_shape, device=self.device), self.next,
                                      what="irecv boundary gradient")
            kept = DelayedGradient(None, output=output, own_loss=own_loss, stash=stash) if self.delayed_grad in KEEPS_GRAPH \
                else DelayedGradient(None, stage_input=stage_input.detach())
            self.grads.append((self.step, pending, kept))

    def keeps_graph(self) -> bool:
        """Whether this step's forward graph must outlive its backward (`keep` mode)."""
        return self.next is not None and self.delayed_grad in KEEPS_GRAPH and self.step <= self.steps - 3

    def defers_own_term(self) -> bool:
        """Whether this step's own term waits for the returned gradient (`fused` mode)."""
        return self.delayed_grad == "fused" and self.keeps_graph()

    def delayed_gradient(self) -> DelayedGradient | None:
        """The gradient for the output of two steps ago, once it is due."""
        if not self.grads or self.grads[0][0] > self.step - 2:
            return None
        _, pending, kept = self.grads.popleft()
        kept.grad = pending.wait() if pending is not None else None  # None: settled at a stop
        return kept

    def end_step(self):
        """Complete the sends of earlier steps (their receivers have posted them long ago)."""
        done, self.sends = self.sends[:-2], self.sends[-2:]
        for pending in done:
            pending.wait()
        self.step += 1

    def _returns_gradient_of(self, step: int) -> bool:
        """Whether the real input that stage k+1 got from step `step`'s output earns a
        returned gradient (the last two steps' would come after the epoch's end)."""
        return self.delayed_grad != "none" and step <= self.steps - 3

    def drain(self):
        """The end of an epoch: complete the last sends (nothing else is in flight then)."""
        for pending in self.sends:
            pending.wait()
        self.start_epoch(self.step)

    def settle(self, input_gradient) -> dict:
        """A stop after this epoch's step `self.step - 1`: finish the work in flight that
        can be finished without changing the run and return what a resume needs (module
        docstring). `input_gradient(real, labels)`: this stage's gradient of its real-input
        term with respect to `real`, as the next step would compute it. Stage k+1 sends
        before stage k waits, so a middle stage (both roles) cannot deadlock."""
        state: dict = {"real": None, "delayed": []}
        if self.real is not None:
            real = self.real.wait()
            returned = self._returns_gradient_of(self.step - 1)
            if returned:
                self.sends.append(self.comm.isend(input_gradient(real, self.labels), self.prev,
                                                  what="isend boundary gradient (stop)"))
            state["real"] = {"tensor": real, "labels": self.labels, "returned": returned}
        for step, pending, kept in self.grads:
            kept.grad = pending.wait()
            if kept.stage_input is not None:  # replay: it runs at the weights of its due step
                state["delayed"].append({"step": step, "grad": kept.grad, "stage_input": kept.stage_input})
                continue
            torch.autograd.backward(*kept.roots(self.modules[0]))
            state["delayed"].append({"step": step, "parameter_grads": kept.stash.gradients()})
        for pending in self.sends:
            pending.wait()
        self.start_epoch(self.step)
        return state

    def _restore(self, state: dict):
        def ready(tensor):  # a message that arrived before the save
            return Pending(self.comm, None, "restored", [], tensor.to(self.device))
        if state["real"] is not None:
            self.real, self.labels = ready(state["real"]["tensor"]), state["real"]["labels"].to(self.device)
            self.real_returned = state["real"]["returned"]
        for item in state["delayed"]:
            if "stage_input" in item:
                kept = DelayedGradient(None, stage_input=item["stage_input"].to(self.device))
                self.grads.append((item["step"], ready(item["grad"]), kept))
            else:
                grads = [{n: g.to(self.device) for n, g in named.items()} if named is not None else None
                         for named in item["parameter_grads"]]
                self.grads.append((item["step"], None, DelayedGradient(None, stash=SettledGradients(self.modules, grads))))
