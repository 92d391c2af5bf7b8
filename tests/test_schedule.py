"""The layer-parallel timetables (hpcaux/train/lp/schedule.py), checked on one process for
every path at K = 2..8 and M = 1..8, and the checker shown to catch what it claims to."""
import dataclasses

import pytest

from hpcaux.train.lp.schedule import Action, Op, Plan, gradient_delay, kept_graphs, timetable, weight_versions
from hpcaux.train.lp.schedule_check import TimetableError, check_plan, check_tables

pytestmark = pytest.mark.quick


def plans_for(K: int, M: int) -> list[Plan]:
    """Every path the package keeps, for an epoch long enough to hold the pipeline's fill,
    a steady state and its drain."""
    T = max(3, -(-4 * K // M) + 1)
    return ([Plan("chained", K, T, M, "only", grad) for grad in ("keep", "fused")]
            + [Plan("exchange", K, T, M, real, grad) for real in ("beside", "only") for grad in ("none", "keep", "fused")]
            + [Plan("exchange", K, T, M, real, grad, relay=True) for real in ("beside", "only") for grad in ("keep", "fused")]
            + [Plan("exchange", K, T, M), Plan("auxnet", K, T, M), Plan("gpipe", K, T, M), Plan("evaluate", K, T, M)])


@pytest.mark.parametrize("K", range(2, 9))
def test_every_timetable_matches_its_messages_finishes_and_delays_as_documented(K):
    for M in range(1, 9):
        for plan in plans_for(K, M):
            check_plan(plan)


@pytest.mark.parametrize("T,M,K,stage,expected", [(78, 1, 4, 0, 72), (78, 8, 4, 0, 618), (78, 8, 4, 2, 620)])
def test_chained_pipeline_back_propagates_the_documented_count(T, M, K, stage, expected):
    """docs/algorithm.md: stage k back-propagates T - k - 2(K-1-k) of the epoch's T (micro-)batches."""
    table = timetable(Plan("chained", K, T, M, "only", "fused"), stage)
    returned = [b for a in table if a.op is Op.BACKWARD for kind, b in a.roots if kind == "returned"]
    assert len(returned) == expected


def test_chained_stage_runs_micro_batch_u_minus_k_and_gets_it_back_2_k_ticks_later():
    plan = Plan("chained", 4, 4, 2, "only", "keep")
    table = timetable(plan, 1)
    forwards = {a.batch: a.tick for a in table if a.op is Op.FORWARD}
    assert forwards[0] == 1 and forwards[5] == 6
    back = {b: a.tick for a in table if a.op is Op.BACKWARD for kind, b in a.roots if kind == "returned"}
    assert {back[b] - forwards[b] for b in back} == {gradient_delay(4, 1, chained=True)} == {4}


def test_fused_holds_the_own_term_back_for_the_returned_gradient():
    """Tick 3: batch 3's own term waits (only the AuxNet's side is taken now); batch 1's goes
    back with its returned gradient, beside the real input's term of batch 2. At the
    epoch's last tick nothing returns any more, so the own term goes back at once."""
    table = timetable(Plan("exchange", 3, 6, 1, "beside", "fused"), 1)
    backward = {u: [a.roots for a in table if a.op is Op.BACKWARD and a.tick == u] for u in (3, 5)}
    assert backward[3] == [(("target", 3),), (("real", 2), ("returned", 1), ("own", 1))]
    assert backward[5] == [(("own", 5), ("real", 4), ("returned", 3), ("own", 3))]


def test_relay_passes_the_real_inputs_along_and_returns_each_gradient_two_ticks_after_its_send():
    """The relayed exchange at K = 4: stage k's real input at tick u is micro-batch u-k (the
    composition of the stages before it), and every stage's returned gradient comes two
    ticks after the send, whatever k; a middle stage holds back no own term in fused mode."""
    plan = Plan("exchange", 4, 7, 1, "beside", "fused", relay=True)
    tables = check_plan(plan)
    for k in range(1, 4):
        reals = {a.tick: a.batch for a in tables[k] if a.op is Op.FORWARD and a.what == "real"}
        assert reals == {u: u - k for u in range(k, 7)}
    for k in range(3):
        assert {back - sent for sent, back in kept_graphs(tables[k])} == {2}
    assert not any(kind == "target" for a in tables[1] if a.op is Op.BACKWARD for kind, _ in a.roots)


def test_allreduce_and_optimiser_step_once_per_batch_of_m_micro_batches():
    table = timetable(Plan("chained", 2, 5, 4, "only", "fused"), 0)
    assert [a.tick for a in table if a.op is Op.OPT_STEP] == [3, 7, 11, 15, 19]
    assert sum(a.op is Op.ALLREDUCE for a in table) == 5


def assert_caught(plan: Plan, stage: int, change, message: str):
    """The checker rejects the plan's timetables with `change` applied to one stage's."""
    tables: list[list[Action]] = [timetable(plan, k) for k in range(plan.K)]
    tables[stage] = change(tables[stage])
    with pytest.raises(TimetableError, match=message):
        check_tables(plan, tables)


def test_checker_catches_a_lost_send():
    plan = Plan("chained", 3, 4, 1, "only", "keep")
    lost = next(a for a in timetable(plan, 0) if a.op is Op.SEND)
    assert_caught(plan, 0, lambda t: [a for a in t if a != lost], "stage 0 sends to stage 1")


def test_checker_catches_messages_sent_out_of_the_order_they_are_received():
    plan = Plan("chained", 3, 4, 1, "only", "keep")

    def swap_first_two_sends(table):
        at = [i for i, a in enumerate(table) if a.op is Op.SEND][:2]
        table = list(table)
        table[at[0]], table[at[1]] = table[at[1]], table[at[0]]
        return table
    assert_caught(plan, 0, swap_first_two_sends, r"they first differ at message 0: sent \[\('activation', 1\)\]")


def test_checker_reports_a_deadlock_rank_by_rank():
    """GPipe with stage 0 waiting for a gradient before it sends the activation it needs."""
    plan = Plan("gpipe", 2, 1, 1)

    def wait_first(table):
        waits = [a for a in table if a.op in (Op.RECV_POST, Op.RECV_WAIT)]
        return waits + [a for a in table if a not in waits]
    assert_caught(plan, 0, wait_first, "deadlock: stage 0 at tick 1 waits on gradient 0 from stage 1; "
                                       "stage 1 at tick 0 waits on activation 0 from stage 0")


def test_checker_catches_a_gradient_applied_a_tick_late():
    plan = Plan("exchange", 2, 5, 1, "beside", "keep")

    def one_tick_late(table):
        moved, out = None, []
        for a in table:
            if a.op is Op.BACKWARD and any(kind == "returned" for kind, _ in a.roots) and moved is None:
                moved = [r for r in a.roots if r[0] == "returned"]
                a = dataclasses.replace(a, roots=tuple(r for r in a.roots if r[0] != "returned"))
            elif a.op is Op.BACKWARD and moved and a.tick == 3:
                a = dataclasses.replace(a, roots=a.roots + tuple(moved))
            out.append(a)
        return out
    assert_caught(plan, 0, one_tick_late, r"stage 0's returned gradients come \[2, 3\] ticks after")


def test_checker_catches_an_own_term_back_propagated_twice():
    plan = Plan("auxnet", 2, 3, 1)

    def twice(table):
        return [dataclasses.replace(a, roots=a.roots + (("own", 0),)) if a.op is Op.BACKWARD and a.tick == 1 else a
                for a in table]
    assert_caught(plan, 1, twice, "stage 1 back-propagates its own terms other than once")


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown timetable path 'replay'"):
        timetable(Plan("replay", 2, 2), 0)


@pytest.mark.parametrize("M,held", [(1, [7, 5, 3, 0]), (2, [4, 3, 2, 0]), (8, [2, 2, 2, 0])])
def test_a_stage_holds_one_weight_version_per_step_its_kept_graphs_span(M, held):
    """K = 4: stage k holds 2(K-1-k) + 1 micro-batches' graphs in a tick (the one it makes
    and the one it frees); with M = 8 they span at most two steps, so every stage holds at
    most two weight copies, where one copy per graph held 7, 5 and 3."""
    plan = Plan("chained", 4, 16, M, "only", "fused")
    assert [weight_versions(plan, k) for k in range(4)] == held
