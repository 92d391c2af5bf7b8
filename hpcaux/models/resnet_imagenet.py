"""ImageNet ResNet-18, -34 and -50 from torchvision, flattened into hpcaux's block sequence:
the stem, every residual block of layer1..layer4, and the pooled classifier."""
import torch.nn as nn

from hpcaux.models.blocks import BlockSequence

IMAGENET_DEPTHS = (18, 34, 50)


class FlattenLinear(nn.Module):
    def __init__(self, avgpool: nn.Module, fc: nn.Linear):
        super().__init__()
        self.avgpool, self.fc = avgpool, fc

    def forward(self, x):
        return self.fc(self.avgpool(x).flatten(1))


def imagenet_resnet(depth: int, num_classes: int = 1000) -> BlockSequence:
    from torchvision import models  # vision extra; only these models need it

    net = getattr(models, f"resnet{depth}")(num_classes=num_classes)
    blocks = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        blocks.extend(layer.children())
    blocks.append(FlattenLinear(net.avgpool, net.fc))
    return BlockSequence(*blocks)
