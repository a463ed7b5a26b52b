"""Optimizers, parameter groups and schedules."""
from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig
from .lamb import LAMB
from .lars import LARS


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups chosen by module type: weights of conv/linear layers, and the rest
    (BatchNorm parameters, biases). Names are never consulted: torchvision calls a
    downsample BN `downsample.1`, which a substring rule would miss."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, norm_types) or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    # A group's weight decay is wd_scale times the schedule's, written by apply_schedule.
    return [
        {"params": decay, "adapt": True, "wd_scale": 1.0},
        {"params": no_decay, "adapt": False, "wd_scale": 0.0 if cfg.exclude_bn_bias_from_wd else 1.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "lars":
        optimizer = LARS(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         trust=cfg.lars_trust, eps=cfg.lars_eps)
    elif cfg.name == "lamb":
        optimizer = LAMB(groups, lr=0.0, betas=(cfg.lamb_beta1, cfg.lamb_beta2), eps=cfg.lamb_eps)
    else:  # torch's fused kernel: weights and momentum in one pass (docs/BENCHMARKS.md, "The optimizer step")
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        optimizer = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    apply_schedule(optimizer, 0.0, cfg.weight_decay)
    return optimizer


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Write this step's LR and weight decay into every group (the schedule owns both)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group["wd_scale"]
