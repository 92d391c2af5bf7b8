"""The optimiser every trainer uses (SGD with the config's momentum, Nesterov and weight
decay) and setting its learning rate from the schedule."""
from __future__ import annotations

import torch


def make_optimizer(params, optim_cfg, lr: float | None = None) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=optim_cfg.lr if lr is None else lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay, nesterov=optim_cfg.nesterov)


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
