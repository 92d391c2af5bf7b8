"""torch.distributed backend: gloo on the CPU (and for ranks that share a GPU), NCCL for one rank per GPU.

The process group's own timeout is set past the watchdog's, so that a hang is reported
by the watchdog's line (which names rank, stage and peers) rather than by gloo.
Under mpirun or srun there is no MASTER_ADDR; rank 0 then picks its host name and a free
port and hands them to the others over MPI (mpi4py), the one thing MPI is used for here.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist

from hpcaux.comm import launch
from hpcaux.comm.base import Comm, Group, StagedRequest


def _rendezvous_address() -> tuple[str, str]:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    from mpi4py import MPI

    address = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = (socket.gethostname(), str(s.getsockname()[1]))
    return MPI.COMM_WORLD.bcast(address, root=0)


def _own_gpu(device: torch.device) -> bool:
    """Whether this rank has a GPU to itself: NCCL refuses two ranks of a communicator on
    one GPU, so ranks that share one (more ranks on the node than GPUs) use gloo."""
    return device.type == "cuda" and launch.local_size() <= torch.cuda.device_count()


class TorchComm(Comm):
    name = "torch"

    def __init__(self, timeout_s: float, device: torch.device):
        rank, size = launch.world_rank(), launch.world_size()
        addr, port = _rendezvous_address() if size > 1 else ("127.0.0.1", "0")
        self.device = device
        backend = self.transport = "nccl" if _own_gpu(device) else "gloo"
        # gloo moves CPU tensors (its CUDA support does not cover send/recv): tensors of a
        # GPU rank that shares its GPU travel through host memory.
        self.wire = device if backend == "nccl" else torch.device("cpu")
        if size > 1:
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                    world_size=size, timeout=datetime.timedelta(seconds=timeout_s + 60))
        super().__init__(rank, size, launch.local_rank(), timeout_s)

    def _on_device(self, t, fill: bool = True):
        """`t`, or a (counted) buffer on the device the messages move on."""
        return self._staged(t, self.wire, fill)

    def _new_group(self, ranks):
        return dist.new_group(ranks) if self.size > 1 else None

    def _allreduce_sum(self, flat, group: Group):
        buf = self._on_device(flat)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group.handle)
        if buf is not flat:
            flat.copy_(buf)

    def _broadcast(self, flat, root, group: Group):
        buf = self._on_device(flat)
        dist.broadcast(buf, src=root, group=group.handle)
        if buf is not flat:
            flat.copy_(buf)

    def _send(self, tensor, dst):
        dist.send(self._on_device(tensor), dst)

    def _recv(self, tensor, src):
        buf = self._on_device(tensor, fill=False)
        dist.recv(buf, src)
        if buf is not tensor:
            tensor.copy_(buf)

    def _isend(self, tensor, dst):
        buf = self._on_device(tensor)
        return StagedRequest(dist.isend(buf, dst).wait, buf)

    def _irecv(self, tensor, src):
        buf = self._on_device(tensor, fill=False)
        return StagedRequest(dist.irecv(buf, src).wait, buf, tensor)

    def abort(self, code: int = 1):
        if launch.launched_by_mpi():
            try:
                from mpi4py import MPI
                MPI.COMM_WORLD.Abort(code)
            except ImportError:
                pass
        os._exit(code)

    def finalize(self):
        """Destroy the process groups and join gloo's worker threads now.

        A gloo worker lives until the last reference to its process group goes, and it
        releases a collective's tensors after the caller's wait() has returned. Left to
        the interpreter's shutdown, that release takes the GIL from a finalizing
        interpreter and the rank aborts (signal 6) after its work is done. Dropping the
        group handles here lets the groups' destructors join the workers first."""
        if dist.is_initialized():
            dist.destroy_process_group()
        for group in self._groups.values():
            group.handle = None
        gc.collect()

