"""mpi4py backend: MPI collectives on host memory (CUDA tensors are staged through it)."""
from __future__ import annotations

import torch

from hpcaux.comm.base import Comm, Group, StagedRequest

HOST = torch.device("cpu")


def mpi_isend(mpi_comm, host: torch.Tensor, dst: int) -> StagedRequest:
    """A non-blocking MPI send of a host tensor (a device one staged by the caller); also Horovod's."""
    return StagedRequest(mpi_comm.Isend(host.numpy(), dest=dst).Wait, host)


def mpi_irecv(mpi_comm, host: torch.Tensor, tensor: torch.Tensor, src: int) -> StagedRequest:
    """A non-blocking MPI receive into `host`, copied into `tensor` on wait; also Horovod's."""
    return StagedRequest(mpi_comm.Irecv(host.numpy(), source=src).Wait, host, tensor)


class Mpi4pyComm(Comm):
    name = "mpi4py"
    transport = "mpi"

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
        host = self._staged(flat, HOST)
        group.handle.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self.MPI.SUM)
        if host is not flat:
            flat.copy_(host)

    def _broadcast(self, flat, root, group: Group):
        host = self._staged(flat, HOST)
        group.handle.Bcast(host.numpy(), root=group.ranks.index(root))
        if host is not flat:
            flat.copy_(host)

    def _send(self, tensor, dst):
        self.comm.Send(self._staged(tensor, HOST).numpy(), dest=dst)

    def _recv(self, tensor, src):
        host = self._staged(tensor, HOST, fill=False)
        self.comm.Recv(host.numpy(), source=src)
        if host is not tensor:
            tensor.copy_(host)

    def _isend(self, tensor, dst):
        return mpi_isend(self.comm, self._staged(tensor, HOST), dst)

    def _irecv(self, tensor, src):
        return mpi_irecv(self.comm, self._staged(tensor, HOST, fill=False), tensor, src)

    def abort(self, code: int = 1):
        self.comm.Abort(code)
