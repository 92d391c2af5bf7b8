"""Real inputs through the HDF5 store: the zero-communication variant of the real inputs
(`lp.real_inputs: stored`, docs/algorithm.md).

Stage k writes its real output of every sample it trains on to RUN/aux.h5; stage k+1
reads, for the samples of its batch, what stage k wrote for them in the previous epoch,
and trains on it beside the AuxNet's prediction (instead of it, measured no better, was
retired). No message passes between the stages during an epoch, and no gradient goes
back: the AuxNet still trains stage k. An output of last epoch's crop is still a valid
pair with the sample's label.

Two buffers per boundary, by epoch parity: in epoch e stage k writes `real_{e mod 2}` and
stage k+1 reads `real_{(e-1) mod 2}`, which nobody writes during epoch e; the collective
flush at every epoch end makes the writes visible. So reads and writes never touch the
same rows in one epoch, and a run stopped and resumed reads what an uninterrupted run
reads. A row never written (the first epoch; a sample a previous epoch dropped with its
last partial batch) holds NaN and is left out of the batch's real term. A middle stage
writes its output on its own stored input, so boundary k carries real outputs from the
(k+1)-th epoch on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcaux.store.aux_store import AuxStore
from hpcaux.store.names import real_name


@dataclass
class StoredRealInput:
    """The stored real inputs of the batch's samples that have one."""
    tensor: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor        # their sample indices
    target = None             # no AuxNet target for a stored input (exchange.RealInput has one, relayed)


class StoredRealInputs:
    """A rank's side of the store's real outputs: what it reads (stage k > 0) and what it
    writes (stage k < K-1)."""

    def __init__(self, store: AuxStore, in_boundary: int | None, out_boundary: int | None, device):
        self.store, self.in_boundary, self.out_boundary, self.device = store, in_boundary, out_boundary, device
        self.epoch = 0

    @property
    def parity(self) -> int:
        """The buffer this epoch writes; the other one is read."""
        return self.epoch % 2

    def start_epoch(self, epoch: int):
        self.epoch = epoch

    def read(self, idx: torch.Tensor, labels: torch.Tensor) -> StoredRealInput | None:
        """Stage k-1's outputs of last epoch for these samples (None: none stored yet; in
        the run's first epoch nothing is, so the rows are not read)."""
        if self.in_boundary is None or self.epoch == 0:
            return None
        rows = self.store.read_rows(real_name(self.in_boundary, 1 - self.parity), idx)
        stored = torch.isfinite(rows.flatten(1)).all(1)
        if not stored.any():
            return None
        return StoredRealInput(rows[stored].to(self.device), labels[stored.to(labels.device)], idx[stored])

    def write(self, rows: torch.Tensor, outputs: torch.Tensor):
        """This stage's real outputs of the samples `rows`, for stage k+1's next epoch."""
        if self.out_boundary is not None and len(rows):
            self.store.write_rows(real_name(self.out_boundary, self.parity), rows, outputs.detach())
