"""Checkpoints: one file per stage, a manifest, and an atomically moved `latest`.

Layout (docs/design.md §5): RUN/ckpt/<tag>/{stage_k.pt, auxnet.pt, model.pt,
manifest.json} and RUN/ckpt/latest, a symlink to the newest complete <tag>. Every rank
writes its own files, all wait, and only then does rank 0 write the manifest and swap
`latest` — so `latest` never names a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hpcaux.errors import UserError


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, tag: str, files: dict, manifest: dict, rank: int = 0, barrier=None,
                    before_commit=None):
    """Write this rank's `files` (name -> object) under RUN/ckpt/<tag>, then commit it.

    `before_commit` runs between this rank's writes and the barrier (fault-injection point).
    """
    barrier = barrier or (lambda what: None)
    folder = run_dir / "ckpt" / tag
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        _atomic_torch_save(obj, folder / name)
    if before_commit:
        before_commit()
    barrier("barrier after writing checkpoint files")
    if rank == 0:
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, folder / "manifest.json")
        link = run_dir / "ckpt" / "latest"
        tmp_link = run_dir / "ckpt" / "latest.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(tag)
        os.replace(tmp_link, link)
    barrier("barrier after committing checkpoint")
    return folder


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """(folder, manifest) of RUN/ckpt/latest, or a UserError saying what is wrong."""
    link = run_dir / "ckpt" / "latest"
    if not link.exists():
        raise UserError(f"no checkpoint in {run_dir} ({link} is missing)")
    folder = link.resolve()
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint manifest {folder / 'manifest.json'} is unreadable ({type(err).__name__})") from None
    return folder, manifest


def load_file(path: Path, device="cpu"):
    """torch.load with one clear error line for a missing, truncated or corrupt file."""
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint file {path} is corrupt or truncated ({type(err).__name__})") from None
