"""One layer-parallel training step of one rank (docs/design.md §1–§2).

  1. inputs: the AuxNet heads the rank needs (A_{k-1}(x) as its input, A_k(x) as its
     target), the stored z of the batch (aux_source: stored), or only the image for the
     first stage (aux_source: none, where every later stage trains on real inputs alone);
     with lp.real_inputs, stage k-1's real output of the batch, from the neighbour
     exchange or (lp.real_inputs: stored) from last epoch's rows in the store;
  2. gradients: forward and backward of the rank's own term (losses.stage_term), then the
     input/target gradients back-propagated into the AuxNet (a separate backward, timed on
     its own); once per micro-batch (parallel.microbatches), the gradients averaged over them;
  3. synchronise: ONE world allreduce of the AuxNet gradients (summed over stages,
     averaged over replicas), the AuxNet BatchNorm buffers (averaged) and the stop vote,
     or the stored z gradients of the batch over the replica, or (aux_source none) the
     stop vote alone; when D > 1, the stage gradients' average over its process set;
  4. apply: the optimiser steps, the AL multiplier update, the stored-z step.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from hpcaux.comm import Comm
from hpcaux.config import Config
from hpcaux.store.names import lambda_name, lambda_real_name
from hpcaux.train.lp.losses import StageTerm, al_update, real_input_term, relative_gap, stage_term
from hpcaux.train.lp.exchange import NeighbourExchange
from hpcaux.train.lp.modules import aux_buffers
from hpcaux.train.lp.store import SampleStats
from hpcaux.train.lp.step_outputs import StepOutputs
from hpcaux.train.lp.stored_real import StoredRealInputs
from hpcaux.train.lp.stored_z import StoredZ
from hpcaux.train.lp.weight_stash import WeightStash
from hpcaux.train.run.layout import Layout
from hpcaux.train.run.optim import make_criterion
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.stop_request import StopVote


class LayerParallelStep:
    """A rank's training step; the trainer wires it and calls it once per batch."""

    def __init__(self, cfg: Config, layout: Layout, comm: Comm, device, *, stage, local_head, auxnet,
                 stage_opt, aux_opt, store, shapes, stage_group, replica_group, stop_vote: StopVote,
                 precision: Precision, exchange: NeighbourExchange | None = None,
                 stored_real: StoredRealInputs | None = None):
        self.cfg, self.layout, self.comm, self.device, self.precision = cfg, layout, comm, device, precision
        self.stage, self.local_head, self.auxnet = stage, local_head, auxnet
        self.stage_opt, self.aux_opt, self.store, self.shapes = stage_opt, aux_opt, store, shapes
        self.stage_group, self.replica_group, self.stop_vote = stage_group, replica_group, stop_vote
        self.exchange, self.stored_real = exchange, stored_real
        self.criterion = make_criterion(cfg.optim)
        self.stage_params = list(stage.parameters()) + (list(local_head.parameters()) if local_head else [])
        s = layout.stage
        self.in_boundary = s - 1 if s > 0 else None
        self.out_boundary = s if s < layout.K - 1 else None
        self.has_multipliers = cfg.lp.loss == "al" and self.out_boundary is not None
        self.has_real_multipliers = cfg.lp.loss == "al_real" and self.in_boundary is not None \
            and self.out_boundary is not None  # a middle stage
        self.stored_z = StoredZ(store, comm, replica_group, shapes, self.in_boundary, self.out_boundary, cfg.lp.z_lr,
                                device) if cfg.lp.aux_source == "stored" else None
        self.allreduce_values = 0
        self.epoch_stats = self.fresh_stats()
        self.weight_version: WeightStash | None = None  # this step's, shared by its kept micro-batches
        self.rho = cfg.lp.rho0  # the last step's (a stop's real_input_gradient takes the next step's)

    @staticmethod
    def fresh_stats() -> dict:
        """Per-sample statistics of what this rank writes in an epoch (multipliers, z)."""
        return {"multiplier": SampleStats(), "z": SampleStats()}

    # --- 1. inputs ----------------------------------------------------------------------
    def inputs(self, x, idx, real=None, with_input: bool = True):
        """(stage input, target, AuxNet outputs to back-propagate into) for a batch;
        `with_input=False` skips the input head (a stage that trains on a real input only).
        Without an AuxNet a later stage's input is `real` (None until the pipeline reaches it)."""
        if self.cfg.lp.aux_source == "none":
            return (x if self.in_boundary is None else real.tensor if real is not None else None), None, {}
        if self.stored_z is not None:
            return (*self.stored_z.read(x, idx), {})
        wanted = [b for b in (self.in_boundary if with_input else None, self.out_boundary) if b is not None]
        with self.precision.autocast():
            preds = self.auxnet(self.precision.input(x), wanted) if wanted else {}
        preds = {b: p.float() for b, p in preds.items()}
        inp = x if self.in_boundary is None else preds[self.in_boundary].detach().requires_grad_() \
            if with_input else None
        target = None if self.out_boundary is None else preds[self.out_boundary].detach().requires_grad_()
        return inp, target, preds

    # --- 2. + 3. gradients and the step's communication ---------------------------------
    def compute_gradients(self, x, y, idx, rho: float) -> StepOutputs:
        """Forward, backward and the step's communication; leaves synchronised .grad. With
        parallel.microbatches M > 1 the batch goes through the pipeline as M micro-batches, each
        one step of the exchange, and .grad (the stage's and the AuxNet's) holds the mean
        of their gradients."""
        self.stage_opt.zero_grad(set_to_none=True)
        if self.aux_opt:
            self.aux_opt.zero_grad(set_to_none=True)
        self.weight_version, self.rho = None, rho
        M = self.cfg.parallel.microbatches
        if M == 1:
            step = self._micro_step(x, y, idx, rho)
        else:
            chunks = zip(x.chunk(M) if x is not None else [None] * M, y.chunk(M), idx.chunk(M))
            step = StepOutputs.merged([self._micro_step(*chunk, rho) for chunk in chunks])
            for p in self.stage_params + (list(self.auxnet.parameters()) if self.auxnet is not None else []):
                if p.grad is not None:
                    p.grad.div_(M)
        self.stop_vote.loss_finite = torch.isfinite(step.term.loss.detach())  # read with the vote, not now
        t0 = time.perf_counter()
        self._synchronise(step.inp, step.target, idx, rho)
        step.times["comm_s"] += time.perf_counter() - t0
        return step

    def _micro_step(self, x, y, idx, rho: float) -> StepOutputs:
        """Forward and backward of one batch (or micro-batch) with the exchange's messages; adds to .grad.

        With the neighbour exchange (lp.real_inputs), stage k also trains on stage k-1's
        real output of the previous step, sends its own output on, back-propagates the
        gradient stage k+1 returned for an earlier output, and returns its input gradient
        (without an AuxNet the real input is the stage's only one: exchange.py). With
        lp.real_inputs stored the real input is stage k-1's output of last epoch, read from
        the store, and this stage's real output is written there (stored_real.py). Relayed
        (LayerParallelConfig.relays) a middle stage sends on its output on the real input
        instead of that on the AuxNet's prediction, and keeps that graph for the returned
        gradient."""
        t0 = time.perf_counter()
        exchange, lp = self.exchange, self.cfg.lp
        real = exchange.begin_step(y) if exchange else self.stored_real.read(idx, y) if self.stored_real else None
        chained = exchange is not None and exchange.chained
        beside = real is not None and not chained  # a real input besides (or instead of) the AuxNet's
        primary = not (beside and lp.real_inputs == "only" and self.layout.is_last)
        t_wait = time.perf_counter() - t0
        inp, target, preds = self.inputs(x, idx, real, with_input=primary)
        labels = real.labels if chained and real is not None else y
        t1 = time.perf_counter()
        multiplier = self.store.read_rows(lambda_name(self.out_boundary), idx).to(self.device) \
            if self.has_multipliers else None
        terms, out, real_out = [], None, None
        relays = exchange is not None and exchange.relays
        stash = self._weight_version() if exchange and exchange.keeps_graph() else None
        primary_stash = None if relays else stash  # the kept graph: the real-input forward's where relayed
        primary = primary and inp is not None  # aux_source none: a later stage waits for its first real input
        if primary:
            out = self.precision.forward((lambda h: stash.run(0, h)) if primary_stash else self.stage, inp)
            terms.append(self._own_term(out, target, labels, rho, multiplier, primary_stash))
        if relays:
            exchange.remember_target(target, idx)
        real_multiplier = None
        if beside:
            real_term, real_out, multiplier_before = self._real_term(real, rho, stash if relays else None)
            terms.append(real_term)
            if multiplier_before is not None:
                real_multiplier = (real.rows, multiplier_before, real_term.residual)
        total = sum(t.loss for t in terms) if terms else torch.zeros((), device=self.device)
        sent = ((real_out, real.tensor) if beside else None) if relays else (out, inp) if primary else None
        tensors, grads = self._backward_now(terms, total, target, primary, sent, stash,
                                            real if chained else None, labels)
        delayed = self._backward(tensors, grads, stash)
        if exchange:
            exchange.return_gradient(real, delayed)
        t2 = time.perf_counter()
        self._backward_into_auxnet(preds, inp, target)
        t3 = time.perf_counter()
        if exchange:
            exchange.end_step()
        if self.stored_real:
            self._store_real_output(idx, out, real, real_out)
        grad_wait = exchange.take_gradient_wait() if exchange else 0.0  # inside the backward, t1..t2
        t_comm = t_wait + grad_wait + time.perf_counter() - t3
        return StepOutputs(StageTerm.combined(terms, total), out.detach() if out is not None else None, target,
                           multiplier, inp, {"aux_s": (t1 - t0 - t_wait) + (t3 - t2), "stage_s": t2 - t1 - grad_wait,
                                             "comm_s": t_comm}, real_multiplier)

    def _backward(self, tensors: list, grads: list, stash):
        """One backward from this step's roots and what the exchange has due now
        (_add_delayed); gradients computed at a kept weight version move to the live
        weights. Returns the exchange's delayed gradient (None without one)."""
        delayed = self._add_delayed(tensors, grads)
        if tensors:
            torch.autograd.backward(tensors, grads, retain_graph=stash is not None)
        for used in (stash, delayed.stash if delayed else None):
            if used:
                used.move_gradients()
        return delayed

    def _backward_into_auxnet(self, preds: dict, inp, target):
        """The gradients the stage left on its input and target, back through the AuxNet
        heads that predicted them (a backward of its own, so its cost is timed apart)."""
        if self.auxnet is None:
            return
        pairs = [(preds[b], t.grad) for b, t in ((self.in_boundary, inp), (self.out_boundary, target))
                 if b is not None and t is not None and t.grad is not None]
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])

    def _weight_version(self) -> WeightStash:
        """The copy of this step's weights that kept graphs are built on. Every micro-batch
        of a step runs at the same weights, so they share one copy (PipeDream-2BW's weight
        versions: with M >= 2(K-1) a stage holds at most two), not one per kept graph."""
        if self.weight_version is None:
            lp = self.cfg.lp
            self.weight_version = WeightStash(self.stage, self.local_head, optimizer=self.stage_opt,
                                              steps_ahead=lp.weight_prediction * self.exchange.delay
                                              / (2 * self.cfg.parallel.microbatches))
        return self.weight_version

    def _store_real_output(self, idx, out, real, real_out):
        """This stage's real output for stage k+1's next epoch: on the image (the first
        stage), or on the stored real inputs of the batch (a middle stage)."""
        if self.in_boundary is None:
            self.stored_real.write(idx, out)
        elif real is not None:
            self.stored_real.write(real.rows, real_out)

    def _own_term(self, out, target, labels, rho: float, multiplier, stash) -> StageTerm:
        """The stage's own term of a batch from its output (one function for the step and
        for a kept graph's `rebuild`); the local head runs on the stash's weights when the
        graph is kept."""
        head = (lambda h: stash.run(1, h)) if stash and self.local_head else self.local_head
        lp = self.cfg.lp
        with self.precision.autocast():
            return stage_term(out, target, labels, is_last=self.layout.is_last, rho=rho, multiplier=multiplier,
                              local_head=head, local_weight=lp.local_cls_weight, criterion=self.criterion)

    def _backward_now(self, terms, total, target, primary: bool, sent, stash, real, labels) -> tuple[list, list]:
        """Send this step's output on (`sent`: the output and the input it was computed
        from, or None) and say what goes back through the stage now.

        Normally that is every term of the step. With `lp.delayed_grad: fused` the own
        term waits in the exchange for the gradient stage k+1 returns for this output, and
        only its AuxNet side (the gradient of the target) is taken now, so the AuxNet step
        is not delayed."""
        exchange = self.exchange
        if not exchange:
            return [total], [None]
        own = terms[0].loss if primary else None
        defer = exchange.defers_own_term()
        if sent is not None:
            exchange.send_output(*sent, own_loss=own if defer else None, stash=stash, real=real, labels=labels)
        now = terms[1:] if defer else terms
        if defer and target is not None:
            torch.autograd.backward(own, inputs=[target], retain_graph=True)
        return ([sum(t.loss for t in now)], [None]) if now else ([], [])

    def _add_delayed(self, tensors: list, grads: list):
        """Add what is due this step to the backward: the gradient stage k+1 returned for
        this stage's output two steps ago (through the kept graph) and, in `fused` mode,
        this stage's own term of that batch."""
        delayed = self.exchange.delayed_gradient() if self.exchange else None
        if delayed is None or delayed.grad is None:  # None: its gradients were settled at a stop
            return delayed
        if delayed.needs_rebuild():
            self._rebuild(delayed)
        more_tensors, more_grads = delayed.roots()
        tensors += more_tensors
        grads += more_grads
        return delayed

    def _rebuild(self, delayed):
        """A kept graph restored from a stop (the chained pipeline, exchange.py): run its
        forward again on the saved input at the saved weights, as the step that kept it
        did (the restored stash leaves BatchNorm's running statistics alone)."""
        delayed.output = self.precision.forward(lambda h: delayed.stash.run(0, h), delayed.stage_input)
        if self.cfg.lp.delayed_grad == "fused":
            delayed.own_loss = self._own_term(delayed.output, None, delayed.labels, 0.0, None, delayed.stash).loss

    def _real_term(self, real, rho: float, stash=None) -> tuple[StageTerm, torch.Tensor, torch.Tensor | None]:
        """This stage's term on a real input (a RealInput: with its labels and, relayed,
        the AuxNet's target of its batch and, under lp.loss al_real, that batch's
        multipliers from the store), its output and those multipliers, on `stash`'s
        weights where the graph is kept (one function for the step and for a stop's
        `real_input_gradient`, which must take the same gradient)."""
        multiplier = self.store.read_rows(lambda_real_name(self.out_boundary), real.rows).to(self.device) \
            if self.has_real_multipliers and real.target is not None else None
        out = self.precision.forward((lambda h: stash.run(0, h)) if stash else self.stage, real.tensor)
        head = (lambda h: stash.run(1, h)) if stash and self.local_head else self.local_head
        with self.precision.autocast():
            return real_input_term(out, real.labels, is_last=self.layout.is_last, local_head=head,
                                   local_weight=self.cfg.lp.local_cls_weight, target=real.target, rho=rho,
                                   multiplier=multiplier, criterion=self.criterion), out, multiplier

    def real_input_gradient(self, real) -> torch.Tensor:
        """The gradient of this stage's real-input term with respect to the RealInput
        `real`'s tensor, at the current weights, as the next step would take it;
        BatchNorm's running statistics are left alone, so that step still finds them as
        they were (the exchange's `settle`)."""
        real = dataclasses.replace(real, tensor=real.tensor.detach().requires_grad_())
        term, _, _ = self._real_term(real, self.rho, WeightStash.live((self.stage, self.local_head)))
        grad, = torch.autograd.grad(term.loss, real.tensor)
        return grad

    def _synchronise(self, inp, target, idx, rho: float):
        D = self.layout.D
        if self.auxnet is not None:
            for p in self.auxnet.parameters():
                if p.grad is None:  # heads this rank did not use
                    p.grad = torch.zeros_like(p)
                p.grad.div_(D)
            buffers = aux_buffers(self.auxnet)
            for b in buffers:
                b.div_(self.comm.size)
            grads = [p.grad for p in self.auxnet.parameters()]
            self.comm.allreduce(grads + buffers + [self.stop_vote.cast()], op="sum", what="allreduce AuxNet gradients")
            self.allreduce_values = sum(t.numel() for t in grads + buffers)
        elif self.stored_z is not None:
            self.allreduce_values = self.stored_z.step(inp, target, idx, rho, self.stop_vote, self.epoch_stats["z"])
        else:
            self.comm.allreduce([self.stop_vote.cast()], op="sum", what="allreduce stop votes")
        self.stop_vote.collect()
        if D > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.stage_params]
            self.comm.allreduce(grads, op="mean", group=self.stage_group, what="allreduce stage gradients")
            for p, g in zip(self.stage_params, grads):
                p.grad = g

    # --- 4. apply -----------------------------------------------------------------------
    def _step_multipliers(self, name: str, rows, before, residual, rho: float):
        """The AL dual step for a batch's samples, written back to the store array `name`."""
        updated = al_update(before, residual, rho)
        self.store.write_rows(name, rows, updated)
        self.epoch_stats["multiplier"].add(updated)

    def __call__(self, x, y, idx, rho: float) -> dict:
        """The whole step; returns the numbers the epoch sums, as device tensors where they
        come from the device (the epoch loop reads them, and the stop vote, every
        train.sync_every steps)."""
        t0 = time.perf_counter()
        step = self.compute_gradients(x, y, idx, rho)
        t1 = time.perf_counter()
        self.stage_opt.step()
        if self.aux_opt:
            self.aux_opt.step()
        if self.has_multipliers:
            self._step_multipliers(lambda_name(self.out_boundary), idx, step.multiplier, step.term.residual, rho)
        if step.real_multiplier is not None:
            self._step_multipliers(lambda_real_name(self.out_boundary), *step.real_multiplier, rho)
        t2 = time.perf_counter()
        times = {**step.times, "step_s": t2 - t0}
        times["stage_s"] += t2 - t1
        gap = relative_gap(step.output, step.target.detach()) if step.target is not None else (0.0, 0.0)
        return {"loss": step.term.loss.detach(), **step.term.parts, "gap_num": gap[0], "gap_den": gap[1], **times}
