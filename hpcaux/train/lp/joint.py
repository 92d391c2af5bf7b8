"""The joint objective L of docs/design.md §1 in one process: the serial twin of the
layer-parallel step.

Every rank of a layer-parallel run back-propagates only its own term of L and one
allreduce adds the AuxNet's partial gradients, so the gradients a run applies must equal
the gradients of L computed here on the whole network, with the same initial weights
(built from the run seed exactly as the ranks build theirs). The tests under mpirun
compare the two for both objectives, for stored auxiliary variables and for D > 1
replicas (L averaged over the replicas' batches, each with its own BatchNorm statistics,
as the replicas compute it).
"""
from __future__ import annotations

import torch

from hpcaux.config import Config
from hpcaux.models import build_model
from hpcaux.models.partition import make_stages
from hpcaux.train.lp.losses import stage_term
from hpcaux.train.lp.modules import build_auxnet, build_local_head
from hpcaux.train.run.optim import make_criterion
from hpcaux.train.run.runtime import seed_everything


class JointObjective:
    def __init__(self, cfg: Config, cuts: list[int], shapes: list[tuple], num_classes: int, image_shape: tuple):
        seed_everything(cfg.seed)
        self.stages = make_stages(build_model(cfg.model.arch, num_classes), cuts, boundary_norm=cfg.lp.boundary_norm)
        K = len(self.stages)
        self.heads = [build_local_head(cfg, shapes, k, num_classes) if cfg.lp.local_cls_weight > 0 else None
                      for k in range(K - 1)] + [None]
        self.auxnet = build_auxnet(cfg, shapes, image_shape) if cfg.lp.aux_source == "auxnet" else None
        self.local_weight = cfg.lp.local_cls_weight
        self.criterion = make_criterion(cfg.optim)

    def loss(self, x, y, rho: float, boundary_values: dict | None = None, multipliers: dict | None = None):
        """(L, residual of each non-final stage, each stage's term) for one batch.

        `boundary_values[k]` is what stage k+1 takes and stage k is pulled towards: the
        AuxNet's A_k(x) by default, or the stored z_k; `multipliers[k]` the batch's λ_k."""
        values = self.auxnet(x) if boundary_values is None else boundary_values
        multipliers = multipliers or {}
        K = len(self.stages)
        total, residuals, terms = 0.0, {}, []
        for k, stage in enumerate(self.stages):
            out = stage(x if k == 0 else values[k - 1])
            term = stage_term(out, values.get(k), y, is_last=k == K - 1, rho=rho, multiplier=multipliers.get(k),
                              local_head=self.heads[k], local_weight=self.local_weight, criterion=self.criterion)
            total = total + term.loss
            residuals[k] = term.residual
            terms.append(term.loss)
        return total, residuals, terms

    def replica_mean_loss(self, batches, rho: float, multipliers_of=None):
        """L averaged over the replicas' batches [(x, y, idx), ...]; `multipliers_of(idx)`
        gives a batch's multipliers."""
        losses = [self.loss(x, y, rho, multipliers=multipliers_of(idx) if multipliers_of else None)[0]
                  for x, y, idx in batches]
        return torch.stack(losses).mean()

    def parameters_of_stage(self, k: int) -> list[torch.nn.Parameter]:
        """Stage k's parameters and its local head's, in the order the rank's optimiser has them."""
        head = self.heads[k]
        return list(self.stages[k].parameters()) + (list(head.parameters()) if head is not None else [])
