"""LARS (You et al. 2017): SGD with momentum whose step per parameter tensor is scaled
by a trust ratio, trust * ||w|| / (||g|| + wd * ||w|| + eps).

Groups with `adapt=False` (BatchNorm parameters and biases) take plain SGD steps, as
in the LARS paper and timm's implementation.
"""
from __future__ import annotations

import torch

from .layerwise import LayerwiseOptimizer, guarded


class LARS(LayerwiseOptimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, trust: float = 0.001, eps: float = 1e-9):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        trust=trust, eps=eps, adapt=True)
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        wd, mom, g = group["weight_decay"], group["momentum"], p.grad
        d = g.add(p, alpha=wd) if wd != 0 else g.clone()
        if group["adapt"]:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            d.mul_(guarded(group["trust"] * w_norm / (g_norm + wd * w_norm + group["eps"]), w_norm, g_norm))
        if mom != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone()
            else:
                buf.mul_(mom).add_(d)
            d = d.add(buf, alpha=mom) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])
