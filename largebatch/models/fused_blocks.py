"""torchvision's ResNet and its blocks, computing the same functions with the same
parameters (state_dict keys unchanged), but calling each batch norm that a ReLU follows,
with the residual addition between them where there is one, as one operation, which
bn_relu.py fuses into one kernel pair where it applies."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet

from .group_bn import GroupBatchNorm2d, add_relu


def bn_relu(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(x) [+ residual]); fused by a GroupBatchNorm2d (every BN of a built model)
    where it can be."""
    return bn.forward_relu(x, residual) if isinstance(bn, GroupBatchNorm2d) else add_relu(bn(x), residual)


class BasicBlock(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(bn_relu(self.bn1, self.conv1(x)))
        return bn_relu(self.bn2, out, x if self.downsample is None else self.downsample(x))


class Bottleneck(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(bn_relu(self.bn2, self.conv2(bn_relu(self.bn1, self.conv1(x)))))
        return bn_relu(self.bn3, out, x if self.downsample is None else self.downsample(x))


class ResNet(resnet.ResNet):
    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# torchvision's depths: (block, blocks per stage)
DEPTHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
          "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
          "resnet152": (Bottleneck, [3, 8, 36, 3])}


def torchvision_resnet(name: str, num_classes: int) -> ResNet:
    block, layers = DEPTHS[name]
    return ResNet(block, layers, num_classes=num_classes)
