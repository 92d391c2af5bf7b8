"""What a layer-parallel run keeps in RUN/aux.h5, and who owns each piece.

z_k (stored auxiliary variables), lambda_k (AL multipliers; lambda_real_k those of the
relayed real-input term) and stage k's real outputs
(lp.real_inputs: stored) belong to boundary k, whose owner is stage k's rank in replica 0;
snapshots of AuxNet head k are written by that rank too. Metric series are written by rank 0, which holds the gathered values.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hpcaux import __version__
from hpcaux.store.aux_store import ArraySpec, AuxStore, git_sha
from hpcaux.store.names import (SERIES, SERIES_PER_BOUNDARY, SERIES_PER_RANK, SERIES_PER_STAGE, SERIES_SCALAR,
                                lambda_name, lambda_real_name, real_name, real_snapshot_name, series_name, snapshot_name, z_name)
from hpcaux.train.lp.schedule import gradient_delays_in_steps

class RunStore:
    """The trainer's view of the store: declares its datasets, records epochs."""

    def __init__(self, store: AuxStore, cfg, layout, shapes, n_train: int):
        self.store, self.cfg, self.layout, self.shapes = store, cfg, layout, shapes
        K, dtype = layout.K, "f2" if cfg.store.float16 else "f4"
        for b in range(K - 1):
            owner = layout.rank_of(b, 0)
            chunk = (1, *shapes[b])  # chunked by sample: a batch touches only its rows
            if cfg.lp.aux_source == "stored":
                store.declare(ArraySpec(z_name(b), (n_train, *shapes[b]), dtype, owner,
                                        holders=(owner, layout.rank_of(b + 1, 0)), writers=(owner,), chunks=chunk))
            if cfg.lp.real_inputs == "stored":
                replicas = tuple(layout.stage_ranks(b))
                readers = tuple(layout.stage_ranks(b + 1))
                for parity in (0, 1):
                    store.declare(ArraySpec(real_name(b, parity), (n_train, *shapes[b]), dtype, owner,
                                            holders=replicas + readers, writers=replicas, chunks=chunk, fill=np.nan))
            if cfg.lp.loss == "al" or (cfg.lp.loss == "al_real" and b > 0):  # al_real: a middle stage's
                replicas = tuple(layout.stage_ranks(b))
                name = lambda_name(b) if cfg.lp.loss == "al" else lambda_real_name(b)
                store.declare(ArraySpec(name, (n_train, *shapes[b]), dtype, owner,
                                        holders=replicas, writers=replicas, chunks=chunk))
        widths = {**{n: (K - 1,) for n in SERIES_PER_BOUNDARY}, **{n: (layout.K * layout.D,) for n in SERIES_PER_RANK},
                  **{n: (K,) for n in SERIES_PER_STAGE}, **{n: () for n in SERIES_SCALAR}}
        for name, width in widths.items():
            store.declare_series(name, width, wide=name in SERIES_PER_RANK)
        store.write_meta({"config": cfg.to_yaml(), "version": __version__, "K": K, "D": layout.D,
                          "dataset": cfg.data.dataset, "model": cfg.model.arch, "git_sha": git_sha(),
                          "mode": store.mode, "boundary_shapes": np.array([list(s) for s in shapes]),
                          "gradient_delay_steps": np.array(gradient_delays_in_steps(cfg, K))})

    def record_epoch(self, epoch_index: int, record: dict):
        """One row of every series (a collective write on every rank)."""
        for name in SERIES:
            value = record.get(name)
            if value is None:
                value = np.full(self.store.specs[series_name(name)].shape[1:] or (), np.nan)
            self.store.write_collective(series_name(name), value, row=epoch_index)

    def record_snapshots(self, epoch: int, outputs: dict):
        """The probe set's boundary variables (HeldOutMetrics.probe_outputs): every
        boundary's real activation and, with an AuxNet, its prediction, each from the rank
        of replica 0 whose stage ends there, written collectively (every rank calls)."""
        probe = self.cfg.store.probe_size
        kinds = [("real", real_snapshot_name)] + ([("auxnet", snapshot_name)] if self.cfg.lp.aux_source == "auxnet" else [])
        for kind, name_of in kinds:
            for b in range(self.layout.K - 1):
                name, owner = name_of(b, epoch), self.layout.rank_of(b, 0)
                self.store.declare(ArraySpec(name, (probe, *self.shapes[b]), "f2" if self.cfg.store.float16 else "f4",
                                             owner, holders=(owner,)))
                self.store.write_collective(name, outputs.get(kind, {}).get(b))


class SampleStats:
    """Running sum and sum of squares of the per-sample values a rank writes in an epoch."""

    def __init__(self):
        self.total = self.squares = self.count = 0.0

    def add(self, values: torch.Tensor):
        self.total += values.sum().item()
        self.squares += values.pow(2).sum().item()
        self.count += values.numel()

    def rms(self) -> float:
        return math.sqrt(self.squares / self.count) if self.count else float("nan")

    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def std(self) -> float:
        if not self.count:
            return float("nan")
        return math.sqrt(max(self.squares / self.count - self.mean() ** 2, 0.0))
