"""The run directory: config, metrics.jsonl, summary.json; never silently clobbered.

Only rank 0 writes here (other ranks send it what it needs). An existing run is refused
unless the user asks to resume or to overwrite, so nothing on disk is lost by a typo.
`--overwrite` moves the old run into RUN/.replaced and deletes it only once the new run
has committed its first checkpoint: a new run that dies before that leaves the old one
restorable (docs/troubleshooting.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpcaux.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "ckpt", "aux.h5")
REPLACED = ".replaced"


def check_run_dir(path: Path, overwrite: bool, resume: bool = False):
    """Refuse to start where a run already lives (unless asked), or where we cannot write."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} exists and is not a directory")
    existing = [f for f in RUN_FILES if (path / f).exists()]
    if existing and not (overwrite or resume):
        raise UserError(f"run directory {path} already holds a run ({', '.join(existing)}); "
                        f"use --resume to continue it or --overwrite to replace it")
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not probe.is_dir():
        raise UserError(f"run directory {path} is below {probe}, which is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise UserError(f"run directory {path} is not writable")


def _run_files(path: Path) -> list[Path]:
    """The files hpcaux writes in a run directory (nothing else there is touched)."""
    return [path / name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()] + \
        sorted(path.glob("aux.rank*.h5"))


def _remove(target: Path):
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def set_aside(path: Path):
    """--overwrite: move the previous run's files into RUN/.replaced.

    Where .replaced is already there, an earlier overwrite never reached its first
    checkpoint: .replaced holds the last real run and the files beside it are that
    attempt's leftovers, which go."""
    aside = path / REPLACED
    if aside.exists():
        for target in _run_files(path):
            _remove(target)
        return
    files = _run_files(path)
    if files:
        aside.mkdir()
        for target in files:
            os.replace(target, aside / target.name)


def discard_set_aside(path: Path):
    """The new run has a committed checkpoint (or is complete): the replaced run goes."""
    aside = path / REPLACED
    if aside.exists():
        shutil.rmtree(aside)


def create_run(path: Path, config_yaml: str, overwrite: bool, resume: bool = False):
    """For a new run, clear the directory (--overwrite) and write config.yaml.

    Called once every start-up check (config, world size, data, checkpoint) has passed,
    so a run that cannot start leaves no trace. Checks the directory again first: time
    has passed since the early check_run_dir."""
    check_run_dir(path, overwrite, resume)
    if resume:
        return
    if overwrite:
        set_aside(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(config_yaml)


def write_json(path: Path, obj):
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """One JSON object per epoch in RUN/metrics.jsonl."""

    def __init__(self, run_dir: Path, fresh: bool, resumed_after: int | None = None):
        """`resumed_after`: the epoch of the checkpoint a resume starts from. A row is
        written before its epoch's checkpoint is committed, so a job that died in between
        left rows the resume will write again: they are dropped."""
        self.path = run_dir / "metrics.jsonl"
        if fresh and self.path.exists():
            self.path.unlink()
        if resumed_after is not None and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["epoch"] <= resumed_after]
            if len(kept) < len(rows):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)

    def append(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
