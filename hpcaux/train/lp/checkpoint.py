"""Saving and restoring a layer-parallel run (docs/design.md §5); a rank's files are its
StageParts' (parts.py) and, at a stop inside an epoch, its exchange's.

RUN/ckpt/<tag>/stage_k.pt holds stage k's weights, its local classifier and optimiser
state (written by stage k of replica 0: the replicas are identical); auxnet.pt holds the
AuxNet and its optimiser (rank 0). z and lambda live in aux.h5, flushed before the save.
A stop inside an epoch with the neighbour exchange adds exchange_k_r.pt per rank (stage k,
replica r: the replicas train on different batches): what was in flight (exchange.py).
A resume needs the same K (the cut points are taken from the manifest); a different D
is fine, since every replica of a stage loads the same file.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from hpcaux.errors import UserError
from hpcaux.store.checkpoint import latest_checkpoint, load_file, save_checkpoint
from hpcaux.train.lp.parts import StageParts
from hpcaux.train.run.layout import Layout

# Fault injection for the tests: HPCAUX_FAULT_KILL_IN_SAVE=RANK:TAG makes that rank die
# (SIGKILL) after writing its files of checkpoint TAG, before the checkpoint is committed.
KILL_IN_SAVE = "HPCAUX_FAULT_KILL_IN_SAVE"


MANIFEST_KEYS = ("method", "K", "cuts", "epoch", "step_in_epoch", "phase", "config", "files")


def read_resume_manifest(run_dir: Path, K: int) -> tuple[Path, dict]:
    folder, manifest = latest_checkpoint(run_dir)
    link = run_dir / "ckpt" / "latest"
    if not link.is_symlink():  # e.g. a run copied with `cp -rL`: the next commit could not swap it
        raise UserError(f"{link} is a copy, not a link to a checkpoint (was the run copied following links?); "
                        f"make it a link again before resuming: ln -sfn <newest epoch_N> {link}")
    if manifest.get("method") != "layer_parallel":
        raise UserError(f"checkpoint {folder} is not from a layer-parallel run")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise UserError(f"checkpoint manifest {folder / 'manifest.json'} lacks {', '.join(missing)}")
    if manifest["phase"] == "done":
        raise UserError(f"run {run_dir} is finished ({folder.name} is its final checkpoint): nothing to resume; "
                        f"train a new run, or evaluate this one with hpcaux eval {run_dir}")
    if manifest["K"] != K:
        raise UserError(f"checkpoint {folder} was written with parallel.K={manifest['K']}; this run has "
                        f"parallel.K={K} (a resume needs the same K; D may change)")
    return folder, manifest


def exchange_file(stage: int, replica: int) -> str:
    return f"exchange_{stage}_{replica}.pt"


def save_run(run_dir: Path, comm, cfg, parts: StageParts, tag: str, epoch: int, phase: str, step_in_epoch: int = 0,
             exchange: dict | None = None):
    """Checkpoint after `epoch` whole epochs and `step_in_epoch` steps of the next one;
    `exchange`: the neighbour exchange's state, settled at a stop inside the epoch."""
    lay, files = parts.layout, parts.state()
    if exchange is not None:
        files[exchange_file(lay.stage, lay.replica)] = exchange
    manifest = {"method": "layer_parallel", "model": cfg.model.arch, "dataset": cfg.data.dataset,
                "K": lay.K, "D": lay.D, "cuts": parts.cuts, "boundary_shapes": [list(s) for s in parts.shapes],
                "epoch": epoch, "step_in_epoch": step_in_epoch, "phase": phase, "config": cfg.to_dict(),
                "files": [f"stage_{k}.pt" for k in range(lay.K)] + (["auxnet.pt"] if parts.auxnet else []) +
                         ([exchange_file(k, r) for k in range(lay.K) for r in range(lay.D)] if exchange else [])}

    def before_commit():
        if os.environ.get(KILL_IN_SAVE) == f"{comm.rank}:{tag}":
            os.kill(os.getpid(), signal.SIGKILL)

    save_checkpoint(run_dir, tag, files, manifest, comm.rank, comm.barrier, before_commit)


def restore_exchange(layout: Layout, folder: Path, manifest: dict, device) -> dict | None:
    """This rank's neighbour-exchange state from a stop inside an epoch; None where there is
    none, or where D changed (the resumed epoch's batches are split differently, so the
    exchange starts afresh there)."""
    name = exchange_file(layout.stage, layout.replica)
    if name not in manifest["files"] or manifest.get("D") != layout.D:
        return None
    return load_file(folder / name, device)
