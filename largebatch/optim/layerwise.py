"""What LARS and LAMB share: a step computed per parameter tensor, scaled by a trust
ratio on groups with `adapt=True` (conv and linear weights)."""
from __future__ import annotations

import torch


def guarded(ratio: torch.Tensor, w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """The trust ratio where both norms are positive, else 1: a zero norm (fresh
    zero-init weights, or no gradient) says nothing about the layer's scale."""
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


class LayerwiseOptimizer(torch.optim.Optimizer):
    def update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.update_group(group)
        return loss

    def update_group(self, group: dict) -> None:
        """update() for each tensor of the group that has a gradient."""
        for p in group["params"]:
            if p.grad is not None:
                self.update(p, group)
