"""Collectives for hpcaux: one interface (base.Comm), three backends, chosen by config.

`create_comm(backend, timeout_s, device)` returns a Comm. A backend that is not installed
is a UserError naming the backend and how to get it, not an ImportError traceback.
`auto` (the default) takes torch.distributed on CPUs, where gloo's allreduce returns as soon
as the data is there while Horovod's background loop batches requests on a cycle, and
gloo's threads move a point-to-point message while the rank computes where mpi4py moves
it inside the wait (docs/benchmarks.md measures all three); and on GPUs Horovod where it
is installed (NCCL, tensor fusion) and the run sends no activations every step,
torch.distributed (NCCL, point to point on the device) otherwise.
"""
from __future__ import annotations

import importlib.util
import typing

from hpcaux.errors import UserError

if typing.TYPE_CHECKING:
    import torch

    from hpcaux.comm.base import Comm, Group

REQUIRES = {"horovod": ("horovod", "pip install '.[horovod]' (see scripts/install.sh)"),
            "mpi4py": ("mpi4py", "pip install mpi4py"),
            "torch": ("torch", "pip install torch")}


def available_backends() -> list[str]:
    return [name for name, (module, _) in REQUIRES.items() if importlib.util.find_spec(module)]


def __getattr__(name: str):
    """Comm and Group on first use: importing hpcaux.comm.launch (the CLI does, before it
    installs its signal handlers) must not import torch, which takes a second or two."""
    if name in ("Comm", "Group"):
        from hpcaux.comm import base
        return getattr(base, name)
    raise AttributeError(f"module 'hpcaux.comm' has no attribute {name!r}")


def resolve_backend(backend: str, device: "torch.device | None", sends_every_step: bool = False) -> str:
    """The backend `auto` stands for on this device; any other name as given. A run that
    sends activations and gradients between ranks every step (the pipeline, the neighbour
    exchange) takes torch.distributed on GPUs too: NCCL moves them device to device, where
    Horovod has no point-to-point calls and its sends go through host memory."""
    if backend != "auto":
        return backend
    on_gpu = device is not None and device.type == "cuda"
    return "horovod" if on_gpu and not sends_every_step and importlib.util.find_spec("horovod") else "torch"


def create_comm(backend: str, timeout_s: float = 300.0, device: "torch.device | None" = None,
                sends_every_step: bool = False) -> "Comm":
    backend = resolve_backend(backend, device, sends_every_step)
    if backend not in REQUIRES:
        raise UserError(f"unknown comm backend '{backend}' (choose from {', '.join(REQUIRES)})")
    module, how = REQUIRES[backend]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"comm backend '{backend}' is not installed: {how}, or set comm.backend=torch")
    if backend == "horovod":
        from hpcaux.comm.horovod_backend import HorovodComm
        return HorovodComm(timeout_s)
    if backend == "mpi4py":
        from hpcaux.comm.mpi4py_backend import Mpi4pyComm
        return Mpi4pyComm(timeout_s)
    import torch

    from hpcaux.comm.torch_backend import TorchComm
    return TorchComm(timeout_s, device or torch.device("cpu"))


__all__ = ["Comm", "Group", "create_comm", "available_backends", "resolve_backend"]
