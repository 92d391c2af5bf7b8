"""The modules a layer-parallel rank trains beside its stage, each built from the run seed
alone, so that every rank (and the one-process twin in hpcaux.train.lp.joint) builds the
same initial weights without communicating."""
from __future__ import annotations

import torch

from hpcaux.config import Config
from hpcaux.models.auxnet import AuxNet
from hpcaux.models.blocks import ClassifierHead


def build_local_head(shapes, stage: int, num_classes: int, seed: int) -> ClassifierHead:
    """Stage `stage`'s local classifier, seeded by (seed, stage)."""
    torch.manual_seed(seed + 2 + stage)
    return ClassifierHead(shapes[stage][0], num_classes)


def build_auxnet(cfg: Config, shapes, image_shape) -> AuxNet:
    """The AuxNet; every rank builds the same replica."""
    torch.manual_seed(cfg.seed + 1)
    return AuxNet(shapes, cfg.auxnet.width, cfg.auxnet.depth, image_shape[0], image_shape[-1])


def aux_buffers(auxnet: AuxNet) -> list[torch.Tensor]:
    """Floating-point BatchNorm buffers (running mean/var), averaged with the weights."""
    return [b for b in auxnet.buffers() if b.is_floating_point()]
