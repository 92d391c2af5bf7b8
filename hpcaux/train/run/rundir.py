"""The run directory: config, metrics.jsonl, summary.json; never silently clobbered.

Only rank 0 writes here (other ranks send it what it needs). An existing run is refused
unless the user asks to resume or to overwrite, so nothing on disk is lost by a typo.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpcaux.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "ckpt", "aux.h5")


def check_run_dir(path: Path, overwrite: bool, resume: bool = False):
    """Refuse to start where a run already lives (unless asked), or where we cannot write."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} exists and is not a directory")
    existing = [f for f in RUN_FILES if (path / f).exists()]
    if existing and not (overwrite or resume):
        raise UserError(f"run directory {path} already holds a run ({', '.join(existing)}); "
                        f"use --resume to continue it or --overwrite to replace it")
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not os.access(probe, os.W_OK):
        raise UserError(f"run directory {path} is not writable")


def clear_run(path: Path):
    """--overwrite: remove the previous run's files (only those hpcaux writes)."""
    for name in RUN_FILES:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for per_rank in path.glob("aux.rank*.h5"):
        per_rank.unlink()


def create_run(path: Path, config_yaml: str, overwrite: bool, resume: bool = False):
    """For a new run, clear the directory (--overwrite) and write config.yaml.

    Called once every start-up check (config, world size, data, checkpoint) has passed,
    so a run that cannot start leaves no trace. Checks the directory again first: time
    has passed since the early check_run_dir."""
    check_run_dir(path, overwrite, resume)
    if resume:
        return
    if overwrite:
        clear_run(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(config_yaml)


def write_json(path: Path, obj):
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """One JSON object per epoch in RUN/metrics.jsonl."""

    def __init__(self, run_dir: Path, fresh: bool):
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():
            self.path.unlink()

    def append(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
