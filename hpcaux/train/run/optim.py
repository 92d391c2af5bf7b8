"""The recipe every trainer shares: the optimiser (SGD with the config's momentum,
Nesterov and weight decay), setting its learning rate from the schedule, and the
classification loss (cross-entropy with the config's label smoothing)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def make_optimizer(params, optim_cfg) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay, nesterov=optim_cfg.nesterov)


def make_criterion(optim_cfg):
    """The cross-entropy every trainer minimises, (logits, labels) -> loss."""
    return functools.partial(F.cross_entropy, label_smoothing=optim_cfg.label_smoothing)


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
