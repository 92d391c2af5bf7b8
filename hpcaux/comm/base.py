"""The collective interface every hpcaux module talks to (docs/design.md §2).

Backends implement a handful of primitives on a single flat tensor; this base class
packs tensor lists into one buffer (one collective per call, however many tensors), and
runs every blocking call under the watchdog so that a lost peer aborts the job with a
line saying who waited on what.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hpcaux.comm.watchdog import Watchdog
from hpcaux.errors import UserError


@dataclass
class Group:
    """A sub-set of world ranks (a process set); `handle` is the backend's object."""
    ranks: list
    handle: object = field(default=None, repr=False)


class Comm(abc.ABC):
    name = "base"
    host_trips = 0   # device tensors staged through host memory to be moved (see _staged)
    transport = "none"  # what moves the point-to-point messages (nccl, gloo, mpi)

    def __init__(self, rank: int, size: int, local_rank: int, timeout_s: float):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.world = Group(list(range(size)))
        self._groups: dict[tuple, Group] = {}
        self.watchdog = Watchdog(rank, timeout_s, self.abort)

    # --- what backends provide -------------------------------------------------------
    @abc.abstractmethod
    def _allreduce_sum(self, flat: torch.Tensor, group: Group): ...

    @abc.abstractmethod
    def _broadcast(self, flat: torch.Tensor, root: int, group: Group): ...

    @abc.abstractmethod
    def _send(self, tensor: torch.Tensor, dst: int): ...

    @abc.abstractmethod
    def _recv(self, tensor: torch.Tensor, src: int): ...

    @abc.abstractmethod
    def _isend(self, tensor: torch.Tensor, dst: int): ...

    @abc.abstractmethod
    def _irecv(self, tensor: torch.Tensor, src: int): ...

    @abc.abstractmethod
    def _new_group(self, ranks: list) -> object: ...

    @abc.abstractmethod
    def abort(self, code: int = 1): ...

    def finalize(self):
        """Release backend resources; the default has none."""

    def _staged(self, tensor: torch.Tensor, device: torch.device, fill: bool = True) -> torch.Tensor:
        """`tensor` itself when it is on `device` (where the backend moves data), else a
        buffer there: a copy of it (`fill`), or an empty one for a receive. A device tensor
        staged in host memory is counted in `host_trips` (summary.json's
        host_trips_per_rank): with NCCL the pipeline's sends make none, and a test checks it.
        (Host-born statistics copied to the GPU for an NCCL collective are not counted.)"""
        if tensor.device == device:
            return tensor
        if device.type == "cpu":
            self.host_trips += 1
        return tensor.to(device) if fill else torch.empty_like(tensor, device=device)

    # --- the interface -----------------------------------------------------------------
    def new_group(self, ranks) -> Group:
        """A process set; every world rank must call this, in the same order. A set is
        created once per job and then reused (Horovod refuses a duplicate process set, and
        a second trainer in the same process asks for the same sets)."""
        ranks = sorted(ranks)
        if len(ranks) == 1:
            return Group(ranks)  # nothing to reduce over; no backend object needed
        if ranks == self.world.ranks:
            return self.world
        key = tuple(ranks)
        if key not in self._groups:
            with self.watchdog.guard(f"new_group({ranks})", self.world.ranks):
                self._groups[key] = Group(ranks, self._new_group(ranks))
        return self._groups[key]

    def _packed(self, tensors, group: Group, label: str, operation):
        """Pack `tensors` into one buffer, run `operation(flat)` under the watchdog, unpack.

        One collective per call however many tensors; a one-rank group needs none.
        """
        tensors = list(tensors)
        if len(group.ranks) == 1 or not tensors:
            return tensors
        flat = _flatten_dense_tensors([t.detach() for t in tensors])
        with self.watchdog.guard(label.format(n=flat.numel()), group.ranks):
            operation(flat)
        for t, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.detach().copy_(value)
        return tensors

    def allreduce(self, tensors, op: str = "sum", group: Group | None = None, what: str = "allreduce"):
        """In-place sum or mean of a list of tensors over `group`, as one collective."""
        if op not in ("sum", "mean"):
            raise ValueError(f"unknown reduction {op!r}")
        group = group or self.world

        def reduce(flat):
            self._allreduce_sum(flat, group)
            if op == "mean":
                flat /= len(group.ranks)

        return self._packed(tensors, group, what + " of {n} values", reduce)

    def broadcast(self, tensors, root: int = 0, group: Group | None = None, what: str = "broadcast"):
        group = group or self.world
        return self._packed(tensors, group, f"{what} from rank {root}",
                            lambda flat: self._broadcast(flat, root, group))

    def broadcast_object(self, obj, root: int = 0):
        """A picklable object from `root` to every rank (small things: cut points, config)."""
        import pickle

        payload = pickle.dumps(obj) if self.rank == root else b""
        length = torch.tensor([len(payload)], dtype=torch.int64)
        self.broadcast([length], root, what="broadcast_object size")
        buf = torch.zeros(int(length), dtype=torch.uint8)
        if self.rank == root:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.broadcast([buf], root, what="broadcast_object")
        return pickle.loads(buf.numpy().tobytes())

    def gather_per_rank(self, values: dict[str, float]) -> dict[str, torch.Tensor]:
        """Every rank's value of each named quantity, as a float64 tensor indexed by rank
        (logs, summaries); every rank passes the same names, in one allreduce."""
        table = torch.zeros(self.size, len(values), dtype=torch.float64)
        table[self.rank] = torch.tensor(list(values.values()), dtype=torch.float64)
        self.allreduce([table], op="sum", what="allreduce per-rank statistics")
        return {name: table[:, i] for i, name in enumerate(values)}

    def gather_text(self, text: str, width: int = 256) -> list[str]:
        """Every rank's short string (its host name), indexed by rank, in one allreduce of
        a rank x width table: fixed width, so no rank waits on another's length."""
        encoded = text.encode()[:width]
        table = torch.zeros(self.size, width, dtype=torch.int32)
        table[self.rank, :len(encoded)] = torch.tensor(list(encoded), dtype=torch.int32)
        self.allreduce([table], op="sum", what="allreduce of per-rank text")
        return [bytes(row[row > 0].to(torch.uint8).tolist()).decode(errors="replace") for row in table]

    def agree(self, check, what: str):
        """Run a check that may fail on some ranks only; fail on all ranks alike.

        Without this, a rank that finds (say) its checkpoint file corrupt exits while the
        others wait in the next collective. Every rank learns whether any failed and
        raises the lowest failing rank's message, so rank 0 prints it and all exit 2.
        """
        try:
            result, problem = check(), None
        except UserError as err:
            result, problem = None, str(err)
        failed = torch.zeros(self.size)
        failed[self.rank] = float(problem is not None)
        self.allreduce([failed], what=f"agree on {what}")
        if failed.any():
            raise UserError(self.broadcast_object(problem, root=int(failed.nonzero()[0])))
        return result

    def send(self, tensor: torch.Tensor, dst: int, what: str = "send"):
        with self.watchdog.guard(f"{what} to rank {dst}", [self.rank, dst]):
            self._send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int, what: str = "recv"):
        with self.watchdog.guard(f"{what} from rank {src}", [src, self.rank]):
            self._recv(tensor, src)
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int, what: str = "isend") -> "Pending":
        """Start sending `tensor` (kept alive until waited on); returns at once."""
        tensor = tensor.detach().contiguous()
        return Pending(self, self._isend(tensor, dst), f"{what} to rank {dst}", [self.rank, dst], tensor)

    def irecv(self, tensor: torch.Tensor, src: int, what: str = "irecv") -> "Pending":
        """Post a receive into `tensor`; `wait()` on the result before reading it."""
        return Pending(self, self._irecv(tensor, src), f"{what} from rank {src}", [src, self.rank], tensor)

    def barrier(self, what: str = "barrier"):
        self.allreduce([torch.zeros(1)], what=what)


class Pending:
    """A non-blocking send or receive. `wait()` completes it under the hang watchdog and
    returns the tensor (for a receive: filled in). Backends return a handle with `wait()`
    that does the completion (and, where a device tensor was staged through the host,
    the copy back)."""

    def __init__(self, comm: Comm, handle, what: str, peers: list, tensor: torch.Tensor):
        self.comm, self.handle, self.what, self.peers, self.tensor = comm, handle, what, peers, tensor

    def wait(self) -> torch.Tensor:
        if self.handle is not None:
            with self.comm.watchdog.guard(self.what, self.peers):
                self.handle.wait()
            self.handle = None
        return self.tensor


class StagedRequest:
    """A backend's request, with the buffer it uses: `wait()` completes it and, where the
    data was staged through another buffer (a device tensor through the host), copies the
    staged data into the target. Holding `staged` keeps a send's buffer alive until then."""

    def __init__(self, complete, staged: torch.Tensor, target: torch.Tensor | None = None):
        self.complete, self.staged, self.target = complete, staged, target

    def wait(self):
        self.complete()
        if self.target is not None and self.staged is not self.target:
            self.target.copy_(self.staged)
