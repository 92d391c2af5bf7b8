"""Serial backpropagation: the baseline every layer-parallel number is compared with."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hpcaux.data.sets import load_data
from hpcaux.models import build_model
from hpcaux.store.checkpoint import save_checkpoint
from hpcaux.train.evaluate import evaluate_model
from hpcaux.train.progress import Progress
from hpcaux.train.rundir import MetricsLog, write_json
from hpcaux.train.runtime import peak_memory_mb
from hpcaux.train.schedules import learning_rate, set_lr


def make_optimizer(params, optim_cfg, lr=None):
    return torch.optim.SGD(params, lr=optim_cfg.lr if lr is None else lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay, nesterov=optim_cfg.nesterov)


def train_serial(cfg, run_dir: Path, device: torch.device, create_run) -> dict:
    """Train one process end to end; `create_run()` writes the run directory once data
    and model are in place, so a run that cannot start leaves nothing behind."""
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg.model.arch, data.num_classes).to(device)
    create_run()
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    steps = data.steps_per_epoch(cfg.train.batch_size)
    total = steps * cfg.train.epochs
    log = MetricsLog(run_dir, fresh=True)
    progress = Progress(total, enabled=cfg.train.progress)
    started, step = time.perf_counter(), 0
    train_time = 0.0
    for epoch in range(cfg.train.epochs):
        model.train()
        epoch_start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for x, y, _ in data.train_batches(cfg.train.batch_size, seed=cfg.seed, epoch=epoch,
                                          augment=cfg.data.augment, device=device):
            set_lr(optimizer, learning_rate(cfg.optim, step, total, steps))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            progress.update(f"ep {epoch + 1} loss {loss_sum / seen:.3f}")
        epoch_s = time.perf_counter() - epoch_start
        train_time += epoch_s
        eval_acc = evaluate_model(model, data, cfg.train.eval_batch_size, device, subset=cfg.data.eval_subset, seed=cfg.seed)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "eval_acc": eval_acc, "lr": optimizer.param_groups[0]["lr"], "epoch_s": epoch_s,
                  "samples_per_s": seen / epoch_s}
        log.append(record)
        progress.note(f"epoch {epoch + 1}: loss {record['train_loss']:.3f} train acc {record['train_acc']:.3f} "
                      f"eval acc {eval_acc:.3f} ({record['samples_per_s']:.0f} samples/s)")
    progress.close()
    test_acc = evaluate_model(model, data, cfg.train.eval_batch_size, device, subset=cfg.data.test_subset, seed=cfg.seed)
    save_checkpoint(run_dir, "final", {"model.pt": model.state_dict()},
                    {"method": "serial", "model": cfg.model.arch, "K": 1, "D": 1, "cuts": [],
                     "epoch": cfg.train.epochs, "config": cfg.to_dict(), "files": ["model.pt"]})
    summary = {"method": "serial", "model": cfg.model.arch, "dataset": cfg.data.dataset, "K": 1, "D": 1,
               "epochs": cfg.train.epochs, "train_samples": data.n_train, "test_samples": _test_count(data, cfg),
               "test_acc": test_acc, "wall_s": time.perf_counter() - started,
               "train_samples_per_s": step * cfg.train.batch_size / train_time, "train_s": train_time,
               "step_ms_per_rank": [train_time / step * 1e3], "peak_mem_mb_per_rank": [peak_memory_mb(device)],
               "threads": torch.get_num_threads()}
    write_json(run_dir / "summary.json", summary)
    return summary


def _test_count(data, cfg) -> int:
    n = cfg.data.test_subset
    return data.n_test if n <= 0 or n >= data.n_test else n
