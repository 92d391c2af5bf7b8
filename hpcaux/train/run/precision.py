"""How a rank's training forward passes run: bf16 autocast (train.precision) and the
channels_last memory format (train.channels_last).

On a GPU both speed up convolutions (tensor cores; cuDNN's NHWC kernels); on a CPU with
bf16 instructions (AVX-512 BF16, AMX) they do too: 1.8x for ResNet-20 on the project's
machine (docs/benchmarks.md); on a CPU without them they may well be slower (not
measured). Only the training forward passes change: weights, gradients, optimiser
state, the boundary activations sent between stages and stored in aux.h5, and every
evaluation stay float32, so a checkpoint means the same whatever trained it.
"""
from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, train_cfg, device):
        self.device_type = torch.device(device).type
        self.bf16 = train_cfg.precision == "bf16"
        self.channels_last = train_cfg.channels_last

    def summary(self) -> dict:
        """What summary.json records of it."""
        return {"precision": "bf16" if self.bf16 else "fp32", "channels_last": self.channels_last}

    @contextlib.contextmanager
    def float32(self):
        """Forward passes in float32 within this block (a training rank's held-out metrics)."""
        bf16, self.bf16 = self.bf16, False
        try:
            yield
        finally:
            self.bf16 = bf16

    def autocast(self):
        """The context the forward passes run in (a no-op for float32)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def prepare(self, *modules):
        """Put the modules' 4-D weights in the memory format (None entries are skipped)."""
        for module in modules:
            if module is not None and self.channels_last:
                module.to(memory_format=torch.channels_last)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """An image-shaped input in the memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` under autocast, its output back in float32 and the usual layout, as
        the rest of the step (losses, the neighbour exchange, the store) expects it."""
        with self.autocast():
            out = module(self.input(x))
        return out.float().contiguous() if self.bf16 or self.channels_last else out
