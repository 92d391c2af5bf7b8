"""The auxiliary-variable network: predicts every stage boundary's activation from x.

Its forward+backward runs on every rank every step, so its cost bounds the speedup
(docs/design.md §6). It is therefore a shallow trunk at reduced resolution with one
narrow head per boundary: a 1x1 convolution matches the channels, the resolution is
matched by pooling or bilinear upsampling, and a BoundaryNorm ends the head so that the
prediction lives on the same scale as the stage output it is compared with. Heads have
no BatchNorm: a rank computes only the heads it needs, so head statistics would diverge.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from hpcaux.models.blocks import BoundaryNorm

# The defaults of the config keys auxnet.width and auxnet.depth (depth 1 costs about 0.08
# of a ResNet-20 stage on a CPU, depth 2 0.18: docs/results.md).
DEFAULT_WIDTH, DEFAULT_DEPTH = 32, 1


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AuxHead(nn.Module):
    """One boundary's head: `layers` 3x3 convolutions with ReLU (strided while the
    features are larger than the boundary), a 1x1 convolution to its channels, pooling or
    upsampling to its size, the boundary norm. Deeper boundaries can get deeper heads
    (auxnet.head_layers): a prediction of block 7's output from one convolution of the
    image is what every stage's output is pulled towards."""

    def __init__(self, width: int, shape: tuple, layers: int = 0, in_size: int = 16):
        super().__init__()
        self.channels, self.size = shape[0], tuple(shape[1:])
        convs, size = [], in_size
        for _ in range(layers):
            stride = 2 if size >= 2 * self.size[-1] else 1
            convs += [nn.Conv2d(width, width, 3, stride, 1), nn.ReLU(inplace=True)]
            size = (size + stride - 1) // stride
        self.convs = nn.Sequential(*convs)
        self.proj = nn.Conv2d(width, self.channels, 1)
        self.norm = BoundaryNorm()

    def forward(self, features):
        features = self.convs(features)
        if features.shape[-1] > self.size[-1]:  # pool first: the 1x1 conv is cheaper after it
            features = F.adaptive_avg_pool2d(features, self.size)
        out = self.proj(features)
        if out.shape[-2:] != self.size:
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return self.norm(out)


class AuxNet(nn.Module):
    """Trunk of `depth` 3x3 conv layers (the first strided), one head per boundary, with
    `head_layers[k]` convolutions of its own (none where the list is empty)."""

    def __init__(self, boundary_shapes: list[tuple], width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH,
                 in_channels: int = 3, image_size: int = 32, head_layers: list[int] | None = None):
        super().__init__()
        layers, size, cin = [], image_size, in_channels
        # Downsample to at most 32 pixels (at least once) so ImageNet inputs stay cheap.
        while not layers or size > 32:
            layers.append(conv_bn_relu(cin, width, 2))
            size, cin = (size + 1) // 2, width
        layers += [conv_bn_relu(width, width, 1) for _ in range(depth - 1)]
        self.trunk = nn.Sequential(*layers)
        head_layers = head_layers or [0] * len(boundary_shapes)
        self.heads = nn.ModuleList(AuxHead(width, s, n, size) for s, n in zip(boundary_shapes, head_layers))

    def forward(self, x, boundaries=None):
        """Predictions A_k(x) for k in `boundaries` (0-based; default all), as a dict."""
        features = self.trunk(x)
        wanted = range(len(self.heads)) if boundaries is None else boundaries
        return {k: self.heads[k](features) for k in wanted}
