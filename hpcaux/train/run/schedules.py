"""Learning-rate and penalty (rho) schedules, as pure functions of progress."""
from __future__ import annotations

import math


def learning_rate(optim_cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """lr at `step` of `total_steps`: linear warm-up, then cosine, step or constant."""
    lr = optim_cfg.lr
    warmup = optim_cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if optim_cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    if optim_cfg.schedule == "step":
        return lr * optim_cfg.gamma ** sum(progress >= m for m in optim_cfg.milestones)
    return lr


def rho_at_epoch(lp_cfg, epoch: int) -> float:
    """Penalty continuation: rho0 * growth^epoch, capped at rho_max (a growth below 1
    decays it: the lever of docs/accuracy.md that weakens the pull towards the AuxNet late)."""
    return min(lp_cfg.rho_max, lp_cfg.rho0 * lp_cfg.rho_growth ** epoch)
