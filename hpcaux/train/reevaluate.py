"""`hpcaux eval RUN`: accuracy of a run's network from its latest checkpoint, one process.

For a layer-parallel run the stage files are loaded into the stages of one model and
composed in sequence — the same network the pipelined evaluation ran across ranks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpcaux.config import config_from_dict
from hpcaux.data.sets import load_data
from hpcaux.errors import UserError
from hpcaux.models import build_model
from hpcaux.models.partition import make_stages
from hpcaux.store.checkpoint import latest_checkpoint, load_file
from hpcaux.train.run.evaluate import evaluate_model


def load_composed_model(folder: Path, manifest: dict, num_classes: int, boundary_norm: bool = True) -> torch.nn.Module:
    model = build_model(manifest["model"], num_classes)
    if manifest["method"] == "serial":
        model.load_state_dict(load_file(folder / "model.pt"))
        return model
    stages = make_stages(model, manifest["cuts"], boundary_norm=boundary_norm)
    for k, stage in enumerate(stages):
        stage.load_state_dict(load_file(folder / f"stage_{k}.pt")["stage"])
    return torch.nn.Sequential(*stages)


def evaluate_run(run_dir: Path, subset: int = 0, data_root: str | None = None) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    folder, manifest = latest_checkpoint(run_dir)
    if "config" not in manifest:
        raise UserError(f"checkpoint manifest {folder / 'manifest.json'} has no config")
    cfg = config_from_dict(manifest["config"])
    if data_root:
        cfg.data.root = data_root
    data = load_data(cfg.data, cfg.seed)
    model = load_composed_model(folder, manifest, data.num_classes, cfg.lp.boundary_norm)
    acc = evaluate_model(model, data, "test", cfg.train.eval_batch_size, torch.device("cpu"), subset=subset, seed=cfg.seed)
    return {"run": str(run_dir), "checkpoint": folder.name, "method": manifest["method"],
            "K": manifest["K"], "test_acc": acc}
