"""CIFAR ResNets of He et al. (2016): 6n+2 layers, three groups of n basic blocks.

The network is built as a flat list of blocks — stem, 3n residual blocks, head — so that
`hpcaux.models.partition` can cut it between any two blocks. Shortcuts that change shape
use the paper's option A (subsample and zero-pad channels), which has no parameters.
"""
import torch.nn as nn
import torch.nn.functional as F

from hpcaux.models.blocks import BlockSequence, ClassifierHead


class ConvStem(nn.Sequential):
    def __init__(self, out_channels: int):
        super().__init__(nn.Conv2d(3, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.pad = out_channels - in_channels

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_resnet(depth: int, num_classes: int = 10) -> BlockSequence:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    blocks = [ConvStem(16)]
    in_ch = 16
    for group, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if group > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_ch, width, stride))
            in_ch = width
    blocks.append(ClassifierHead(in_ch, num_classes))
    return BlockSequence(*blocks)
