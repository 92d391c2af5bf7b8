"""ImageNet ResNet-50 from torchvision, flattened into hpcaux's block sequence."""
import torch.nn as nn

from hpcaux.models.blocks import BlockSequence


class FlattenLinear(nn.Module):
    def __init__(self, avgpool: nn.Module, fc: nn.Linear):
        super().__init__()
        self.avgpool, self.fc = avgpool, fc

    def forward(self, x):
        return self.fc(self.avgpool(x).flatten(1))


def imagenet_resnet50(num_classes: int = 1000) -> BlockSequence:
    from torchvision.models import resnet50  # vision extra; only this model needs it

    net = resnet50(num_classes=num_classes)
    blocks = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        blocks.extend(layer.children())
    blocks.append(FlattenLinear(net.avgpool, net.fc))
    return BlockSequence(*blocks)
