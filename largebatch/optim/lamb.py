"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes"): Adam's update per parameter tensor, plus decoupled weight decay, scaled by
the trust ratio ||w|| / ||update||, so every layer moves by the same fraction of its
weights (the LR) whatever the scale of its gradients.

Groups with `adapt=False` (BatchNorm parameters and biases) take the plain Adam step, as
LARS leaves them to plain SGD.
"""
from __future__ import annotations

import torch

from .layerwise import LayerwiseOptimizer, guarded


class LAMB(LayerwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True))

    def update(self, p: torch.Tensor, group: dict) -> None:
        (b1, b2), wd = group["betas"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
        if wd != 0:
            update.add_(p, alpha=wd)
        if group["adapt"]:
            w_norm = torch.linalg.vector_norm(p)
            u_norm = torch.linalg.vector_norm(update)
            update.mul_(guarded(w_norm / u_norm, w_norm, u_norm))
        p.add_(update, alpha=-group["lr"])
