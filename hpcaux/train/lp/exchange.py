"""Real activations forward and input gradients back between neighbouring stages, each one
step late (docs/design.md §1, `lp.real_inputs`, `lp.delayed_grad`).

Within an epoch of T steps (step s of the epoch, batch b_s; every rank of a replica draws
the same batches):

* stage k sends its output of step s to stage k+1 (s <= T-2), non-blocking;
* stage k+1 takes it at step s+1 as a real input with its batch's labels, beside (or
  instead of) the AuxNet's prediction, and returns the gradient of its loss with respect
  to that input, non-blocking;
* stage k applies that gradient `delay` steps after it sent the output, to the graph it
  kept of that batch (`keep`: one more batch of activations in memory per step of delay,
  the gradient taken at the weights of the forward, as delayed-gradient methods do).
  `fused` keeps the graph too and holds back stage k's own term of the batch (its local
  classifier and its side of the consistency term) to go through that graph in the same
  backward: one backward of the stage per step instead of two. (Running the batch again
  at the current weights, as Features Replay does, was measured worse and retired:
  docs/results.md.)

With the AuxNet every boundary is its own two-step exchange (`delay` 2): stage k+1 returns
the gradient of the real input in the step it arrives. What a middle stage sends on is its
output on the AuxNet's prediction, or with `relay` (the AuxNet at every boundary) its output
on the real input it received: then the real inputs form a chain, stage k's being the
composition F_{k-1}(...F_0(x)) of the batch drawn k steps back, as in the pipeline, while
every returned gradient stays two steps late, as with the AuxNet; the graph a relaying
stage keeps is that of its real-input forward, and its real-input term includes the
AuxNet's target of that batch (`remember_target`). Without it (`chained`, lp.aux_source
none) the stages form a pipeline: stage k > 0 has no input but the real one, so it runs
batch b_{s-k} at step s, keeps that graph, and back-propagates it only when stage k+1's
gradient for it returns; then it returns its own input gradient of that batch. Stage k's
delay is 2(K-1-k) steps (0 for the last stage, which back-propagates at once), and stage
k keeps that many graphs.

Every receive is posted a step before it is needed, so in steady state no rank waits on
another. The exchange starts afresh every epoch (stage k has no input before step k, and
a batch whose gradient would return after the epoch's end keeps no graph) and every
message of an epoch is received within it, so the point-to-point traffic of evaluation
never meets a training message.

A stop inside an epoch leaves work in flight: messages sent but not yet used, and kept
graphs waiting for their gradients. A graph cannot be saved, so `settle` saves what makes
it again. With the AuxNet (`delay` 2) it finishes what can be finished without changing
the run: stage k+1 computes the gradient of the real input it holds now (at the weights
the next step would use; BatchNorm's running statistics left as they were) and returns
it, and stage k back-propagates both pending gradients through their kept graphs into the
weight copies; it saves the real input and per pending batch the parameter gradients. In
the chained pipeline those gradients depend on steps not yet run, so it saves, per kept
graph, its input, labels and the weights its forward used, and the resume runs that forward again
(`rebuild`) before its backward. Either way a resume (`start_epoch` with that state)
applies them at the steps the uninterrupted run would have, so it ends with the same
weights.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from hpcaux.comm import Comm
from hpcaux.comm.base import Pending
from hpcaux.train.lp.schedule import gradient_delay
from hpcaux.train.lp.weight_stash import SettledGradients, WeightStash
from hpcaux.train.run.layout import Layout


@dataclass
class RealInput:
    """Stage k-1's output of step `origin`, and the labels of its batch."""
    tensor: torch.Tensor       # requires grad: its .grad goes back to stage k-1
    labels: torch.Tensor
    origin: int                # the step of the epoch stage k-1 sent it at
    returned: bool = False     # its gradient went back already (at a stop, before the save)
    target: torch.Tensor | None = None  # `relay`, a middle stage: the AuxNet's target of its batch
    rows: torch.Tensor | None = None    # `relay`, a middle stage: its batch's sample indices (lp.loss al_real)


@dataclass
class DelayedGradient:
    """A batch whose output stage k sent on, waiting for stage k+1's gradient of it (`grad`,
    due at step `due`): the graph it kept (`output`, built on `stash`'s weights) and its input."""
    due: int
    stage_input: torch.Tensor
    output: torch.Tensor | None = None
    own_loss: torch.Tensor | None = None   # `fused`: the stage's own term of that batch
    stash: WeightStash | SettledGradients | None = None  # `keep`, `fused`: the kept graph's weights
    real: RealInput | None = None          # chained: the real input the batch came as
    labels: torch.Tensor | None = None     # chained: its labels (a rebuild's own term needs them)
    pending: Pending | None = None         # the gradient's receive, once posted
    grad: torch.Tensor | None = None       # set once it has arrived

    def awaits_gradient(self) -> bool:
        """Whether stage k+1's gradient is still to be received (not yet posted, and not
        settled at a stop)."""
        return self.pending is None and not isinstance(self.stash, SettledGradients)

    def needs_rebuild(self) -> bool:
        """A kept graph restored from a stop: its forward must run again (the step's `rebuild`)."""
        return self.output is None and isinstance(self.stash, WeightStash)

    def roots(self) -> tuple[list, list]:
        """What its backward starts from, with their gradients: the kept output with `grad`,
        and in `fused` mode the stage's own term of that batch."""
        tensors, grads = [self.output], [self.grad]
        if self.own_loss is not None:
            tensors.append(self.own_loss)
            grads.append(None)
        return tensors, grads


def graphs_in_flight(K: int, stage: int, chained: bool, delayed_grad: str) -> int:
    """How many forward graphs stage `stage` keeps alive while it waits for their
    gradients (none without a delayed gradient)."""
    return gradient_delay(K, stage, chained) if delayed_grad != "none" and stage < K - 1 else 0


class NeighbourExchange:
    def __init__(self, comm: Comm, layout: Layout, shapes: list[tuple], batch_size: int, steps_per_epoch: int,
                 device: torch.device, delayed_grad: str, modules: tuple = (), chained: bool = False,
                 relay: bool = False):
        """`modules`: the stage and its local head (or None), whose parameters the delayed
        gradients reach. `chained`: the pipeline without an AuxNet; `relay`: the AuxNet's
        exchange with the real inputs passed on (module docstring)."""
        self.comm, self.steps, self.device, self.delayed_grad = comm, steps_per_epoch, device, delayed_grad
        self.modules, self.chained = modules, chained
        s, K = layout.stage, layout.K
        self.relays = relay and 0 < s < K - 1  # a middle stage that sends on its real-input output
        self.prev = layout.rank_of(s - 1) if s > 0 else None
        self.next = layout.rank_of(s + 1) if s < K - 1 else None
        self.in_shape = (batch_size, *shapes[s - 1]) if s > 0 else None
        self.out_shape = (batch_size, *shapes[s]) if s < K - 1 else None
        # Steps from sending an output to applying its gradient, here and on stage k-1;
        # steps from a batch's draw to its real input's arrival here; the first step at
        # which stage k-1 has an output to send, and this stage.
        self.delay = gradient_delay(K, s, chained)
        self.prev_delay = gradient_delay(K, s - 1, chained)
        along_chain = chained or relay
        self.lag = s if along_chain else 1
        self.prev_starts = s - 1 if along_chain else 0
        self.first_send = s if along_chain else 0
        self.gradient_wait_s = 0.0  # waiting for returned gradients, since take_gradient_wait
        self.start_epoch(0)

    def start_epoch(self, first_step: int, state: dict | None = None):
        """Fresh state for an epoch (or a resumed epoch) whose first step is `first_step`;
        `state`: what `settle` left at a stop after step `first_step - 1`, to continue it."""
        self.step = first_step
        self.sends: list[Pending] = []
        self.real: Pending | None = None       # real input of the previous step, in flight
        self.real_returned = False
        self.recent_labels: deque = deque(maxlen=self.lag)  # of the last `lag` steps, oldest first
        self.recent_targets: deque = deque(maxlen=self.lag)  # `relay`: the AuxNet's, likewise
        self.recent_rows: deque = deque(maxlen=self.lag)     # `relay`: the batches' sample indices
        self.kept: deque[DelayedGradient] = deque()         # oldest first
        if state:
            self._restore(state)

    def begin_step(self, labels: torch.Tensor) -> RealInput | None:
        """Start the step: post the receive of the gradient due next step, and return the
        real input that arrived for this step (None before stage k-1's first output, or on
        the first stage), posting the receive of the next."""
        for kept in self.kept:
            if kept.due == self.step + 1 and kept.awaits_gradient():
                kept.pending = self.comm.irecv(torch.empty(self.out_shape, device=self.device), self.next,
                                               what="irecv boundary gradient")
        if self.prev is None:
            return None
        real = None
        if self.real is not None:
            real = self._held_real(self.real.wait().requires_grad_(), self.real_returned)
        self.recent_labels.append(labels)
        self.real, self.real_returned = None, False
        if self.prev_starts <= self.step <= self.steps - 2:
            self.real = self.comm.irecv(torch.empty(self.in_shape, device=self.device), self.prev,
                                        what="irecv real activation")
        return real

    def _held_real(self, tensor: torch.Tensor, returned: bool = False) -> RealInput:
        """The real input that arrived for step `self.step` (sent at the step before), with
        the labels and (relayed) the AuxNet target of its batch, remembered `lag` steps ago."""
        return RealInput(tensor, self.recent_labels[0], self.step - 1, returned,
                         self.recent_targets[0] if self.relays else None,
                         self.recent_rows[0] if self.relays else None)

    def remember_target(self, target: torch.Tensor, rows: torch.Tensor):
        """`relay`: this step's AuxNet target and sample indices, for the real input of
        this batch that arrives `lag` steps later."""
        if self.relays:
            self.recent_targets.append(target.detach())
            self.recent_rows.append(rows)

    # --- the receiving side (stage k > 0) ---------------------------------------------
    def return_gradient(self, real: RealInput | None, delayed: DelayedGradient | None):
        """Send back the gradient of the real input whose backward ran this step: this
        step's, or in a chained stage with a successor that of the kept batch just
        back-propagated."""
        if self.chained and self.next is not None:
            real = delayed.real if delayed is not None else None
        if real is None or real.returned or not self._returns_gradient_of(real.origin):
            return
        grad = real.tensor.grad if real.tensor.grad is not None else torch.zeros_like(real.tensor)
        self.sends.append(self.comm.isend(grad, self.prev, what="isend boundary gradient"))

    def _returns_gradient_of(self, origin: int) -> bool:
        """Whether stage k-1's output of step `origin` earns a returned gradient (one that
        would arrive after the epoch's end does not)."""
        return self.delayed_grad != "none" and origin + self.prev_delay <= self.steps - 1

    # --- the sending side (stage k < K-1) ---------------------------------------------
    def send_output(self, output: torch.Tensor, stage_input: torch.Tensor, own_loss: torch.Tensor | None = None,
                    stash: WeightStash | None = None, real: RealInput | None = None,
                    labels: torch.Tensor | None = None):
        """Send this batch's output on; keep what the delayed gradient will need: the graph
        and the weights it used (`stash`) or the input, in `fused` mode the own term
        `own_loss` that waits for it, and (chained) the real input it came as and the labels."""
        if self.next is None:
            return
        if self.step <= self.steps - 2:
            self.sends.append(self.comm.isend(output, self.next, what="isend real activation"))
        if self.delayed_grad != "none" and self._keeps(self.step):
            self.kept.append(DelayedGradient(self.step + self.delay, stage_input, output=output, own_loss=own_loss,
                                             stash=stash, real=real, labels=labels))

    def _keeps(self, step: int) -> bool:
        """Whether the gradient for the output of `step` returns within the epoch."""
        return self.next is not None and self.first_send <= step and step + self.delay <= self.steps - 1

    def keeps_graph(self) -> bool:
        """Whether this step's forward graph must outlive its backward (`keep`, `fused`)."""
        return self.delayed_grad != "none" and self._keeps(self.step)

    def defers_own_term(self) -> bool:
        """Whether this step's own term waits for the returned gradient (`fused` mode; not
        where the kept graph is a relaying stage's real-input forward, whose term's input
        gradient goes back at once)."""
        return self.delayed_grad == "fused" and self.keeps_graph() and not self.relays

    def delayed_gradient(self) -> DelayedGradient | None:
        """The kept batch whose gradient is due this step, with the gradient."""
        if not self.kept or self.kept[0].due > self.step:
            return None
        kept = self.kept.popleft()
        if kept.pending is not None:  # None: settled at a stop
            t0 = time.perf_counter()
            kept.grad = kept.pending.wait()
            self.gradient_wait_s += time.perf_counter() - t0
        return kept

    def take_gradient_wait(self) -> float:
        """Seconds spent waiting for returned gradients since the last call. The wait sits
        inside the backward pass; the step counts it as communication, not stage time,
        so that the stage times show the stages' imbalance and not their waits."""
        waited, self.gradient_wait_s = self.gradient_wait_s, 0.0
        return waited

    def end_step(self):
        """Complete the sends of earlier steps (their receivers have posted them long ago)."""
        done, self.sends = self.sends[:-2], self.sends[-2:]
        for pending in done:
            pending.wait()
        self.step += 1

    def drain(self):
        """The end of an epoch: complete the last sends (nothing else is in flight then)."""
        for pending in self.sends:
            pending.wait()
        self.start_epoch(self.step)

    # --- a stop inside the epoch --------------------------------------------------------
    def settle(self, input_gradient) -> dict:
        """A stop after this epoch's step `self.step - 1`: settle the work in flight and
        return what a resume needs (module docstring). `input_gradient(real)`: this stage's
        gradient of its real-input term with respect to the RealInput `real` (its tensor,
        labels and, relayed, target), as the next step would compute it (with the AuxNet only)."""
        state = self._save_chained() if self.chained else self._settle_two_step(input_gradient)
        for pending in self.sends:
            pending.wait()
        self.start_epoch(self.step)
        return state

    def _settle_two_step(self, input_gradient) -> dict:
        """With the AuxNet: finish both pending gradients now. Stage k+1 sends before
        stage k waits, so a middle stage (both roles) cannot deadlock."""
        state: dict = {"real": None, "labels": list(self.recent_labels), "targets": list(self.recent_targets),
                       "rows": list(self.recent_rows), "delayed": []}
        if self.real is not None:
            real = self.real.wait()
            returned = self._returns_gradient_of(self.step - 1)
            if returned:
                self.sends.append(self.comm.isend(input_gradient(self._held_real(real)), self.prev,
                                                  what="isend boundary gradient (stop)"))
            state["real"] = {"tensor": real, "returned": returned}
        for kept in self.kept:
            if isinstance(kept.stash, SettledGradients):  # settled at the last stop, not yet due
                state["delayed"].append({"due": kept.due, "parameter_grads": kept.stash.saved})
                continue
            pending = kept.pending or self.comm.irecv(torch.empty(self.out_shape, device=self.device), self.next,
                                                      what="irecv boundary gradient (stop)")
            kept.grad = pending.wait()
            torch.autograd.backward(*kept.roots())
            state["delayed"].append({"due": kept.due, "parameter_grads": kept.stash.take_gradients()})
        return state

    def _save_chained(self) -> dict:
        """The chained pipeline: save what arrived and what rebuilds each kept graph; the
        weights once per version (the micro-batches of a step share theirs, step.py)."""
        state: dict = {"real": None, "labels": list(self.recent_labels), "kept": [], "versions": []}
        if self.real is not None:
            state["real"] = {"tensor": self.real.wait(), "returned": False}
        version_of: dict[int, int] = {}
        for kept in self.kept:
            if kept.stash is not None and id(kept.stash) not in version_of:
                version_of[id(kept.stash)] = len(state["versions"])
                state["versions"].append(kept.stash.saved())
            state["kept"].append({
                "due": kept.due, "grad": kept.pending.wait() if kept.pending is not None else None,
                "stage_input": kept.stage_input.detach(), "labels": kept.labels,
                "origin": kept.real.origin if kept.real is not None else None,
                "version": version_of.get(id(kept.stash))})
        return state

    def _restore(self, state: dict):
        def ready(tensor):  # a message that arrived before the save
            return Pending(self.comm, None, "restored", [], tensor.to(self.device))
        self.recent_labels.extend(labels.to(self.device) for labels in state["labels"])
        self.recent_targets.extend(target.to(self.device) for target in state.get("targets", []))
        self.recent_rows.extend(state.get("rows", []))
        if state["real"] is not None:
            self.real, self.real_returned = ready(state["real"]["tensor"]), state["real"]["returned"]
        versions = [WeightStash.restored(self.modules, weights, self.device) for weights in state.get("versions", [])]
        for item in state.get("kept", []):
            grad = ready(item["grad"]) if item["grad"] is not None else None
            labels = item["labels"].to(self.device) if item["labels"] is not None else None
            stage_input = item["stage_input"].to(self.device)
            real = RealInput(stage_input.requires_grad_(), labels, item["origin"]) if item["origin"] is not None \
                else None
            stash = versions[item["version"]] if item["version"] is not None else None
            self.kept.append(DelayedGradient(item["due"], stage_input, stash=stash, real=real, labels=labels,
                                             pending=grad))
        for item in state.get("delayed", []):
            grads = [{n: g.to(self.device) for n, g in named.items()} if named is not None else None
                     for named in item["parameter_grads"]]
            self.kept.append(DelayedGradient(item["due"], None, stash=SettledGradients(self.modules, grads)))
