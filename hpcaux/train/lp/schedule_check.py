"""A one-process check of the layer-parallel timetables (schedule.py), before any rank runs one.

`check_plan` builds every stage's timetable of a plan and raises TimetableError with the
first problem, naming the stage and the action:
  * every message goes to a neighbouring stage, never to the sender itself;
  * between two stages, the sends and the receives posted for them come in the same
    order (MPI matches them in order), and every posted receive is completed once;
  * run together, with receives that block until their send and an allreduce that waits
    for every rank, all the timetables finish: no rank waits on a message or a
    collective that never comes (the deadlock is reported rank by rank);
  * each stage back-propagates each of its forwards' own terms once, and the returned
    gradient of its output exactly `gradient_delay` ticks after that forward, for as
    many micro-batches as docs/algorithm.md counts (T·M − k − 2(K−1−k) in the chained
    pipeline).
"""
from __future__ import annotations

from collections import Counter, defaultdict

from hpcaux.train.lp.schedule import Action, Op, Plan, gradient_delay, kept_graphs, timetable


class TimetableError(AssertionError):
    """A timetable that would hang, mismatch a message, or delay a gradient wrongly."""


def check_plan(plan: Plan) -> list[list[Action]]:
    """Check the plan's timetables for all K stages; return them (stage by stage)."""
    tables = [timetable(plan, k) for k in range(plan.K)]
    check_tables(plan, tables)
    return tables


def check_tables(plan: Plan, tables: list[list[Action]]):
    """Check one timetable per stage, as built for `plan` (or altered from them)."""
    for k, table in enumerate(tables):
        _check_peers(plan, k, table)
    _check_message_order(plan, tables)
    _run_together(plan, tables)
    if plan.path in ("auxnet", "exchange", "chained"):
        for k, table in enumerate(tables):
            _check_backwards(plan, k, table)


def _fail(plan: Plan, text: str):
    raise TimetableError(f"{plan}: {text}")


def _check_peers(plan: Plan, k: int, table: list[Action]):
    for a in table:
        if a.op in (Op.SEND, Op.RECV_POST, Op.RECV_WAIT) and (a.peer == k or abs(a.peer - k) != 1):
            _fail(plan, f"stage {k} {a.op.value}s {a.what} of micro-batch {a.batch} with stage {a.peer}")


def _check_message_order(plan: Plan, tables: list[list[Action]]):
    """Sends from stage i to j and the receives j posts from i, message for message."""
    sends, posts = defaultdict(list), defaultdict(list)
    for k, table in enumerate(tables):
        open_posts = Counter()
        for a in table:
            key = (a.what, a.batch)
            if a.op is Op.SEND:
                sends[(k, a.peer)].append(key)
            elif a.op is Op.RECV_POST:
                posts[(a.peer, k)].append(key)
                open_posts[(a.peer, key)] += 1
            elif a.op is Op.RECV_WAIT:
                if open_posts[(a.peer, key)] == 0:
                    _fail(plan, f"stage {k} waits at tick {a.tick} for {a.what} {a.batch} from stage {a.peer} "
                                "without having posted its receive")
                open_posts[(a.peer, key)] -= 1
        left = [key for key, n in open_posts.items() if n]
        if left:
            _fail(plan, f"stage {k} posts receives it never completes: {left[:3]}")
    for pair in set(sends) | set(posts):
        if sends[pair] != posts[pair]:
            i, j = pair
            first = next((n for n, (s, r) in enumerate(zip(sends[pair], posts[pair])) if s != r),
                         min(len(sends[pair]), len(posts[pair])))
            _fail(plan, f"stage {i} sends to stage {j} {len(sends[pair])} messages, stage {j} posts "
                        f"{len(posts[pair])}; they first differ at message {first}: "
                        f"sent {sends[pair][first:first + 1]}, posted {posts[pair][first:first + 1]}")


def _run_together(plan: Plan, tables: list[list[Action]]):
    """Run every stage's timetable at once: a RECV_WAIT blocks until the peer's SEND, an
    ALLREDUCE until every rank stands at one. Stops with the deadlock, rank by rank."""
    done, sent = [0] * len(tables), set()

    def blocked(k: int) -> bool:
        a = tables[k][done[k]]
        return (a.op is Op.RECV_WAIT and (a.what, a.peer, k, a.batch) not in sent) or a.op is Op.ALLREDUCE

    while any(done[k] < len(t) for k, t in enumerate(tables)):
        moved = False
        for k, table in enumerate(tables):
            while done[k] < len(table) and not blocked(k):
                a = table[done[k]]
                if a.op is Op.SEND:
                    sent.add((a.what, k, a.peer, a.batch))
                done[k] += 1
                moved = True
        if all(done[k] < len(t) and t[done[k]].op is Op.ALLREDUCE for k, t in enumerate(tables)):
            done = [d + 1 for d in done]
            moved = True
        if not moved:
            waits = [f"stage {k} at tick {t[done[k]].tick} waits on "
                     + (f"{t[done[k]].what} {t[done[k]].batch} from stage {t[done[k]].peer}"
                        if t[done[k]].op is Op.RECV_WAIT else "the allreduce")
                     if done[k] < len(t) else f"stage {k} has finished" for k, t in enumerate(tables)]
            _fail(plan, "deadlock: " + "; ".join(waits))


def _check_backwards(plan: Plan, k: int, table: list[Action]):
    """Own terms once each; returned gradients at the stated delay and count."""
    chained = plan.path == "chained"
    forwards = {a.batch for a in table if a.op is Op.FORWARD and a.what != "real"}
    roots = Counter(root for a in table if a.op is Op.BACKWARD for root in a.roots)
    own = {b for kind, b in roots if kind == "own"}
    if own != forwards or any(n != 1 for key, n in roots.items() if key[0] in ("own", "returned")):
        missing = sorted(forwards - own)[:3]
        _fail(plan, f"stage {k} back-propagates its own terms other than once per forward (missing {missing})")
    kept = kept_graphs(table)
    expected = _expected_returns(plan, k, chained)
    if len(kept) != expected:
        _fail(plan, f"stage {k} back-propagates {len(kept)} returned gradients, docs/algorithm.md counts {expected}")
    delays = {back - forward for forward, back in kept}
    if delays - {gradient_delay(plan.K, k, chained)}:
        _fail(plan, f"stage {k}'s returned gradients come {sorted(delays)} ticks after their forwards, "
                    f"not {gradient_delay(plan.K, k, chained)}")


def _expected_returns(plan: Plan, k: int, chained: bool) -> int:
    """Micro-batches whose output's gradient stage k gets back within the epoch."""
    if plan.delayed_grad == "none" or k == plan.K - 1 or (not chained and plan.real_inputs == "none"):
        return 0
    first = k if chained or plan.relay else 0
    return max(0, plan.ticks - first - gradient_delay(plan.K, k, chained))
