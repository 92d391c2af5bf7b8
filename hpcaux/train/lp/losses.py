"""Each rank's term of the joint objective of docs/design.md §1.

    L = CE(F_K(A_{K-1}(x)), y)
      + sum_{k<K} [ rho/2 * mean((F_k(A_{k-1}(x)) - A_k(x))^2)
                    + mean(lambda_k * (F_k(A_{k-1}(x)) - A_k(x)))
                    + w * CE(local_k(F_k(A_{k-1}(x))), y) ]

Norms are means over elements, so rho does not depend on the activation size; the
multiplier term is scaled alike, which makes the AL update lambda += rho * residual the
exact dual ascent step for it. `stage_term(k)` is everything that touches stage k's
parameters, so the sum of the terms over k is L and each rank's backward gives its
stage gradient completely and a partial AuxNet gradient (summed by one allreduce).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StageTerm:
    loss: torch.Tensor               # the term, differentiable
    residual: torch.Tensor | None    # F_k(input) - target, detached (None on the last stage)
    parts: dict                      # for logging, detached 0-d tensors: penalty, multiplier, local_ce, ce

    @staticmethod
    def combined(terms: list["StageTerm"], total: torch.Tensor) -> "StageTerm":
        """One step's terms (its own, its real input's) as one: `total` their summed loss,
        the first one's residual, every part."""
        if len(terms) == 1:
            return terms[0]
        return StageTerm(total, terms[0].residual if terms else None, {k: v for t in terms for k, v in t.parts.items()})


def stage_term(output, target, labels, *, is_last: bool, rho: float, multiplier=None,
               local_head=None, local_weight: float = 0.0, criterion=F.cross_entropy) -> StageTerm:
    """The term of stage k given its output F_k(input) and its target A_k(x) (or z_k): the
    consistency terms pull both sides together. Without a target (lp.aux_source: none) an
    earlier stage's own term is its local classifier alone, as on a real input."""
    if is_last:
        ce = criterion(output, labels)
        return StageTerm(ce, None, {"ce": ce.detach()})
    if target is None:
        return real_input_term(output, labels, is_last=False, local_head=local_head, local_weight=local_weight,
                               criterion=criterion)
    residual = output - target
    penalty = 0.5 * rho * residual.pow(2).mean()
    loss, parts = penalty, {"penalty": penalty.detach()}
    if multiplier is not None:
        mult = (multiplier * residual).mean()
        loss = loss + mult
        parts["multiplier"] = mult.detach()
    if local_head is not None and local_weight > 0:
        local_ce = criterion(local_head(output), labels)
        loss = loss + local_weight * local_ce
        parts["local_ce"] = local_ce.detach()
    return StageTerm(loss, residual.detach(), parts)


def real_input_term(output, labels, *, is_last: bool, local_head=None, local_weight: float = 0.0,
                    target=None, rho: float = 0.0, multiplier=None, criterion=F.cross_entropy) -> StageTerm:
    """What stage k learns from stage k-1's real output on an earlier batch (labels of
    that batch): the cross-entropy on the last stage, the local classifier's elsewhere,
    and where the AuxNet's target of that batch is at hand (the relayed exchange) the
    penalty pulling the output towards it, with that batch's multipliers under lp.loss
    al_real. The target enters detached: the AuxNet learns its side from the stage's own
    term."""
    if is_last:
        ce = criterion(output, labels)
        return StageTerm(ce, None, {"real_ce": ce.detach()})
    loss, parts, residual = output.sum() * 0.0, {}, None
    if target is not None:
        residual = output - target.detach()
        penalty = 0.5 * rho * residual.pow(2).mean()
        loss, parts["real_penalty"] = loss + penalty, penalty.detach()
        if multiplier is not None:
            mult = (multiplier * residual).mean()
            loss, parts["real_multiplier"] = loss + mult, mult.detach()
        residual = residual.detach()
    if local_head is not None and local_weight > 0:
        local_ce = criterion(local_head(output), labels)
        loss, parts["real_local_ce"] = loss + local_weight * local_ce, local_ce.detach()
    return StageTerm(loss, residual, parts)


def al_update(multiplier: torch.Tensor, residual: torch.Tensor, rho: float) -> torch.Tensor:
    """lambda <- lambda + rho * (F_k(A_{k-1}(x)) - A_k(x)), for the samples of a batch."""
    return multiplier + rho * residual


def relative_gap(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum ||F_k - A_k||^2, sum ||A_k||^2) over a batch, on the device; their ratio is the relative gap."""
    return (output - target).pow(2).sum(), target.pow(2).sum()
