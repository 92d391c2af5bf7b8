"""An in-process Comm: the ranks of a job as threads of one process (docs/design.md §2).

The one-process twins of the parallel paths run on it in the quick tier, without mpirun:
`run_ranks(size, work)` starts `size` threads, gives each a LoopbackComm of its own rank
and returns what each `work(comm)` returned. The semantics are MPI's where hpcaux relies
on them: messages between two ranks arrive in the order they were sent and match
receives in the order they were posted (whenever each is waited on); a collective
completes once every rank of its group has called it, in the same order on every rank.
Sends are buffered (a copy is queued), so they never block. The mpirun tests stay for
the real launch and the real backends.
"""
from __future__ import annotations

import functools
import threading
from collections import defaultdict

import torch

from hpcaux.comm.base import Comm, Group


class LoopbackWorld:
    """What the threads of one job share: the messages in flight and the collectives being
    assembled, under one condition variable."""

    def __init__(self, size: int):
        self.size = size
        self.changed = threading.Condition()
        self.messages: dict[tuple, dict[int, torch.Tensor]] = defaultdict(dict)  # (src, dst) -> {seq: tensor}
        self.sent: dict[tuple, int] = defaultdict(int)
        self.collectives: dict[tuple, dict] = {}   # (group ranks, seq) -> {"parts", "value", "left"}
        self.aborted: int | None = None

    def post(self, src: int, dst: int, tensor: torch.Tensor):
        with self.changed:
            self.messages[src, dst][self.sent[src, dst]] = tensor.detach().clone()
            self.sent[src, dst] += 1
            self.changed.notify_all()

    def take(self, src: int, dst: int, seq: int) -> torch.Tensor:
        """Message number `seq` from src to dst, once it has been sent."""
        with self.changed:
            self.changed.wait_for(lambda: seq in self.messages[src, dst] or self.aborted is not None)
            self._check_abort()
            return self.messages[src, dst].pop(seq)

    def reduce(self, key: tuple, rank: int, contribution: torch.Tensor | None, members: int,
               combine) -> torch.Tensor:
        """The value of collective `key` once all `members` have called it: their
        contributions (None: a rank that brings none) folded by `combine` in rank order, so
        the result does not depend on which thread came first."""
        with self.changed:
            entry = self.collectives.setdefault(key, {"parts": {}, "value": None, "left": members})
            entry["parts"][rank] = None if contribution is None else contribution.detach().clone()
            if len(entry["parts"]) == members:
                parts = [t for _, t in sorted(entry["parts"].items()) if t is not None]
                entry["value"] = functools.reduce(combine, parts) if combine else parts[0]
                self.changed.notify_all()
            self.changed.wait_for(lambda: entry["value"] is not None or self.aborted is not None)
            self._check_abort()
            entry["left"] -= 1
            if entry["left"] == 0:
                del self.collectives[key]
            return entry["value"]

    def abort(self, code: int):
        with self.changed:
            self.aborted = code
            self.changed.notify_all()

    def _check_abort(self):
        if self.aborted is not None:
            raise RuntimeError(f"loopback job aborted with code {self.aborted}")


class _Receive:
    """A posted receive: message number `seq` from `src`, copied into `target` on wait()."""

    def __init__(self, world: LoopbackWorld, src: int, dst: int, seq: int, target: torch.Tensor):
        self.world, self.src, self.dst, self.seq, self.target = world, src, dst, seq, target

    def wait(self):
        self.target.copy_(self.world.take(self.src, self.dst, self.seq))


class _Sent:
    """A buffered send: complete as soon as it is queued."""

    def wait(self):
        pass


class LoopbackComm(Comm):
    name = "loopback"
    transport = "memory"

    def __init__(self, world: LoopbackWorld, rank: int, timeout_s: float = 120.0):
        super().__init__(rank, world.size, rank, timeout_s)
        self.shared = world
        self.posted: dict[int, int] = defaultdict(int)       # receives posted per source
        self.collective_seq: dict[tuple, int] = defaultdict(int)

    def _new_group(self, ranks):
        return tuple(ranks)

    def _collective(self, group: Group, contribution: torch.Tensor | None, combine) -> torch.Tensor:
        key = tuple(group.ranks)
        seq = self.collective_seq[key]
        self.collective_seq[key] += 1
        return self.shared.reduce((key, seq), self.rank, contribution, len(group.ranks), combine)

    def _allreduce_sum(self, flat, group: Group):
        flat.copy_(self._collective(group, flat, torch.Tensor.add_))

    def _broadcast(self, flat, root, group: Group):
        flat.copy_(self._collective(group, flat if self.rank == root else None, None))

    def _send(self, tensor, dst):
        self.shared.post(self.rank, dst, tensor)

    def _recv(self, tensor, src):
        self._irecv(tensor, src).wait()

    def _isend(self, tensor, dst):
        self.shared.post(self.rank, dst, tensor)
        return _Sent()

    def _irecv(self, tensor, src):
        seq = self.posted[src]
        self.posted[src] += 1
        return _Receive(self.shared, src, self.rank, seq, tensor)

    def abort(self, code: int = 1):
        self.shared.abort(code)


def run_ranks(size: int, work, timeout_s: float = 120.0) -> list:
    """Run `work(comm)` on `size` threads, one LoopbackComm each; returns their results by
    rank, or raises the first rank's exception (after every thread has ended)."""
    world = LoopbackWorld(size)
    results, errors = [None] * size, [None] * size

    def rank_main(rank: int):
        try:
            results[rank] = work(LoopbackComm(world, rank, timeout_s))
        except BaseException as err:   # noqa: BLE001 - re-raised below, on the caller's thread
            errors[rank] = err
            world.abort(1)   # a failed rank releases the others from their waits

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"loopback-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not _is_abort_echo(e)), None) or \
        next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def _is_abort_echo(err: BaseException) -> bool:
    """A rank released by another's failure, not a failure of its own."""
    return isinstance(err, RuntimeError) and str(err).startswith("loopback job aborted")
