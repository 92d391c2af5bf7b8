"""How docs/bench/norm_reestimation/results.json was measured: BatchNorm re-estimation on the
composed forward, on the validation split (all of it), for several recipes (docs/accuracy.md)."""
import sys, copy, torch
from pathlib import Path
from hpcaux.config import config_from_dict
from hpcaux.data.sets import load_data
from hpcaux.store.checkpoint import latest_checkpoint
from hpcaux.train.reevaluate import load_composed_model
from hpcaux.train.run.evaluate import averaged_norm_statistics, evaluate_model

torch.set_num_threads(2)
dev = torch.device("cpu")
for run in map(Path, sys.argv[1:]):
    folder, manifest = latest_checkpoint(run)
    cfg = config_from_dict(manifest["config"])
    data = load_data(cfg.data, cfg.seed)
    base = load_composed_model(folder, manifest, data.num_classes, cfg.lp.boundary_norm)
    row = {"run": run.name, "val": evaluate_model(base, data, "val", 500, dev, seed=cfg.seed)}
    for batches in (10, 40):
        for augment in (False, True):
            model = copy.deepcopy(base)
            model.train()
            with averaged_norm_statistics(model), torch.no_grad():
                for i, (x, y, idx) in enumerate(data.train_batches(128, seed=cfg.seed, epoch=0, augment=augment, device=dev)):
                    model(x)
                    if i == batches - 1: break
            row[f"b{batches}_{'aug' if augment else 'plain'}"] = evaluate_model(model, data, "val", 500, dev, seed=cfg.seed)
    print(row, flush=True)
