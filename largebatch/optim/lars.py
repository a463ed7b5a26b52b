"""LARS (You et al. 2017): SGD with momentum whose step per parameter tensor is scaled
by a trust ratio, trust * ||w|| / (||g|| + wd * ||w|| + eps).

Groups with `adapt=False` (BatchNorm parameters and biases) take plain SGD steps, as
in the LARS paper and timm's implementation.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, trust: float = 0.001, eps: float = 1e-9):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        trust=trust, eps=eps, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = group["trust"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    # A zero norm (fresh zero-init gamma, or no gradient) gives no
                    # information about the scale: take the plain step.
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    d.mul_(ratio)
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss
