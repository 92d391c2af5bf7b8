"""RUN/aux.h5: auxiliary variables, multipliers, AuxNet snapshots and metric series.

Layout (docs/design.md §4):

    /meta                         attrs: config (YAML), version, K, D, dataset, git sha, mode
    /boundary_{k}/z               (N, C, H, W) stored auxiliary variables  (aux_source: stored)
    /boundary_{k}/lambda          (N, C, H, W) AL multipliers              (lp.loss: al)
    /boundary_{k}/lambda_real     (N, C, H, W) AL multipliers, real input  (lp.loss: al_real)
    /boundary_{k}/real_{p}        (N, C, H, W) stage k's real outputs,     (real_inputs: stored)
                                  written in epochs of parity p, NaN where none was
    /boundary_{k}/snapshots/e{E}  AuxNet outputs A_k(x) on a fixed probe set after epoch E
    /boundary_{k}/real_snapshots/e{E}  the composed network's F_k(...F_0(x)) on the same set
    /metrics/{name}               per-epoch series, first axis = epoch

Two ways to write it, one way to read it:

* `mpio` (h5py built against parallel HDF5 and an MPI launch): every rank opens the one
  file. Creating and resizing datasets is collective, so every rank makes every call.
  A per-sample array is written by its writers only (z_k by stage k's rank, lambda_k and
  real outputs by the replicas of stage k); stage k+1 reads z_k and the real outputs.
  Each sample is touched once per epoch (a real-output buffer is read in the epoch after
  the one that wrote it), and the file is flushed collectively at every epoch end, which
  makes the writes visible (MPI-IO sync-barrier-sync). Metric rows and snapshots are collective writes in
  which the ranks with nothing to write select nothing — a rank that skipped the call
  would deadlock the others. (h5py's own zero-length slice write `ds[i:i] = ...` issues
  no H5Dwrite at all and deadlocks the owner; we call H5Dwrite with select_none.)
  Every collective call runs under the hang watchdog.
* `per_rank` (serial h5py, or no MPI): rank r writes aux.rank{r}.h5 holding every
  per-sample array it uses (stage k+1 keeps its own identical copy of z_k instead of
  reading a file another process is writing). At every flush rank 0 rewrites aux.h5 as
  virtual datasets over the owners' files, atomically.

Readers (`hpcaux analyze`, h5py, xarray, h5dump) open aux.h5 alone, with no MPI.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcaux.errors import UserError
from hpcaux.store.names import META, series_name


def mpio_available() -> bool:
    return bool(h5py.get_config().mpi)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


@dataclass(frozen=True)
class ArraySpec:
    """A dataset of the store and who touches it.

    owner:   the rank whose copy aux.h5 shows (per_rank) and who writes collective rows;
    writers: ranks that write rows of a per-sample array in mpio mode (the replicas of a
             stage share one array there);
    holders: ranks that keep it in their own file in per_rank mode.
    """
    name: str
    shape: tuple
    dtype: str
    owner: int
    holders: tuple
    writers: tuple = ()
    chunks: tuple | None = None
    growable: bool = False  # metric series grow along the epoch axis
    wide: bool = False      # ... and along axis 1 (per-rank series: a resume may change the world size)
    fill: float = 0.0       # what a row holds before it is written (NaN: "nothing recorded")


def contiguous_runs(sorted_idx: np.ndarray):
    """(start, stop, position) of each run of consecutive indices in `sorted_idx`.

    h5py's fancy indexing (`ds[[3, 17, 40]]`) on a dataset chunked by sample is about ten
    times slower than one slice per run (measured: 250 ms against 25 ms for 128 rows of
    16x32x32 floats), so rows are read and written run by run.
    """
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(sorted_idx)]):
        yield int(sorted_idx[a]), int(sorted_idx[b - 1]) + 1, int(a)


class AuxStore:
    def __init__(self, run_dir: Path, rank: int, size: int, mode: str, mpi_comm=None, guard=None,
                 resume: bool = False):
        """`resume`: the file must be there and hold a run (h5py's mode "a" would silently
        re-create a missing or empty one, losing the per-sample state the run resumes)."""
        self.run_dir, self.rank, self.size, self.mode = Path(run_dir), rank, size, mode
        self.mpi_comm = mpi_comm
        self._guard = guard
        self.path = self.run_dir / "aux.h5"
        self.specs: dict[str, ArraySpec] = {}
        self.series_rows: dict[str, int] = {}  # rows of each growable series (all ranks know)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.path if mode == "mpio" else self.run_dir / f"aux.rank{rank}.h5"
        # per_rank: rank 0's file holds /meta and the series; a rank beyond the old world
        # (a resume with more replicas) starts a file of its own
        must_exist = resume and (mode == "mpio" or rank == 0)
        if (must_exist and not path.is_file()) or (resume and path.is_file() and path.stat().st_size == 0):
            raise UserError(f"HDF5 store {path} is missing or empty, but the run resumes from it "
                            f"(it holds the run's metrics and per-sample state): restore it from a copy")
        access = "r+" if must_exist else "a"
        try:
            with self._collective(f"open {path.name}"):
                self.file = (h5py.File(path, access, driver="mpio", comm=mpi_comm) if mode == "mpio"
                             else h5py.File(path, access))
        except OSError as err:
            raise UserError(f"HDF5 store {path} is corrupt or unreadable ({str(err).splitlines()[0]})") from None
        if must_exist and META not in self.file:
            self.file.close()
            raise UserError(f"HDF5 store {path} holds no hpcaux run (/{META} is missing): restore it from a copy")

    def _collective(self, what: str):
        """The watchdog's guard around a collective HDF5 call (a no-op per rank)."""
        if self.mode != "mpio" or self._guard is None:
            return contextlib.nullcontext()
        return self._guard(f"HDF5 {what}", list(range(self.size)))

    # --- declaring datasets (every rank declares every dataset, in the same order) -----------
    def declare(self, spec: ArraySpec):
        """Create (or reopen, on resume) a dataset; collective in mpio mode."""
        self.specs[spec.name] = spec
        if self.mode == "per_rank" and self.rank not in spec.holders:
            return
        if spec.name in self.file:
            ds = self.file[spec.name]
            if spec.wide and ds.shape[2:] == spec.shape[2:] and ds.dtype == np.dtype(spec.dtype):
                if spec.shape[1] > ds.shape[1]:
                    with self._collective(f"widen {spec.name}"):
                        ds.resize(spec.shape[1], axis=1)
                return
            # a series grows along epochs; a per-sample array must match whole (a resume with
            # another data.train_subset would otherwise index past it or mix samples)
            shape_fits = ds.shape[1:] == spec.shape[1:] if spec.growable else ds.shape == spec.shape
            chunks_fit = spec.chunks is None or ds.chunks == tuple(spec.chunks)
            if not shape_fits or ds.dtype != np.dtype(spec.dtype) or not chunks_fit:
                raise UserError(f"{self._file_name()} holds {spec.name} with shape {ds.shape} {ds.dtype} "
                                f"(chunks {ds.chunks}), this run needs {spec.shape} {spec.dtype} (chunks {spec.chunks})")
            return
        maxshape = None
        if spec.growable:
            maxshape = (None, None, *spec.shape[2:]) if spec.wide else (None, *spec.shape[1:])
        with self._collective(f"create {spec.name}"):
            self.file.create_dataset(spec.name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                                     maxshape=maxshape, fillvalue=spec.fill)

    def _file_name(self) -> str:
        return str(self.file.filename)

    def write_meta(self, attrs: dict):
        """Attributes of /meta (collective in mpio mode: every rank writes the same)."""
        if self.mode == "per_rank" and self.rank != 0:
            return
        with self._collective("write /meta"):
            meta = self.file.require_group(META)
            for key, value in attrs.items():
                meta.attrs[key] = value

    # --- per-sample arrays, batch by batch ----------------------------------------------------
    def read_rows(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(idx)
        ds = self.file[name]
        rows = np.empty((len(idx), *ds.shape[1:]), dtype=ds.dtype)
        for start, stop, at in contiguous_runs(np.asarray(idx[order])):
            ds.read_direct(rows, np.s_[start:stop], np.s_[at:at + stop - start])
        out = torch.empty((len(idx), *rows.shape[1:]), dtype=torch.float32)
        out[order] = torch.from_numpy(rows.astype(np.float32, copy=False))
        return out

    def write_rows(self, name: str, idx: torch.Tensor, values: torch.Tensor):
        """Independent write of rows: by the owner (mpio) or by every holder (per_rank)."""
        spec = self.specs[name]
        if self.mode == "mpio" and self.rank not in spec.writers:
            return
        order = torch.argsort(idx)
        rows = np.ascontiguousarray(values[order].detach().cpu().numpy().astype(spec.dtype))
        ds = self.file[name]
        for start, stop, at in contiguous_runs(np.asarray(idx[order])):
            ds.write_direct(rows, np.s_[at:at + stop - start], np.s_[start:stop])

    def fill_rows(self, name: str, start: int, values: torch.Tensor):
        """Contiguous rows from `start` (initialisation), same ownership rule as write_rows."""
        spec = self.specs[name]
        if self.mode == "mpio" and self.rank != spec.owner:
            return
        self.file[name][start:start + len(values)] = values.detach().cpu().numpy().astype(spec.dtype)

    # --- collective writes: metric rows and snapshots -----------------------------------------
    def write_collective(self, name: str, value, row: int | None = None):
        """Write `value` (at `row` of a series, or as the whole dataset) from the owner.

        Every rank calls this. In mpio mode the others take part with an empty selection
        (h5py turns a zero-length slice inside `collective` into an empty selection that
        still joins the collective call); a growable series is first resized, also
        collectively. In per_rank mode only the owner writes, to its own file.
        """
        spec = self.specs[name]
        if row is not None:
            self.series_rows[name] = max(self.series_rows.get(name, 0), row + 1)
        if self.mode == "per_rank" and self.rank != spec.owner:
            return
        ds = self.file[name]
        with self._collective(f"write {name}"):
            if row is not None and spec.growable and ds.shape[0] <= row:
                ds.resize(row + 1, axis=0)
            start, stop = (0, ds.shape[0]) if row is None else (row, row + 1)
            data = None
            if self.rank == spec.owner:
                data = np.asarray(value, dtype=spec.dtype)
                if row is not None:
                    data = data[None]
                if spec.wide and data.shape[1] < ds.shape[1]:  # fewer ranks than an earlier session
                    pad = np.full((data.shape[0], ds.shape[1] - data.shape[1], *data.shape[2:]), np.nan)
                    data = np.concatenate([data, pad], axis=1)
                data = data.reshape(stop - start, *ds.shape[1:])
            if self.mode == "per_rank":
                ds[start:stop] = data
            else:
                _collective_rows_write(ds, start, data)

    def declare_series(self, name: str, width: tuple, owner: int = 0, wide: bool = False):
        self.declare(ArraySpec(series_name(name), (0, *width), "f8", owner, (owner,),
                               chunks=(64, *width) if width else (64,), growable=True, wide=wide,
                               fill=np.nan))  # a series shows NaN where nothing was recorded

    # --- durability ---------------------------------------------------------------------------
    def flush(self, barrier=None):
        """Make every write durable and visible; in per_rank mode rebuild the aux.h5 index."""
        with self._collective("flush"):
            self.file.flush()  # collective in mpio mode
        if self.mode == "per_rank":
            barrier("barrier before indexing per-rank HDF5 files")
            if self.rank == 0:
                self._write_virtual_index()
            barrier("barrier after indexing per-rank HDF5 files")

    def _write_virtual_index(self):
        tmp = self.run_dir / "aux.h5.tmp"
        sizes = self._current_shapes()
        with h5py.File(tmp, "w") as index:
            for spec in self.specs.values():
                shape = sizes.get(spec.name, spec.shape)
                if 0 in shape:  # an empty series: nothing to point at yet
                    index.create_dataset(spec.name, shape=shape, dtype=spec.dtype)
                    continue
                layout = h5py.VirtualLayout(shape=shape, dtype=spec.dtype)
                # A relative source name resolves against aux.h5's own folder: the run can move.
                layout[...] = h5py.VirtualSource(f"aux.rank{spec.owner}.h5", spec.name, shape=shape)
                index.create_virtual_dataset(spec.name, layout, fillvalue=0)
            meta = index.require_group(META)
            for key, value in self.file[META].attrs.items() if META in self.file else []:
                meta.attrs[key] = value
        os.replace(tmp, self.path)

    def _current_shapes(self) -> dict:
        """Shapes of the growable series: rows written this session, or found in rank 0's file."""
        shapes = {}
        for name, spec in self.specs.items():
            if spec.growable:
                found = self.file[name].shape if name in self.file else spec.shape
                shapes[name] = (max(found[0], self.series_rows.get(name, 0)), *found[1:])
        return shapes

    def close(self, barrier=None):
        self.flush(barrier)
        with self._collective("close"):
            self.file.close()


def _collective_rows_write(ds, start: int, data: np.ndarray | None):
    """Collective H5Dwrite of rows [start, start+len(data)), or of nothing when data is None."""
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    fspace = ds.id.get_space()
    if data is None:
        fspace.select_none()
        mspace = h5py.h5s.create_simple((1,))
        mspace.select_none()
        data = np.zeros(1, dtype=ds.dtype)
    else:
        data = np.ascontiguousarray(data, dtype=ds.dtype)
        fspace.select_hyperslab((start,) + (0,) * (ds.ndim - 1), data.shape)
        mspace = h5py.h5s.create_simple(data.shape)
    ds.id.write(mspace, fspace, data, dxpl=dxpl)


def store_mode(requested: str) -> str:
    """The mode a run's store will open in (`auto`: mpio where it can work); opens nothing."""
    if requested == "per_rank":
        return "per_rank"
    if _mpi_world() is not None and mpio_available():
        return "mpio"
    if requested == "mpio":
        raise UserError("config key 'store.mode' is mpio, but h5py has no parallel HDF5 or the job has no MPI world; "
                        "use store.mode=per_rank")
    return "per_rank"


def open_store_for_run(run_dir: Path, comm, requested: str, resume: bool = False) -> AuxStore:
    """The store in the mode the config asks for (`store_mode`)."""
    mode = store_mode(requested)
    mpi_comm = _mpi_world() if mode == "mpio" else None
    return AuxStore(run_dir, comm.rank, comm.size, mode, mpi_comm, comm.watchdog.guard, resume=resume)


def _mpi_world():
    from hpcaux.comm import launch

    if not launch.launched_by_mpi():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD
