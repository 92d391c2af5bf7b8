"""Cut a BlockSequence into K contiguous stages with balanced cost.

A stage is a view of the model's own block modules (no copies), so composing the stages
of an unnormalised partition is exactly the unsplit model. For layer-parallel training
each non-final stage ends in a BoundaryNorm (docs/design.md §1).

Balance matters: the slowest stage sets the step time. The costs here are counts (MACs,
parameters); the default, stage times measured side by side in the run, is
hpcaux/train/run/balance.py, because counts mislead (on a CPU the full-resolution blocks
of ResNet-20 cost about twice the others per MAC, docs/design.md §6).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hpcaux.errors import UserError
from hpcaux.models.blocks import BlockSequence, BoundaryNorm


class Stage(nn.Module):
    """Blocks [start, stop) of a model, optionally followed by a BoundaryNorm."""

    def __init__(self, model: BlockSequence, start: int, stop: int, normalize_output: bool):
        super().__init__()
        self.start, self.stop = start, stop
        self.blocks = nn.Sequential(*list(model.children())[start:stop])
        self.norm = BoundaryNorm() if normalize_output else nn.Identity()

    def forward(self, x):
        return self.norm(self.blocks(x))


def check_cuts(n_blocks: int, cuts: list[int]):
    if any(not 0 < c < n_blocks for c in cuts) or sorted(set(cuts)) != list(cuts):
        raise UserError(f"config key 'parallel.cuts' {cuts} must be increasing block indices in 1..{n_blocks - 1}")


def make_stages(model: BlockSequence, cuts: list[int], boundary_norm: bool = True) -> list[Stage]:
    """Stages split at `cuts` (the index of the first block of stages 2..K)."""
    n = len(model)
    check_cuts(n, cuts)
    bounds = [0, *cuts, n]
    K = len(bounds) - 1
    return [Stage(model, bounds[k], bounds[k + 1], boundary_norm and k < K - 1) for k in range(K)]


def balanced_cuts(costs: list[float], K: int) -> list[int]:
    """Contiguous split of `costs` into K parts minimising the largest part (exact DP)."""
    n = len(costs)
    if K > n:
        raise UserError(f"config key 'parallel.K' is {K}, larger than the model's {n} blocks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[k][i]: minimal max-part cost of splitting the first i blocks into k parts.
    best = [[INF] * (n + 1) for _ in range(K + 1)]
    arg = [[0] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0.0
    for k in range(1, K + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], arg[k][i] = cost, j
    cuts, i = [], n
    for k in range(K, 1, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)


def block_params(model: BlockSequence) -> list[float]:
    return [float(sum(p.numel() for p in block.parameters())) for block in model]


def block_inputs(model: BlockSequence, sample: torch.Tensor) -> list[torch.Tensor]:
    """Each block's input when `sample` runs through the model (no gradients; in training
    mode this moves BatchNorm statistics)."""
    inputs, x = [], sample
    with torch.no_grad():
        for block in model:
            inputs.append(x)
            x = block(x)
    return inputs


def count_macs(module: nn.Module, forward) -> float:
    """Multiply-accumulates of the convolutions and linear layers of `module` while
    `forward()` runs (no gradients): the cost measure of balance: flops and the cost model."""
    total = [0.0]

    def count(layer, inp, out):
        if isinstance(layer, nn.Conv2d):
            total[0] += out.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total[0] += out.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def block_flops(model: BlockSequence, sample: torch.Tensor) -> list[float]:
    """Multiply-accumulates of convolutions and linear layers, per block."""
    return [count_macs(block, lambda b=block, x=x: b(x)) for block, x in zip(model, block_inputs(model, sample))]


def boundary_shapes(stages: list[Stage], input_shape: tuple, device="cpu") -> list[tuple]:
    """Per-sample shape of each stage's output that feeds the next stage."""
    shapes, x = [], torch.zeros(2, *input_shape, device=device)
    was_training = [s.training for s in stages]
    with torch.no_grad():
        for stage in stages[:-1]:
            stage.eval()
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    for stage, mode in zip(stages, was_training):
        stage.train(mode)
    return shapes


def check_stage_count(K: int, n_blocks: int):
    """K stages need at least K blocks; checked before the world size, which follows from K."""
    if K > n_blocks:
        raise UserError(f"config key 'parallel.K' is {K}, larger than the model's {n_blocks} blocks")
