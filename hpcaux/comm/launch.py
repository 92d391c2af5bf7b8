"""Where this process sits in the job, read from the launcher's environment.

mpirun (Open MPI, MPICH/PMI), srun, horovodrun and torchrun each announce rank, size and the rank on
the node under their own names; this module reads them in one place.
"""
from __future__ import annotations

import os

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK", "SLURM_PROCID", "RANK")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE", "SLURM_NTASKS", "WORLD_SIZE")
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "HOROVOD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "HOROVOD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                   "LOCAL_WORLD_SIZE")


def _first_int(names, default=None):
    for name in names:
        value = os.environ.get(name, "")
        if value.split("(")[0].isdigit():  # SLURM_NTASKS_PER_NODE may read "2(x3)"
            return int(value.split("(")[0])
    return default


def world_rank() -> int:
    return _first_int(RANK_VARS, 0)


def world_size() -> int:
    return _first_int(SIZE_VARS, 1)


def local_rank() -> int:
    return _first_int(LOCAL_RANK_VARS, 0)


def local_size() -> int:
    return _first_int(LOCAL_SIZE_VARS, 1)


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"))
