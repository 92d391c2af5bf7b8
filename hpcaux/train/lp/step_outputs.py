"""What the gradient pass of a layer-parallel step leaves for its apply pass and the logs
(step.py), one batch's or the merge of its micro-batches'."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpcaux.train.lp.losses import StageTerm


@dataclass
class StepOutputs:
    """What the gradient pass of a step leaves for the apply pass and the logs."""
    term: StageTerm
    output: torch.Tensor                 # this rank's stage output, detached
    target: torch.Tensor | None          # A_k(x) or z_k the output was pulled towards
    multiplier: torch.Tensor | None      # the batch's AL multipliers before the update
    inp: torch.Tensor | None = None      # the stage input (stored z: its gradient steps z)
    times: dict = field(default_factory=dict)
    # lp.loss al_real: the real input's batch (sample rows), its multipliers before the
    # update and the residual of its real-input term
    real_multiplier: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def merged(parts: list["StepOutputs"]) -> "StepOutputs":
        """One step's outputs from those of its micro-batches (parallel.microbatches: no
        multiplier or stored input): mean loss and parts, summed times, and the outputs
        and AuxNet targets of the whole batch where every micro-batch has them."""
        def mean(values):
            return sum(values) / len(values)

        def joined(tensors):
            return torch.cat(tensors) if all(t is not None for t in tensors) else None
        keys = {k for p in parts for k in p.term.parts}
        term = StageTerm(mean([p.term.loss for p in parts]), None,
                         {k: mean([p.term.parts[k] for p in parts if k in p.term.parts]) for k in keys})
        times = {k: sum(p.times[k] for p in parts) for k in parts[0].times}
        output, target = joined([p.output for p in parts]), joined([p.target for p in parts])
        return StepOutputs(term, output, target.detach() if output is not None and target is not None else None,
                           None, None, times)
