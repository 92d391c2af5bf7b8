"""Per-process set-up shared by all trainers: device, threads, seeds."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from hpcaux.comm import launch
from hpcaux.errors import UserError


def select_device(local_rank: int, wanted: str = "auto") -> torch.device:
    """One rank per GPU (rank on the node modulo GPU count); the CPU where there are none
    (`auto`) or where asked (`cpu`). `cuda` without a GPU is an error, not a silent CPU run."""
    if wanted != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if wanted == "cuda":
        raise UserError("config key 'train.device' is cuda but torch sees no GPU (torch.cuda.is_available() is "
                        "False: no GPU on this node, CUDA_VISIBLE_DEVICES empty, or a CPU-only torch)")
    return torch.device("cpu")


def set_threads(threads: int):
    """`threads` intra-op threads, or cores / ranks on this node when 0 (at least 1)."""
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, cores // max(1, launch.local_size()))
    torch.set_num_threads(threads)
    return threads


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
