"""What every hpcaux model is: a flat sequence of blocks, plus the shared pieces.

`BlockSequence` is an nn.Sequential whose children are the units a partition may cut
between. `BoundaryNorm` is the parameter-free per-sample normalisation that ends every
stage output feeding another stage and every AuxNet head (docs/design.md §1): without
it the consistency penalty is met by shrinking activations and the composed network
collapses.
"""
import torch.nn as nn
import torch.nn.functional as F


class BlockSequence(nn.Sequential):
    """A model as an ordered list of blocks: stem, body blocks, classifier head."""


class ClassifierHead(nn.Module):
    """Global average pooling and a linear layer."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvClassifierHead(nn.Module):
    """3x3 convolutions, each with BatchNorm and ReLU, before the pooled linear layer: a
    local classifier that can use spatial structure the linear one cannot (the small
    convolutional heads of DGL and InfoPro). The first has stride 2 and twice the input's
    channels, any further one keeps both (`convs` 2: a head about as deep as DGL's). On
    ResNet-20 cut after block 4 one convolution adds about 5 % to the first stage's
    multiply-adds (counted, not timed)."""

    def __init__(self, in_channels: int, num_classes: int, convs: int = 1):
        super().__init__()
        width = 2 * in_channels
        self.conv = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.more = nn.Sequential(*(layer for _ in range(convs - 1) for layer in (
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.more(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BoundaryNorm(nn.Module):
    """Layer norm over C x H x W of each sample, without affine parameters."""

    eps = 1e-5

    def forward(self, x):
        return F.layer_norm(x, x.shape[1:], eps=self.eps)
