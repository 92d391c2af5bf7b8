"""Collective writes where some ranks have nothing to write must not hang (mpio and per_rank).

python check_store.py RUN_DIR MODE   (under mpirun -np N)
"""
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from common import make_comm
from hpcaux.store.aux_store import ArraySpec, AuxStore, _mpi_world

run_dir, mode = Path(sys.argv[1]), sys.argv[2]
comm = make_comm("mpi4py")
n = comm.size
store = AuxStore(run_dir, comm.rank, n, mode, _mpi_world(), comm.watchdog.guard)
# one series per rank, each owned by that rank: every rank writes one and selects nothing for the rest
for owner in range(n):
    store.declare_series(f"owned_by_{owner}", (3,), owner=owner)
store.declare(ArraySpec("snapshot", (4, 2), "f4", owner=n - 1, holders=(n - 1,)))
for epoch in range(2):
    for owner in range(n):
        store.write_collective(f"metrics/owned_by_{owner}", np.full(3, 10.0 * owner + epoch), row=epoch)
store.write_collective("snapshot", np.arange(8, dtype=np.float32).reshape(4, 2) if comm.rank == n - 1 else None)
store.declare(ArraySpec("rows", (10, 2), "f4", owner=0, holders=tuple(range(n)), writers=(0,)))
store.write_rows("rows", torch.tensor([7, 2]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
store.write_meta({"K": n})
store.close(comm.barrier)
comm.barrier()
if comm.rank == 0:
    with h5py.File(run_dir / "aux.h5", "r") as f:
        for owner in range(n):
            assert f[f"metrics/owned_by_{owner}"][()].tolist() == [[10.0 * owner] * 3, [10.0 * owner + 1] * 3]
        assert f["snapshot"][()].tolist() == np.arange(8).reshape(4, 2).tolist()
        assert f["rows"][2].tolist() == [3.0, 4.0] and f["rows"][7].tolist() == [1.0, 2.0]
        assert f["meta"].attrs["K"] == n
    print(f"store checks passed ({mode}, {n} ranks)")
comm.finalize()
