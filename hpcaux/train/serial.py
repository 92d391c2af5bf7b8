"""Serial backpropagation: the baseline every layer-parallel number is compared with."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from hpcaux.config import Config
from hpcaux.data.sets import heldout_summary, load_data
from hpcaux.errors import UserError
from hpcaux.models import build_model
from hpcaux.store.checkpoint import save_checkpoint
from hpcaux.train.loop import EpochLoop, LrSchedule, sync_interval
from hpcaux.train.run.evaluate import evaluate_model
from hpcaux.train.run.optim import make_criterion, make_optimizer
from hpcaux.train.run.precision import Precision
from hpcaux.train.run.progress import Progress
from hpcaux.train.run.rundir import MetricsLog, discard_set_aside, write_json
from hpcaux.train.run.runtime import peak_memory_mb
from hpcaux.train.run.stop_request import NonFiniteLoss, StopVote


def train_serial(cfg: Config, run_dir: Path, device: torch.device, create_run) -> dict:
    """Train one process end to end; `create_run()` writes the run directory once data
    and model are in place, so a run that cannot start leaves nothing behind."""
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg.model.arch, data.num_classes).to(device)
    precision = Precision(cfg.train, device)
    precision.prepare(model)
    steps = data.steps_per_epoch(cfg.train.batch_size)
    create_run()
    optimizer, criterion = make_optimizer(model.parameters(), cfg.optim), make_criterion(cfg.optim)
    log = MetricsLog(run_dir, fresh=True)
    progress = Progress(steps * cfg.train.epochs, enabled=cfg.train.progress)

    vote = StopVote(None, device)  # no stop signals here, but a NaN loss is read like one

    def step(x, y, _idx):
        logits = precision.forward(model, x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        vote.loss_finite = torch.isfinite(loss.detach())
        vote.cast_alone()
        return {"loss": loss.detach() * len(y), "correct": (logits.argmax(1) == y).sum(), "seen": len(y)}

    step_label = {}
    loop = EpochLoop([optimizer], LrSchedule(cfg.optim, steps * cfg.train.epochs, steps), step, progress, step_label,
                     vote=vote, sync_every=sync_interval(cfg.train, device))
    started, train_time = time.perf_counter(), 0.0
    for epoch in range(cfg.train.epochs):
        model.train()
        try:
            totals = loop.run_epoch(epoch, data.train_batches(cfg.train.batch_size, seed=cfg.seed, epoch=epoch,
                                                              augment=cfg.data.augment, device=device))
        except NonFiniteLoss as bad:
            raise UserError(bad.describe(step_label["step"], steps, lambda rank: 0)) from None
        train_time += totals.seconds
        eval_acc = evaluate_model(model, data, data.monitor_split, cfg.train.eval_batch_size, device,
                                  subset=cfg.data.eval_subset, seed=cfg.seed)
        seen = totals.sums["seen"]
        record = {"epoch": epoch + 1, "train_loss": totals.sums["loss"] / seen, "train_acc": totals.sums["correct"] / seen,
                  "eval_acc": eval_acc, "lr": totals.lr, "epoch_s": totals.seconds, "samples_per_s": seen / totals.seconds,
                  "input_ms": totals.input_ms}
        log.append(record)
        progress.note(f"epoch {epoch + 1}: loss {record['train_loss']:.3f} train acc {record['train_acc']:.3f} "
                      f"eval acc {eval_acc:.3f} ({record['samples_per_s']:.0f} samples/s)")
    progress.close()
    test_acc = evaluate_model(model, data, "test", cfg.train.eval_batch_size, device, subset=cfg.data.test_subset,
                              seed=cfg.seed)
    _save_final(run_dir, cfg, model)
    summary = {"method": "serial", "model": cfg.model.arch, "dataset": cfg.data.dataset, "K": 1, "D": 1,
               "epochs": cfg.train.epochs, "train_samples": data.n_train, **heldout_summary(data, cfg.data),
               "test_acc": test_acc, "wall_s": time.perf_counter() - started,
               "train_samples_per_s": loop.step * cfg.train.batch_size / train_time, "train_s": train_time,
               "step_ms_per_rank": [train_time / loop.step * 1e3], "peak_mem_mb_per_rank": [peak_memory_mb(device)],
               "threads": torch.get_num_threads(), **precision.summary()}
    write_json(run_dir / "summary.json", summary)
    discard_set_aside(run_dir)
    return summary


def _save_final(run_dir: Path, cfg: Config, model: torch.nn.Module):
    """The final checkpoint, which `hpcaux eval` reads (a serial run has no other)."""
    save_checkpoint(run_dir, "final", {"model.pt": model.state_dict()},
                    {"method": "serial", "model": cfg.model.arch, "K": 1, "D": 1, "cuts": [],
                     "epoch": cfg.train.epochs, "config": cfg.to_dict(), "files": ["model.pt"]})
