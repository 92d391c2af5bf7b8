"""The layer-parallel timetable: for one rank, the ordered actions of an epoch, as data.

Every layer-parallel path is a timetable of the same few actions (docs/design.md §1):
receive or send an activation or a gradient, a stage forward, a backward, the AuxNet's
forward and backward, the world allreduce and the optimiser step. What differs between
the paths is only their order and which micro-batch each concerns, so the timetable is
built here once per path and checked on one process (schedule_check.check_plan)
before any rank runs it: every send has its receive in the order the receiver posts them, no rank
waits on itself or on a collective another rank never reaches, and each stage's
gradient delay is the one docs/algorithm.md states. The shape follows
torch.distributed.pipelining's per-rank action lists (F, B, SEND_F, RECV_F, SEND_B,
RECV_B) and DeepSpeed's `PipeSchedule.steps()`.

Time is counted in ticks: one tick per micro-batch of a step (M ticks a step, T·M an
epoch; GPipe takes 2M a step, its forwards then its backwards). A stage's forward of
micro-batch b and the backward that brings back the gradient of its output are
`gradient_delay` ticks apart. Receives are non-blocking
(`RECV_POST` posts one, `RECV_WAIT` completes it, posted a tick early where the path
overlaps); sends never block. The epoch's fill and drain are the timetable's warm-up
and cool-down: stage k's first forward and the last micro-batches whose gradients would
return after the epoch ends (those keep no graph) fall out of the same rules as the
steady state.

Paths:
  auxnet    the AuxNet objective alone: no messages between stages;
  exchange  the AuxNet with the neighbour exchange (lp.real_inputs, lp.delayed_grad):
            stage k trains at tick u on stage k-1's output of tick u-1 as well and
            gets its own output's gradient back at tick u+2; relayed (LayerParallelConfig.relays) a middle
            stage sends on its forward on that real input, so stage k's real input is
            micro-batch u-k, and the gradient still returns two ticks after the send;
  chained   the pipeline without an AuxNet (lp.aux_source none): stage k runs
            micro-batch u-k at tick u, and its gradient returns 2(K-1-k) ticks later;
  gpipe     the end-to-end fine-tune: every micro-batch forward, then every one backward
            in reverse, one optimiser step a batch;
  evaluate  the composed network's evaluation: forwards along the chain only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

PATHS = ("auxnet", "exchange", "chained", "gpipe", "evaluate")


class Op(Enum):
    RECV_POST = "recv_post"      # post a receive (non-blocking)
    RECV_WAIT = "recv_wait"      # complete a posted receive (blocks until the peer sent)
    SEND = "send"                # non-blocking send
    AUX_FORWARD = "aux_forward"  # the AuxNet heads this stage needs
    FORWARD = "forward"          # the stage on one input (`what`)
    BACKWARD = "backward"        # one backward from the roots in `roots`
    AUX_BACKWARD = "aux_backward"
    ALLREDUCE = "allreduce"      # the world allreduce (AuxNet gradients and/or the stop vote)
    OPT_STEP = "opt_step"


@dataclass(frozen=True)
class Action:
    """One thing a rank does. `batch` is the micro-batch of the epoch it concerns (-1 for a
    step's allreduce and optimiser step); `peer` the stage at the other end of a message;
    `what` the message kind ('activation' or 'gradient') or a forward's input: 'image',
    'auxnet', 'activation' (the previous stage's output, the only input in a pipeline) or
    'real' (the exchange's second forward, on the previous stage's output of the tick
    before). `roots`: what a backward starts from, (kind, micro-batch) pairs with kind
    'own' (the stage's own term), 'real' (its term on a real input), 'returned' (the
    gradient the next stage returned for its output) or 'target' (only the AuxNet's side
    of a held-back own term)."""
    op: Op
    tick: int
    batch: int = -1
    peer: int | None = None
    what: str = ""
    roots: tuple = ()


@dataclass(frozen=True)
class Plan:
    """What a timetable is built from: the path and its sizes and options."""
    path: str
    K: int
    steps: int                   # T: optimiser steps in the epoch
    microbatches: int = 1        # M: micro-batches per step
    real_inputs: str = "none"    # exchange: none | beside | only
    delayed_grad: str = "none"   # exchange, chained: none | keep | fused
    relay: bool = False          # exchange: middle stages send on their real-input forward (lp.relays)

    @property
    def ticks(self) -> int:
        return self.steps * self.microbatches


def plan_of(cfg, K: int, steps: int) -> Plan:
    """The timetable a layer-parallel phase of config `cfg` runs at K stages (the cost
    model plays it; step.py and exchange.py run it): the pipeline without an AuxNet, the
    AuxNet with the neighbour exchange, or the AuxNet objective alone (stored real inputs
    send nothing)."""
    lp, M = cfg.lp, cfg.parallel.microbatches
    if lp.aux_source == "none":
        return Plan("chained", K, steps, M, lp.real_inputs, lp.delayed_grad)
    if lp.exchanges:
        return Plan("exchange", K, steps, M, lp.real_inputs, lp.delayed_grad, lp.relays)
    return Plan("auxnet", K, steps, M)


def gradient_delay(K: int, stage: int, chained: bool) -> int:
    """Ticks (exchange steps) from a stage's forward of a micro-batch to the backward of its
    returned gradient (docs/algorithm.md): 2 with the AuxNet, 2(K-1-k) in the chained
    pipeline. The running exchange (exchange.py) takes its delays from here too."""
    return 2 * (K - 1 - stage) if chained else 2


def gradient_delays_in_steps(cfg, K: int) -> list[float]:
    """Per stage, how many optimiser steps after its forward the gradient returned for its
    output is applied, for the run's config (recorded in RUN/aux.h5): delay ticks / M;
    0 on the last stage; NaN where no gradient returns (the AuxNet objective alone, stored
    real inputs, lp.delayed_grad none)."""
    lp, M = cfg.lp, cfg.parallel.microbatches
    returns = lp.exchanges and lp.delayed_grad != "none"
    chained = lp.aux_source == "none"
    return [math.nan if not returns else 0.0 if k == K - 1 else gradient_delay(K, k, chained) / M
            for k in range(K)]


def timetable(plan: Plan, stage: int) -> list[Action]:
    """The ordered actions of one epoch on the rank that holds `stage`."""
    if plan.path not in PATHS:
        raise ValueError(f"unknown timetable path {plan.path!r}; expected one of {PATHS}")
    build = {"auxnet": _auxnet_tick, "exchange": _exchange_tick, "chained": _chained_tick}.get(plan.path)
    if build is None:
        return _gpipe(plan, stage, backward=plan.path == "gpipe")
    actions: list[Action] = []
    for u in range(plan.ticks):
        actions += build(plan, stage, u)
        if u % plan.microbatches == plan.microbatches - 1:
            actions += [Action(Op.ALLREDUCE, u), Action(Op.OPT_STEP, u)]
    return actions


def _auxnet_tick(plan: Plan, k: int, u: int) -> list[Action]:
    return [Action(Op.AUX_FORWARD, u, u), Action(Op.FORWARD, u, u, what="image" if k == 0 else "auxnet"),
            Action(Op.BACKWARD, u, u, roots=(("own", u),)), Action(Op.AUX_BACKWARD, u, u)]


def _first_send(plan: Plan, k: int, chained: bool) -> int:
    """The first tick at which stage k sends an output on: k along a chain of real inputs
    (the pipeline, or relayed), else 0."""
    return k if chained or plan.relay else 0


def _sent_batch(plan: Plan, k: int, u: int) -> int:
    """The micro-batch of the output stage k sends at tick u (with the AuxNet's exchange)."""
    return u - k if plan.relay else u


def _keeps(plan: Plan, k: int, u: int, chained: bool) -> bool:
    """Whether stage k sent an output at tick u whose gradient returns within the epoch
    (along a chain stage k's first send is at tick k)."""
    first = _first_send(plan, k, chained)
    return (plan.delayed_grad != "none" and k < plan.K - 1 and u >= first
            and u + gradient_delay(plan.K, k, chained) <= plan.ticks - 1)


def _exchange_tick(plan: Plan, k: int, u: int) -> list[Action]:
    """The AuxNet with the neighbour exchange: every boundary a two-tick exchange. Relayed,
    a middle stage sends on its forward on the real input (micro-batch u-k) and keeps that
    graph, so its own term is never held back."""
    last, U = plan.K - 1, plan.ticks
    exchanges = plan.real_inputs != "none"
    relays = plan.relay and 0 < k < last
    acts = []
    if _keeps(plan, k, u - 1, chained=False):   # the gradient due next tick
        acts.append(Action(Op.RECV_POST, u, _sent_batch(plan, k, u - 1), k + 1, "gradient"))
    real = k > 0 and exchanges and u >= _first_send(plan, k, chained=False) and u >= 1
    real_batch = _sent_batch(plan, k - 1, u - 1)
    if real:
        acts.append(Action(Op.RECV_WAIT, u, real_batch, k - 1, "activation"))
    if k > 0 and exchanges and _first_send(plan, k - 1, chained=False) <= u <= U - 2:
        acts.append(Action(Op.RECV_POST, u, _sent_batch(plan, k - 1, u), k - 1, "activation"))
    primary = not (real and plan.real_inputs == "only" and k == last)
    sends_on = k < last and exchanges and _first_send(plan, k, chained=False) <= u <= U - 2
    acts.append(Action(Op.AUX_FORWARD, u, u))
    if primary:
        acts.append(Action(Op.FORWARD, u, u, what="image" if k == 0 else "auxnet"))
        if sends_on and not relays:
            acts.append(Action(Op.SEND, u, u, k + 1, "activation"))
    if real:
        acts.append(Action(Op.FORWARD, u, real_batch, what="real"))
        if sends_on and relays:
            acts.append(Action(Op.SEND, u, real_batch, k + 1, "activation"))
    deferred = plan.delayed_grad == "fused" and _keeps(plan, k, u, chained=False) and not relays
    if deferred:   # the AuxNet's side of the held-back own term is taken now (a backward into the target)
        acts.append(Action(Op.BACKWARD, u, u, roots=(("target", u),)))
    roots = [("own", u)] if primary and not deferred else []
    roots += [("real", real_batch)] if real else []
    if _keeps(plan, k, u - 2, chained=False):
        done = _sent_batch(plan, k, u - 2)
        acts.append(Action(Op.RECV_WAIT, u, done, k + 1, "gradient"))
        roots += [("returned", done)] + ([("own", done)] if plan.delayed_grad == "fused" and not relays else [])
    acts.append(Action(Op.BACKWARD, u, u, roots=tuple(roots)))
    if real and _keeps(plan, k - 1, u - 1, chained=False):
        acts.append(Action(Op.SEND, u, real_batch, k - 1, "gradient"))
    acts.append(Action(Op.AUX_BACKWARD, u, u))
    return acts


def _chained_tick(plan: Plan, k: int, u: int) -> list[Action]:
    """The pipeline without an AuxNet: stage k runs micro-batch u-k at tick u."""
    K, last, U = plan.K, plan.K - 1, plan.ticks
    delay, b = gradient_delay(K, k, chained=True), u - k
    acts = []
    if k < last and _keeps(plan, k, u + 1 - delay, chained=True):   # the gradient due next tick
        acts.append(Action(Op.RECV_POST, u, u + 1 - delay - k, k + 1, "gradient"))
    runs = k == 0 or u >= k
    if k > 0 and runs:
        acts.append(Action(Op.RECV_WAIT, u, b, k - 1, "activation"))
    if k > 0 and k - 1 <= u <= U - 2:
        acts.append(Action(Op.RECV_POST, u, b + 1, k - 1, "activation"))
    roots: list = []
    if runs:
        acts.append(Action(Op.FORWARD, u, b, what="image" if k == 0 else "activation"))
        if k < last and u <= U - 2:
            acts.append(Action(Op.SEND, u, b, k + 1, "activation"))
        deferred = plan.delayed_grad == "fused" and _keeps(plan, k, u, chained=True)
        roots = [] if deferred else [("own", b)]
    done = None
    if k < last and _keeps(plan, k, u - delay, chained=True):
        done = u - delay - k
        acts.append(Action(Op.RECV_WAIT, u, done, k + 1, "gradient"))
        roots += [("returned", done)] + ([("own", done)] if plan.delayed_grad == "fused" else [])
    if roots:
        acts.append(Action(Op.BACKWARD, u, b if runs else done, roots=tuple(roots)))
    returned = b if k == last else done   # the micro-batch whose input gradient is now known
    if k > 0 and returned is not None and returned >= 0 and _keeps(plan, k - 1, returned + k - 1, chained=True):
        acts.append(Action(Op.SEND, u, returned, k - 1, "gradient"))
    return acts


def _gpipe(plan: Plan, k: int, backward: bool) -> list[Action]:
    """GPipe: per step, every micro-batch forward with blocking receives, then (the
    fine-tune) every one backward in reverse and the optimiser step with the stop vote.
    A step takes 2M ticks: forwards at ticks 0..M-1 of it, backwards at M..2M-1."""
    K, M, acts = plan.K, plan.microbatches, []
    for s in range(plan.steps):
        for m in range(M):
            b, u = s * M + m, 2 * M * s + m
            if k > 0:
                acts += [Action(Op.RECV_POST, u, b, k - 1, "activation"), Action(Op.RECV_WAIT, u, b, k - 1, "activation")]
            acts.append(Action(Op.FORWARD, u, b, what="image" if k == 0 else "activation"))
            if k < K - 1:
                acts.append(Action(Op.SEND, u, b, k + 1, "activation"))
        if not backward:
            continue
        for m in reversed(range(M)):
            b, u = s * M + m, 2 * M * s + 2 * M - 1 - m
            if k < K - 1:
                acts += [Action(Op.RECV_POST, u, b, k + 1, "gradient"), Action(Op.RECV_WAIT, u, b, k + 1, "gradient")]
            acts.append(Action(Op.BACKWARD, u, b, roots=(("own" if k == K - 1 else "returned", b),)))
            if k > 0:
                acts.append(Action(Op.SEND, u, b, k - 1, "gradient"))
        acts += [Action(Op.OPT_STEP, 2 * M * s + 2 * M - 1), Action(Op.ALLREDUCE, 2 * M * s + 2 * M - 1)]
    return acts


def kept_graphs(table: list[Action]) -> list[tuple[int, int]]:
    """(tick of the forward, tick of the backward) of every graph a stage keeps until the
    gradient of its output returns: the forward whose output it sent on, of each
    micro-batch a backward gets back (a stage sends in the tick of that forward)."""
    sent = {a.batch: a.tick for a in table if a.op is Op.SEND and a.what == "activation"}
    return [(sent[b], a.tick) for a in table if a.op is Op.BACKWARD for kind, b in a.roots if kind == "returned"]


def weight_versions(plan: Plan, stage: int) -> int:
    """The most weight versions `stage` holds at once for its kept graphs: one per
    optimiser step their forwards ran in, since a step's micro-batches share its weights
    (PipeDream-2BW: at most two once M >= 2(K-1)); without micro-batches one per kept
    graph. A tick holds the graph it makes and the one its backward frees."""
    kept = kept_graphs(timetable(plan, stage))
    return max((len({f // plan.microbatches for f, back in kept if f <= u <= back}) for u in range(plan.ticks)),
               default=0)


def render(plan: Plan) -> str:
    """The timetable as a grid, a row per stage and a column per tick (docs/design.md):
    `F3` the forward of micro-batch 3 (`R2` the exchange's forward on a real input of 2),
    `B3` a backward with batch 3's own term, `b2` with its term on the real input of 2,
    `G1` with the gradient returned for 1, `|` the optimiser step."""
    marks = {"own": "B", "returned": "G", "real": "b"}
    tables = [timetable(plan, k) for k in range(plan.K)]
    ticks = 1 + max(a.tick for table in tables for a in table)
    rows = []
    for table in tables:
        cells = [[] for _ in range(ticks)]
        for a in table:
            if a.op is Op.FORWARD:
                cells[a.tick].append(("R" if a.what == "real" else "F") + str(a.batch))
            elif a.op is Op.BACKWARD:
                cells[a.tick] += [marks[kind] + str(b) for kind, b in a.roots if kind in marks]
            elif a.op is Op.OPT_STEP:
                cells[a.tick].append("|")
        rows.append([" ".join(c) for c in cells])
    width = max(len(c) for row in rows for c in row)
    return "\n".join(f"stage {k}: " + "  ".join(c.ljust(width) for c in row).rstrip() for k, row in enumerate(rows))
