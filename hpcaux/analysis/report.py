"""`hpcaux analyze RUN/aux.h5`: a per-epoch table and PNG plots, read with plain h5py.

Works on both store modes (aux.h5 is either the shared file or the virtual index over
the per-rank files) and needs no MPI.
"""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from hpcaux.errors import UserError, refuse_file_in_the_way
from hpcaux.store.names import META, METRICS, boundary_group, real_snapshots_group, snapshots_group

HISTOGRAM_ROWS = 256  # samples read per boundary for the z / lambda histograms


class StoreView:
    """What a finished (or running) layer-parallel run left in its aux.h5."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise UserError(f"HDF5 store {path} does not exist")
        try:
            self.file = h5py.File(path, "r")
            self.metrics = {name: ds[()] for name, ds in self.file[METRICS].items()}
            self.meta = dict(self.file[META].attrs)
        except (OSError, KeyError) as err:
            raise UserError(f"HDF5 store {path} is corrupt or not an hpcaux store ({str(err).splitlines()[0]})") from None
        self.path = path
        self.K = int(self.meta["K"])
        self.epochs = len(self.metrics["composed_acc"])

    def boundary(self, b: int, name: str):
        key = f"{boundary_group(b)}/{name}"
        return self.file[key] if key in self.file else None

    def snapshots(self, b: int, kind: str = "auxnet") -> list[tuple[int, np.ndarray]]:
        """(epoch, probe outputs) at boundary b: the AuxNet's prediction (`auxnet`) or the
        composed network's activation (`real`), for the epochs the run recorded."""
        group = self.file.get((snapshots_group if kind == "auxnet" else real_snapshots_group)(b))
        if group is None:
            return []
        epochs = sorted(int(re.sub(r"\D", "", name)) for name in group)
        return [(e, group[f"e{e}"][()].astype(np.float32)) for e in epochs]

    def snapshot_drift(self, b: int, kind: str = "auxnet") -> list[tuple[int, float]]:
        """Relative change of the probe outputs between consecutive epochs."""
        snaps = self.snapshots(b, kind)
        return [(e1, float(np.linalg.norm(s1 - s0) / max(np.linalg.norm(s1), 1e-12)))
                for (e0, s0), (e1, s1) in zip(snaps, snaps[1:])]

    def probe_gap(self, b: int) -> dict[int, float]:
        """Per epoch, ||A_b - F_b||² / ||F_b||² on the probe images: how far the AuxNet's
        prediction is from the input the composed network gives stage b+1."""
        real = dict(self.snapshots(b, "real"))
        return {e: float(np.sum((a - real[e]) ** 2) / max(np.sum(real[e] ** 2), 1e-12))
                for e, a in self.snapshots(b) if e in real}

    def gradient_delays(self) -> np.ndarray | None:
        """Per stage, the optimiser steps between a forward and the returned gradient's
        backward (NaN where none returns); None for a store written before it was recorded."""
        return self.meta.get("gradient_delay_steps")

    def sample_rows(self, b: int, name: str) -> np.ndarray | None:
        ds = self.boundary(b, name)
        return None if ds is None else ds[:min(HISTOGRAM_ROWS, ds.shape[0])].astype(np.float32).ravel()


def _fmt(value) -> str:
    return "-" if value is None or np.isnan(float(value)) else f"{value:.4g}"


def summary_table(view: StoreView) -> str:
    """One row per epoch, one column per series the run has: a column with no value in any
    epoch (the AuxNet's under lp.aux_source none, z under any other source) is left out."""
    m = view.metrics
    drift = {b: dict(view.snapshot_drift(b)) for b in range(view.K - 1)}
    real_drift = {b: dict(view.snapshot_drift(b, "real")) for b in range(view.K - 1)}
    probe_gap = {b: view.probe_gap(b) for b in range(view.K - 1)}
    columns = [("rho", m["rho"]), ("composed", m["composed_acc"]), ("auxnet-path", m["auxnet_path_acc"])]
    for b in range(view.K - 1):
        columns += [(f"gap[{b}]", m["rel_gap"][:, b]), (f"train_gap[{b}]", m["train_rel_gap"][:, b]),
                    (f"lambda_rms[{b}]", m["multiplier_rms"][:, b]), (f"z_mean[{b}]", m["z_mean"][:, b]),
                    (f"z_std[{b}]", m["z_std"][:, b]),
                    (f"drift[{b}]", [drift[b].get(e + 1) for e in range(view.epochs)]),
                    (f"real_drift[{b}]", [real_drift[b].get(e + 1) for e in range(view.epochs)]),
                    (f"probe_gap[{b}]", [probe_gap[b].get(e + 1) for e in range(view.epochs)])]
    cells = [("epoch", [str(e + 1) for e in range(view.epochs)])]
    cells += [(name, [_fmt(v) for v in values[:view.epochs]]) for name, values in columns]
    cells = [(name, values) for name, values in cells if any(v != "-" for v in values)]
    rows = [[name for name, _ in cells]] + [[values[e] for _, values in cells] for e in range(view.epochs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cells))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    step = m["step_ms"][-1]
    lines.append(f"step time per rank in the last epoch (ms): {' '.join(_fmt(v) for v in step)}")
    delays = view.gradient_delays()
    if delays is not None and not np.all(np.isnan(delays)):
        lines.append(f"returned gradient applied after (optimiser steps) per stage: {' '.join(_fmt(v) for v in delays)}")
    return "\n".join(lines)


def make_plots(view: StoreView, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    m, epochs = view.metrics, np.arange(1, view.epochs + 1)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for b in range(view.K - 1):
        ax.plot(epochs, m["rel_gap"][:, b], "o-", label=f"held-out gap, boundary {b}")
        ax.plot(epochs, m["train_rel_gap"][:, b], "x--", label=f"training gap, boundary {b}")
    ax.set(xlabel="epoch", ylabel="relative gap ||F_k - A_k||² / ||A_k||²", yscale="log")
    twin = ax.twinx()
    twin.plot(epochs, m["rho"], "k:", label="rho")
    twin.set_ylabel("rho")
    ax.legend(fontsize=7, loc="upper right")
    save(fig, "gap_rho.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in range(m["step_ms"].shape[1]):
        ax.plot(epochs, m["step_ms"][:, r], "o-", label=f"rank {r} step")
        ax.plot(epochs, m["aux_ms"][:, r], ":", label=f"rank {r} AuxNet")
        ax.plot(epochs, m["comm_ms"][:, r], "--", label=f"rank {r} comm+wait")
    ax.set(xlabel="epoch", ylabel="ms per step")
    ax.legend(fontsize=7)
    save(fig, "step_time.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(epochs, m["composed_acc"], "o-", label="composed network")
    ax.plot(epochs, m["auxnet_path_acc"], "s--", label="AuxNet path F_K(A_{K-1}(x))")
    ax.set(xlabel="epoch", ylabel="held-out accuracy")
    ax.legend()
    save(fig, "accuracy.png")

    _plot_arrays_and_drift(plt, view, save)
    return written


def _plot_arrays_and_drift(plt, view: StoreView, save):
    """The histograms of the stored z and multipliers, and the probe snapshots' drift
    per epoch, where the run has them."""
    arrays = [(b, name) for b in range(view.K - 1) for name in ("z", "lambda", "lambda_real")
              if view.boundary(b, name) is not None]
    if arrays:
        fig, axes = plt.subplots(1, len(arrays), figsize=(4 * len(arrays), 3.5), squeeze=False)
        for ax, (b, name) in zip(axes[0], arrays):
            ax.hist(view.sample_rows(b, name), bins=80)
            ax.set(title=f"{name}, boundary {b}", yscale="log")
        save(fig, "histograms.png")

    drifts = {(b, kind): view.snapshot_drift(b, kind) for b in range(view.K - 1) for kind in ("auxnet", "real")}
    if any(drifts.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (b, kind), series in drifts.items():
            if series:
                ax.plot(*zip(*series), "o-" if kind == "auxnet" else "x--",
                        label=f"boundary {b}, {'AuxNet prediction' if kind == 'auxnet' else 'composed network'}")
        ax.set(xlabel="epoch", ylabel="||h_k(probe)_e - h_k(probe)_{e-1}|| / ||h_k(probe)_e||", yscale="log")
        ax.legend()
        save(fig, "snapshot_drift.png")


def analyze(path: Path, out_dir: Path | None = None) -> tuple[str, list[Path]]:
    out_dir = out_dir or Path(path).parent / "analysis"
    refuse_file_in_the_way(out_dir, "plot folder")
    view = StoreView(Path(path))
    if view.epochs == 0:
        raise UserError(f"HDF5 store {path} has no finished epoch yet: nothing to analyse")
    table = summary_table(view)
    plots = make_plots(view, out_dir)
    return table, plots
