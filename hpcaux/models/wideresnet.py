"""Wide residual networks (Zagoruyko & Komodakis 2016), WRN-d-k for CIFAR.

Pre-activation blocks; the final BN-ReLU sits in the head so that every body block is
a self-contained unit the partition can cut after.
"""
import torch.nn as nn
import torch.nn.functional as F

from hpcaux.models.blocks import BlockSequence, ClassifierHead


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.projection is None else self.projection(pre))


class PreActHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.classifier = ClassifierHead(in_channels, num_classes)

    def forward(self, x):
        return self.classifier(F.relu(self.bn(x)))


def wide_resnet(depth: int, widen: int, num_classes: int = 10) -> BlockSequence:
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    blocks = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    in_ch = 16
    for group, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
        for i in range(n):
            blocks.append(WideBlock(in_ch, width, 2 if group > 0 and i == 0 else 1))
            in_ch = width
    blocks.append(PreActHead(in_ch, num_classes))
    return BlockSequence(*blocks)
