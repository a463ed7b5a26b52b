"""Model zoo: torchvision's ResNets (its code, with each batch norm that a ReLU follows
called as one operation: fused_blocks.py) and CIFAR-style ResNets."""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..config import ConfigError, ModelConfig
from . import group_bn
from .cifar_resnet import CifarResNet
from .fused_blocks import torchvision_resnet

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
         "resnet56": 56, "resnet110": 110}
MODEL_NAMES = TORCHVISION + tuple(CIFAR)


def model_channels(cfg: ModelConfig, data_channels: int) -> int:
    """The input channels the model will take; errors name the key to change."""
    if cfg.name not in MODEL_NAMES:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (models: {', '.join(MODEL_NAMES)})")
    want = cfg.in_channels if cfg.in_channels is not None else data_channels
    if cfg.name in TORCHVISION and want != 3:
        raise ConfigError(f"model.name: {cfg.name} is torchvision's unmodified network and takes 3 input "
                          f"channels, but the data has {data_channels}; use a CIFAR-style model "
                          f"({', '.join(CIFAR)}) for this data")
    if want != data_channels:
        raise ConfigError(f"model.in_channels: the model takes {want} channels but the data has "
                          f"{data_channels}")
    return want


def _last_bns(model: nn.Module, which: str) -> list[nn.BatchNorm2d]:
    stages = [m for m in model.modules() if isinstance(m, nn.Sequential)
              and any(isinstance(b, (BasicBlock, Bottleneck)) for b in m)]
    bns = []
    for stage in stages:
        blocks = [b for b in stage if isinstance(b, (BasicBlock, Bottleneck))]
        if which == "last_per_stage":
            blocks = blocks[-1:]
        bns += [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks]
    return bns


def build_model(cfg: ModelConfig, data_channels: int, data_classes: int) -> nn.Module:
    in_channels = model_channels(cfg, data_channels)
    num_classes = cfg.num_classes or data_classes
    if cfg.name in TORCHVISION:
        model = torchvision_resnet(cfg.name, num_classes)
    else:
        model = CifarResNet(CIFAR[cfg.name], num_classes=num_classes, in_channels=in_channels)
    if cfg.zero_init_gamma != "none":
        for bn in _last_bns(model, cfg.zero_init_gamma):
            nn.init.zeros_(bn.weight)
    return group_bn.convert(model, cfg.bn_group_size, cfg.bn_momentum, cfg.sync_bn, cfg.fuse_bn_relu)
