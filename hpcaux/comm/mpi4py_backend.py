"""mpi4py backend: MPI collectives on host memory (CUDA tensors are staged through it)."""
from __future__ import annotations

import torch

from hpcaux.comm.base import Comm, Group, StagedRequest


def _host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def mpi_isend(mpi_comm, tensor: torch.Tensor, dst: int) -> StagedRequest:
    """A non-blocking MPI send of a tensor (through host memory); also Horovod's."""
    host = _host(tensor.detach())
    return StagedRequest(mpi_comm.Isend(host.numpy(), dest=dst).Wait, host)


def mpi_irecv(mpi_comm, tensor: torch.Tensor, src: int) -> StagedRequest:
    """A non-blocking MPI receive into a tensor (staged through host memory); also Horovod's."""
    host = tensor if tensor.device.type == "cpu" else torch.empty_like(tensor, device="cpu")
    return StagedRequest(mpi_comm.Irecv(host.numpy(), source=src).Wait, host, tensor)


class Mpi4pyComm(Comm):
    name = "mpi4py"

    def __init__(self, timeout_s: float):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), node.Get_rank(), timeout_s)
        self.world.handle = self.comm

    def _new_group(self, ranks):
        # Split is collective over the world, as new_group promises; non-members get COMM_NULL.
        return self.comm.Split(0 if self.rank in ranks else self.MPI.UNDEFINED, key=self.rank)

    def _allreduce_sum(self, flat, group: Group):
        host = _host(flat)
        group.handle.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self.MPI.SUM)
        if host is not flat:
            flat.copy_(host)

    def _broadcast(self, flat, root, group: Group):
        host = _host(flat)
        group.handle.Bcast(host.numpy(), root=group.ranks.index(root))
        if host is not flat:
            flat.copy_(host)

    def _send(self, tensor, dst):
        self.comm.Send(_host(tensor).numpy(), dest=dst)

    def _recv(self, tensor, src):
        host = _host(tensor)
        self.comm.Recv(host.numpy(), source=src)
        if host is not tensor:
            tensor.copy_(host)

    def _isend(self, tensor, dst):
        return mpi_isend(self.comm, tensor, dst)

    def _irecv(self, tensor, src):
        return mpi_irecv(self.comm, tensor, src)

    def abort(self, code: int = 1):
        self.comm.Abort(code)
