"""Horovod backend: hvd.allreduce/broadcast with process sets (the cluster default).

Horovod has no point-to-point operations; the pipelined evaluation and the hybrid
fine-tune send boundary activations over mpi4py on the same MPI world, which Horovod
shares when it runs on MPI (mpi4py initialises MPI with thread level MULTIPLE, which
Horovod's background thread needs).
"""
from __future__ import annotations

import torch

from hpcaux.comm.base import Comm, Group


class HorovodComm(Comm):
    name = "horovod"

    def __init__(self, timeout_s: float):
        from mpi4py import MPI  # initialise MPI first, with THREAD_MULTIPLE
        import horovod.torch as hvd

        self.MPI, self.hvd = MPI, hvd
        hvd.init(process_sets="dynamic")
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), timeout_s)
        self.world.handle = hvd.global_process_set
        self._ops = 0

    def _name(self, what):
        self._ops += 1
        return f"hpcaux.{what}.{self._ops}"

    def _new_group(self, ranks):
        return self.hvd.add_process_set(ranks)

    def _allreduce_sum(self, flat, group: Group):
        self.hvd.allreduce_(flat, op=self.hvd.Sum, process_set=group.handle, name=self._name("allreduce"))

    def _broadcast(self, flat, root, group: Group):
        self.hvd.broadcast_(flat, root_rank=root, process_set=group.handle, name=self._name("broadcast"))

    def _send(self, tensor, dst):
        self.MPI.COMM_WORLD.Send(tensor.detach().cpu().numpy(), dest=dst)

    def _recv(self, tensor, src):
        host = tensor if tensor.device.type == "cpu" else torch.empty_like(tensor, device="cpu")
        self.MPI.COMM_WORLD.Recv(host.numpy(), source=src)
        if host is not tensor:
            tensor.copy_(host)

    def abort(self, code: int = 1):
        self.MPI.COMM_WORLD.Abort(code)

    def finalize(self):
        self.hvd.shutdown()
