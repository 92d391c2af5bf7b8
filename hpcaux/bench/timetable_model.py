"""The step time of a layer-parallel timetable, from what each of its actions costs.

The timetable of train/lp/schedule.py says, per rank, what runs in which order and which
message each wait needs. This module gives every action a duration and plays the K
timetables of one epoch against each other: a rank runs its actions in order, a
RECV_WAIT blocks until the message it completes has arrived (its send's time plus the
transfer), the world allreduce blocks until every rank has reached it, and sends never
block (the runs post them non-blocking). So the waits, the pipeline's fill and drain and
the traffic of every micro-batch come out of the schedule a run executes, for every path
alike, not out of a formula per method (docs/design.md §6).

Costs are per micro-batch: how a stage's time shrinks with the micro-batch (the small
micro-batch efficiency) is the caller's to say, from a measurement or from MACs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hpcaux.train.lp.schedule import Action, Op, Plan, timetable


@dataclass(frozen=True)
class ActionCosts:
    """Milliseconds of each action, per stage (tuples of length K) or per boundary (K-1)."""
    forward_ms: tuple          # one stage forward of one micro-batch
    backward_ms: tuple         # one backward through one micro-batch's graph of the stage
    aux_forward_ms: tuple      # the AuxNet heads a stage runs, one micro-batch
    aux_backward_ms: tuple
    message_ms: tuple          # boundary k (stage k to k+1): one activation or gradient of one micro-batch
    allreduce_ms: float        # the world allreduce of a step, once every rank has reached it
    step_overhead_ms: tuple    # once a step on each rank: the optimiser step, the batch, the host's reads


@dataclass(frozen=True)
class Epoch:
    ms: float              # from the first action to the last rank's last
    busy_ms: tuple         # per rank: the time its actions took (the rest it waited)


@dataclass(frozen=True)
class StepTime:
    step_ms: float         # an epoch's time over its steps: fill and drain included
    steady_ms: float       # a step in the middle of an epoch
    fill_drain_ms: float   # what an epoch costs on top of its steps at the steady rate
    wait_ms: tuple         # per rank, a steady step's time waiting for a message or the allreduce


def graphs_of(action: Action) -> int:
    """The backward passes a BACKWARD costs: one per forward graph its roots reach (a
    stage's forward on a real input is a graph apart from its forward on the AuxNet's
    prediction of the same micro-batch); a 'target' root only reaches the AuxNet's side."""
    return len({(kind == "real", batch) for kind, batch in action.roots if kind != "target"})


def _duration(action: Action, k: int, costs: ActionCosts) -> float:
    op = action.op
    if op is Op.FORWARD:
        return costs.forward_ms[k]
    if op is Op.BACKWARD:
        return graphs_of(action) * costs.backward_ms[k]
    if op is Op.AUX_FORWARD:
        return costs.aux_forward_ms[k]
    if op is Op.AUX_BACKWARD:
        return costs.aux_backward_ms[k]
    if op is Op.OPT_STEP:
        return costs.step_overhead_ms[k]
    return 0.0


def simulate_epoch(plan: Plan, costs: ActionCosts) -> Epoch:
    """One epoch, all ranks starting together. Messages are matched in the order they are sent on each (sender, receiver,
    kind) channel, as check_plan verified they are received."""
    K = plan.K
    tables = [timetable(plan, k) for k in range(K)]
    clock, pos, busy = [0.0] * K, [0] * K, [0.0] * K
    channels: dict[tuple, deque] = {}
    while True:
        moved = False
        for k in range(K):
            while pos[k] < len(tables[k]):
                a = tables[k][pos[k]]
                if a.op is Op.ALLREDUCE:
                    break
                if a.op is Op.RECV_WAIT:
                    queue = channels.get((a.peer, k, a.what))
                    if not queue:
                        break
                    clock[k] = max(clock[k], queue.popleft())
                elif a.op is Op.SEND:
                    arrival = clock[k] + costs.message_ms[min(k, a.peer)]
                    channels.setdefault((k, a.peer, a.what), deque()).append(arrival)
                else:
                    spent = _duration(a, k, costs)
                    clock[k] += spent
                    busy[k] += spent
                pos[k] += 1
                moved = True
        at_allreduce = [pos[k] < len(tables[k]) and tables[k][pos[k]].op is Op.ALLREDUCE for k in range(K)]
        if all(at_allreduce):
            done = max(clock) + costs.allreduce_ms
            clock, pos = [done] * K, [p + 1 for p in pos]
            busy = [b + costs.allreduce_ms for b in busy]
            continue
        if all(p == len(t) for p, t in zip(pos, tables)):
            return Epoch(max(clock), tuple(busy))
        if not moved:
            stuck = [k for k in range(K) if pos[k] < len(tables[k])]
            raise RuntimeError(f"timetable model: {plan} deadlocks on stages {stuck} (check_plan should have refused it)")


def step_time(plan: Plan, costs: ActionCosts) -> StepTime:
    """The step time of an epoch of plan.steps steps. Two short epochs give the steady
    step and the fill and drain (the epochs differ by steady steps in the middle only), so a
    long epoch costs no more to model than a short one."""
    short = _steady_steps(plan)
    longer = short + 4
    first, second = simulate_epoch(_resized(plan, short), costs), simulate_epoch(_resized(plan, longer), costs)
    steady = (second.ms - first.ms) / (longer - short)
    fill_drain = max(0.0, first.ms - short * steady)
    waits = tuple(steady - (b2 - b1) / (longer - short) for b1, b2 in zip(first.busy_ms, second.busy_ms))
    return StepTime(steady + fill_drain / plan.steps, steady, fill_drain, waits)


def _steady_steps(plan: Plan) -> int:
    """Steps enough for an epoch to hold steady ticks between its fill and its drain (each
    lasts up to 2(K-1) ticks, the longest gradient delay)."""
    return -(-6 * plan.K // plan.microbatches) + 2


def _resized(plan: Plan, steps: int) -> Plan:
    return Plan(plan.path, plan.K, steps, plan.microbatches, plan.real_inputs, plan.delayed_grad, plan.relay)


def actions_per_step(plan: Plan, stage: int) -> dict[str, float]:
    """What stage runs in a step in the middle of an epoch: forwards, backward graphs, and
    the AuxNet's forwards and backwards (measured per-step times are split over these)."""
    steps = _steady_steps(plan)
    middle = steps // 2
    M = plan.microbatches
    acts = [a for a in timetable(_resized(plan, steps), stage) if middle * M <= a.tick < (middle + 1) * M]
    return {"forward": sum(a.op is Op.FORWARD for a in acts),
            "backward": sum(graphs_of(a) for a in acts if a.op is Op.BACKWARD),
            "aux_forward": sum(a.op is Op.AUX_FORWARD for a in acts),
            "aux_backward": sum(a.op is Op.AUX_BACKWARD for a in acts)}
