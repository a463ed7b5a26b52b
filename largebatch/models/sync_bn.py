"""BatchNorm statistics over the micro-batches of all processes together (SyncBN).

torch.nn.SyncBatchNorm refuses CPU tensors, and CPU clusters are what this tool
targets, so the forward and backward are written here with two all-reduces each,
which gloo and nccl both carry. With one process it equals plain BatchNorm.
"""
from __future__ import annotations

import torch

from .. import dist


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # fp64 sums: the variance is E[x^2] - E[x]^2, which cancels badly in fp32.
        local = torch.cat([x.sum(dims, dtype=torch.float64), (x.double() ** 2).sum(dims),
                           torch.tensor([x.numel() / c], dtype=torch.float64, device=x.device)])
        total = dist.all_reduce_sum(local)
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x - mean.float().view(shape)) * invstd.float().view(shape)
        # the count stays a tensor: .item() would stall a GPU stream at every layer
        ctx.save_for_backward(xhat, weight, invstd.float(), count.float())
        ctx.dims = dims
        y = xhat * weight.view(shape) + bias.view(shape)
        unbiased = var * count / (count - 1).clamp_min(1)
        return y, mean.float(), unbiased.float()

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xhat, weight, invstd, count = ctx.saved_tensors
        c = xhat.shape[1]
        shape = [1, c] + [1] * (xhat.dim() - 2)
        # fp64 sums again, so that the split of the batch over processes changes
        # nothing but the last bits of an fp64 sum.
        local_db = gy.sum(ctx.dims, dtype=torch.float64)
        local_dw = (gy.double() * xhat).sum(ctx.dims)
        # The input gradient needs both sums over the whole synchronised batch; the
        # parameter gradients stay local, as for every other parameter (the gradient
        # all-reduce combines them).
        sums = dist.all_reduce_sum(torch.cat([local_db, local_dw]))
        db, dw = sums[:c].float().view(shape), sums[c:].float().view(shape)
        gx = (weight * invstd).view(shape) / count * (count * gy - db - xhat * dw)
        return gx, local_dw.float(), local_db.float(), None


def sync_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Normalise `x` with the statistics of all processes' batches; also returns the
    batch mean and unbiased variance for the running averages."""
    y, mean, var = SyncBatchNormFunction.apply(x.float(), weight, bias, eps)
    return y.to(x.dtype), mean.detach(), var.detach()
