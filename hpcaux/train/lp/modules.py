"""The modules a layer-parallel rank trains beside its stage, each built from the run seed
alone, so that every rank (and the one-process twin in hpcaux.train.lp.joint) builds the
same initial weights without communicating."""
from __future__ import annotations

from functools import partial

import torch

from hpcaux.config import Config
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.blocks import ClassifierHead, ConvClassifierHead

LOCAL_HEADS = {"linear": ClassifierHead, "conv": ConvClassifierHead, "conv2": partial(ConvClassifierHead, convs=2)}


def build_local_head(cfg: Config, shapes, stage: int, num_classes: int) -> torch.nn.Module:
    """Stage `stage`'s local classifier (lp.local_head), seeded by (seed, stage)."""
    torch.manual_seed(cfg.seed + 2 + stage)
    return LOCAL_HEADS[cfg.lp.local_head](shapes[stage][0], num_classes)


def build_auxnet(cfg: Config, shapes, image_shape) -> AuxNet:
    """The AuxNet; every rank builds the same replica."""
    torch.manual_seed(cfg.seed + 1)
    return AuxNet(shapes, cfg.auxnet.width, cfg.auxnet.depth, image_shape[0], image_shape[-1], cfg.auxnet.head_layers)


def aux_buffers(auxnet: AuxNet) -> list[torch.Tensor]:
    """Floating-point BatchNorm buffers (running mean/var), averaged with the weights."""
    return [b for b in auxnet.buffers() if b.is_floating_point()]


