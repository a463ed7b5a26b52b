"""LARS (You et al. 2017): SGD with momentum whose step per parameter tensor is scaled
by a trust ratio, trust * ||w|| / (||g|| + wd * ||w|| + eps).

Groups with `adapt=False` (BatchNorm parameters and biases) take plain SGD steps, as
in the LARS paper and timm's implementation.

Two forms of the same update, chosen by device: on a CPU one tensor at a time (about 8
operations each, which stay in cache), on a GPU a few multi-tensor operations per group,
because there each operation is a kernel launch the host must issue and the per-tensor
form's 1,348 over ResNet-50 took 6.5x as long (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import torch
from torch.optim.sgd import sgd

from .layerwise import LayerwiseOptimizer, guarded


class LARS(LayerwiseOptimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, trust: float = 0.001, eps: float = 1e-9):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        trust=trust, eps=eps, adapt=True)
        super().__init__(params, defaults)

    def update_group(self, group: dict) -> None:
        """The form by device (above): by group on a GPU, one tensor at a time elsewhere."""
        params = [p for p in group["params"] if p.grad is not None]
        if params and params[0].is_cuda:
            self.update_by_group(params, group)
        else:
            super().update_group(group)

    def update_by_group(self, params: list[torch.Tensor], group: dict) -> None:
        """update() for every tensor of `params` (those of the group with a gradient): the
        decayed gradients and both norms in multi-tensor operations, then torch's fused
        SGD on the scaled steps."""
        wd, grads = group["weight_decay"], [p.grad for p in params]
        steps = torch._foreach_add(grads, params, alpha=wd)
        if group["adapt"]:
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            ratio = guarded(group["trust"] * w_norm / (g_norm + wd * w_norm + group["eps"]), w_norm, g_norm)
            torch._foreach_mul_(steps, list(ratio.unbind()))
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(params, steps, buffers, weight_decay=0.0, momentum=group["momentum"], lr=group["lr"],
            dampening=0.0, nesterov=group["nesterov"], maximize=False, fused=True)
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers):  # sgd made the missing buffers in the list
                self.state[p]["momentum_buffer"] = buf

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
