"""Model zoo: every model is a BlockSequence that `partition` can cut into stages.

ARCHITECTURES is the one list of model names: the config's `model.arch` choices come
from it. Builders import their module on first use, so reading the names stays cheap.
"""
from __future__ import annotations

from typing import Callable

from hpcaux.errors import UserError
from hpcaux.models.blocks import BlockSequence


def _cifar_resnet(depth: int) -> Callable[[int], BlockSequence]:
    def build(num_classes: int) -> BlockSequence:
        from hpcaux.models.resnet_cifar import cifar_resnet
        return cifar_resnet(depth, num_classes)
    return build


def _wide_resnet(depth: int, width: int) -> Callable[[int], BlockSequence]:
    def build(num_classes: int) -> BlockSequence:
        from hpcaux.models.wideresnet import wide_resnet
        return wide_resnet(depth, width, num_classes)
    return build


def _imagenet_resnet(depth: int) -> Callable[[int], BlockSequence]:
    def build(num_classes: int) -> BlockSequence:
        from hpcaux.models.resnet_imagenet import imagenet_resnet
        return imagenet_resnet(depth, num_classes)
    return build


ARCHITECTURES: dict[str, Callable[[int], BlockSequence]] = {
    **{f"resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    "wrn16_4": _wide_resnet(16, 4), "wrn28_10": _wide_resnet(28, 10),
    **{f"resnet{d}": _imagenet_resnet(d) for d in (18, 34, 50)},
}
IMAGENET_ARCHITECTURES = ("resnet18", "resnet34", "resnet50")


def build_model(arch: str, num_classes: int) -> BlockSequence:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown model '{arch}'")
    return ARCHITECTURES[arch](num_classes)


def block_count(arch: str) -> int:
    """How many blocks (the units a partition cuts between) the model has; built on the
    meta device, so it costs no memory or time."""
    import torch

    with torch.device("meta"):
        return len(build_model(arch, num_classes=10))
