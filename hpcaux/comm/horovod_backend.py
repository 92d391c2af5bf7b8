"""Horovod backend: hvd.allreduce/broadcast with process sets (the cluster default).

Horovod has no point-to-point operations, which the pipelined evaluation and the hybrid
fine-tune need. Under an MPI launcher (mpirun, srun --mpi=pmix) they go over mpi4py on
the same MPI world (mpi4py initialises MPI with THREAD_MULTIPLE, which Horovod's
background thread then shares). Under `horovodrun --gloo` there is no MPI world: a
torch.distributed gloo group is set up for them instead, its address sent from rank 0
with Horovod's own broadcast.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch

from hpcaux.comm import launch
from hpcaux.comm.base import Comm, Group, StagedRequest
from hpcaux.comm.mpi4py_backend import HOST, mpi_irecv, mpi_isend


CPU_POLLING_DEFAULTS = {"HOROVOD_CYCLE_TIME": "20", "OMPI_MCA_mpi_yield_when_idle": "1"}


class _MpiPointToPoint:
    """Sends over the MPI world; `stage` is the Comm's counted host staging (Comm._staged)."""

    def __init__(self, stage):
        from mpi4py import MPI

        self.MPI, self.stage = MPI, stage

    def send(self, tensor, dst):
        self.MPI.COMM_WORLD.Send(self.stage(tensor.detach(), HOST).numpy(), dest=dst)

    def recv(self, tensor, src):
        host = self.stage(tensor, HOST, fill=False)
        self.MPI.COMM_WORLD.Recv(host.numpy(), source=src)
        if host is not tensor:
            tensor.copy_(host)

    def isend(self, tensor, dst):
        return mpi_isend(self.MPI.COMM_WORLD, self.stage(tensor, HOST), dst)

    def irecv(self, tensor, src):
        return mpi_irecv(self.MPI.COMM_WORLD, self.stage(tensor, HOST, fill=False), tensor, src)

    def abort(self, code):
        self.MPI.COMM_WORLD.Abort(code)


class _GlooPointToPoint:
    """Sends over a torch.distributed gloo group (host memory); `stage` as above."""

    def __init__(self, hvd, timeout_s, stage):
        import torch.distributed as dist

        self.dist, self.stage = dist, stage
        address = None
        if hvd.rank() == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                address = (socket.gethostname(), s.getsockname()[1])
        host, port = hvd.broadcast_object(address, root_rank=0, name="hpcaux.p2p_address")
        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=hvd.rank(),
                                world_size=hvd.size(), timeout=datetime.timedelta(seconds=timeout_s + 60))

    def send(self, tensor, dst):
        self.dist.send(self.stage(tensor.detach(), HOST), dst)

    def recv(self, tensor, src):
        host = self.stage(tensor, HOST, fill=False)
        self.dist.recv(host, src)
        if host is not tensor:
            tensor.copy_(host)

    def isend(self, tensor, dst):
        host = self.stage(tensor, HOST)
        return StagedRequest(self.dist.isend(host, dst).wait, host)

    def irecv(self, tensor, src):
        host = self.stage(tensor, HOST, fill=False)
        return StagedRequest(self.dist.irecv(host, src).wait, host, tensor)

    def abort(self, code):
        os._exit(code)  # horovodrun tears the other workers down when one exits non-zero


class HorovodComm(Comm):
    name = "horovod"

    def __init__(self, timeout_s: float):
        over_mpi = launch.launched_by_mpi()
        if not torch.cuda.is_available():
            # On CPUs the ranks' compute shares the cores with Horovod's background thread,
            # which polls MPI every cycle (1 ms by default). Measured on 2 cores, ResNet-20
            # K=2: 957 ms per step as shipped, 575 ms with these two, 515 ms with mpi4py.
            for key, value in CPU_POLLING_DEFAULTS.items():
                os.environ.setdefault(key, value)
        if over_mpi:
            from mpi4py import MPI  # noqa: F401  (initialise MPI first, with THREAD_MULTIPLE)
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init(process_sets="dynamic")
        self.p2p = _MpiPointToPoint(self._staged) if over_mpi else _GlooPointToPoint(hvd, timeout_s, self._staged)
        self.transport = "mpi" if over_mpi else "gloo"
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), timeout_s)
        self.world.handle = hvd.global_process_set
        self._ops: dict = {}

    def _name(self, what, group: Group):
        """Horovod matches collectives across ranks by name: number them in call order
        per process set (a rank skips the collectives of sets it is not in)."""
        key = tuple(group.ranks)
        self._ops[key] = self._ops.get(key, 0) + 1
        return f"hpcaux.{what}.{'-'.join(map(str, key))}.{self._ops[key]}"

    def _new_group(self, ranks):
        return self.hvd.add_process_set(ranks)

    def _isend(self, tensor, dst):
        return self.p2p.isend(tensor, dst)

    def _irecv(self, tensor, src):
        return self.p2p.irecv(tensor, src)

    def _allreduce_sum(self, flat, group: Group):
        self.hvd.allreduce_(flat, op=self.hvd.Sum, process_set=group.handle, name=self._name("allreduce", group))

    def _broadcast(self, flat, root, group: Group):
        self.hvd.broadcast_(flat, root_rank=root, process_set=group.handle, name=self._name("broadcast", group))

    def _send(self, tensor, dst):
        self.p2p.send(tensor, dst)

    def _recv(self, tensor, src):
        self.p2p.recv(tensor, src)

    def abort(self, code: int = 1):
        self.p2p.abort(code)

    def finalize(self):
        self.hvd.shutdown()
