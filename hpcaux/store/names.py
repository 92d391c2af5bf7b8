"""The names of everything a layer-parallel run keeps in RUN/aux.h5 (docs/design.md §4):
the one source for the trainer that writes them and `hpcaux analyze` that reads them."""
from __future__ import annotations

METRICS = "metrics"
META = "meta"

# Per-epoch series under /metrics, by the width of one row.
SERIES_PER_BOUNDARY = ("rel_gap", "train_rel_gap", "multiplier_rms", "z_mean", "z_std")
SERIES_PER_RANK = ("step_ms", "aux_ms", "comm_ms")
SERIES_PER_STAGE = ("stage_loss",)
SERIES_SCALAR = ("rho", "composed_acc", "auxnet_path_acc", "epoch_s")
SERIES = SERIES_PER_BOUNDARY + SERIES_PER_RANK + SERIES_PER_STAGE + SERIES_SCALAR


def boundary_group(b: int) -> str:
    return f"boundary_{b}"


def z_name(b: int) -> str:
    """Stored auxiliary variables z_b, one row per training sample."""
    return f"{boundary_group(b)}/z"


def lambda_name(b: int) -> str:
    """AL multipliers of boundary b, one row per training sample."""
    return f"{boundary_group(b)}/lambda"


def lambda_real_name(b: int) -> str:
    """AL multipliers of stage b's real-input term (lp.loss al_real, the relayed exchange): its output
    on the relayed real input against the AuxNet's target, one row per training sample."""
    return f"{boundary_group(b)}/lambda_real"


def real_name(b: int, parity: int) -> str:
    """Stage b's real output of every training sample (lp.real_inputs: stored), written in
    the epochs of this parity (0: the 1st, 3rd, ...), read by stage b+1 in the next one."""
    return f"{boundary_group(b)}/real_{parity}"


def snapshots_group(b: int) -> str:
    return f"{boundary_group(b)}/snapshots"


def snapshot_name(b: int, epoch: int) -> str:
    """AuxNet head b on the probe images after `epoch`."""
    return f"{snapshots_group(b)}/e{epoch}"


def real_snapshots_group(b: int) -> str:
    return f"{boundary_group(b)}/real_snapshots"


def real_snapshot_name(b: int, epoch: int) -> str:
    """The composed network's activation at boundary b, F_b(...F_0(x)), on the probe
    images after `epoch`: what the AuxNet's head b predicts, as the trained stages make it."""
    return f"{real_snapshots_group(b)}/e{epoch}"


def series_name(name: str) -> str:
    return f"{METRICS}/{name}"
