"""BatchNorm over fixed-size groups of samples, with running statistics updated once
per optimizer step from every group of the global batch.

Why: with plain BatchNorm the statistics depend on how the global batch is cut into
processes and micro-batches, so a 1x8 and an 8x1 layout train different models. Here
the micro-batch is cut into groups of `group_size` consecutive samples (positions in
the global batch), each normalised with its own statistics; the running averages are
updated in `commit_running_stats` with the mean of all group statistics of the step,
summed across processes. Every layout then computes the same thing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from . import bn_relu
from .sync_bn import sync_batch_norm


class GroupBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, group_size: int = 0, sync: bool = False, fuse_relu: bool = True,
                 **kwargs):
        super().__init__(num_features, **kwargs)
        self.group_size = group_size
        self.fuse_relu = fuse_relu  # forward_relu's kernels, where they apply
        # sync: statistics over the micro-batches of all processes (SyncBN); the
        # result then depends on the layout, which is what its users ask for.
        self.sync = sync
        # Sums of group statistics since the last commit; not part of the state_dict,
        # because a checkpoint is only written between optimizer steps.
        # fp64, so that the sum over groups and processes does not depend on their order.
        self.register_buffer("stat_sum", torch.zeros(2, num_features, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        n, c = x.shape[0], x.shape[1]
        if self.sync:
            y, mean, var = sync_batch_norm(x, self.weight, self.bias, self.eps)
            # Every process holds the same statistics; commit_running_stats averages
            # them over processes, which leaves them unchanged.
            self._add_stats(mean.view(1, c), var.view(1, c))
            return y
        k, g = self._groups(n)
        if torch.compiler.is_compiling():
            return self._fusable(x, k, g)
        # momentum=1 turns the "running" buffers into this batch's statistics
        # (mean, unbiased variance) computed by the native kernel.
        mean = torch.zeros(k, c, device=x.device)
        var = torch.zeros(k, c, device=x.device)
        if k == 1:
            y = F.batch_norm(x, mean[0], var[0], self.weight, self.bias, True, 1.0, self.eps)
        else:
            y = _PerGroup.apply(x, self.weight, self.bias, mean, var, self.eps)
        self._add_stats(mean, var)
        return y

    def forward_relu(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """relu(self(x) [+ residual]); in training, one kernel pair where bn_relu.py has
        one for x."""
        if not (self.training and self.fuse_relu and not self.sync
                and bn_relu.applies(x, self.num_features, residual)):
            return add_relu(self(x), residual)
        k, _ = self._groups(x.shape[0])
        y, mean, var = bn_relu.BNReLU.apply(x, self.weight, self.bias, residual, k, self.eps)
        self._add_stats(mean, var)
        return y

    def _groups(self, n: int) -> tuple[int, int]:
        """(groups, samples per group) of a micro-batch of n."""
        g = self.group_size or n
        if n % g != 0:
            raise ValueError(f"batch of {n} is not a multiple of bn_group_size {g}")
        return n // g, g

    @torch.no_grad()
    def _add_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add k groups' statistics, (k, c) each (the variance unbiased), to the step's sums."""
        self.stat_sum += torch.stack([mean, var.to(mean.dtype)]).sum(1, dtype=torch.float64)
        self.stat_count += mean.shape[0]

    def _fusable(self, x: torch.Tensor, k: int, g: int) -> torch.Tensor:
        """The same normalisation written as reductions and pointwise operations, which
        torch.compile fuses with their neighbours; the reshapes around the native kernel
        above do not fuse, and compiled they cost more than they save (docs/BENCHMARKS.md).
        Eager, the native kernel is faster, so each mode keeps its own."""
        c = x.shape[1]
        xf = x.float().reshape(k, g, c, -1)
        var, mean = torch.var_mean(xf, dim=(1, 3), keepdim=True, correction=0)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, 1, c, 1)
        y = ((xf - mean) * scale + self.bias.view(1, 1, c, 1)).to(x.dtype).reshape(x.shape)
        m = g * xf.shape[3]  # the running variance is unbiased, as the native kernel's
        self._add_stats(mean.view(k, c), var.view(k, c) * (m / (m - 1)))
        return y


def add_relu(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """relu(y [+ residual]) with torch's separate kernels, in place on y (a BN's output),
    as torchvision's blocks compute it."""
    if residual is not None:
        y += residual
    return F.relu(y, inplace=True)


class _PerGroup(torch.autograd.Function):
    """The native batch-norm kernels run once per group, each on its slice of the batch
    (a view, in either memory format) and writing into its slice of one output: no copy
    of the activations. Gathering the groups into one tensor of k*c channels for a single
    kernel call instead costs a transposing copy each way, forward and backward: about a
    tenth of a ResNet-8 step on a CPU; on a GPU it is a candidate that
    experiments/bn_group_forms.py times (docs/BENCHMARKS.md, GPU). Affine layers only, as
    every model here has."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        k = mean.shape[0]
        y = torch.empty_like(x)
        save_mean, save_invstd = torch.empty_like(mean), torch.empty_like(var)
        for i, (xi, yi) in enumerate(zip(x.chunk(k), y.chunk(k))):
            torch.ops.aten.native_batch_norm.out(xi, weight, bias, mean[i], var[i], True, 1.0, eps,
                                                 out=yi, save_mean=save_mean[i], save_invstd=save_invstd[i])
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        k = save_mean.shape[0]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)  # a gradient in the other format would be read strided
        dx = torch.empty_like(x)
        dw, db = torch.empty_like(save_mean), torch.empty_like(save_mean)  # per group, summed below
        for i, (dyi, xi, dxi) in enumerate(zip(dy.chunk(k), x.chunk(k), dx.chunk(k))):
            torch.ops.aten.native_batch_norm_backward.out(
                dyi, xi, weight, None, None, save_mean[i], save_invstd[i], True, ctx.eps,
                [True, True, True], out0=dxi, out1=dw[i], out2=db[i])
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None, None, None


def convert(module: nn.Module, group_size: int, momentum: float, sync: bool = False,
            fuse_relu: bool = True) -> nn.Module:
    """Replace every BatchNorm2d by a GroupBatchNorm2d, keeping parameters and buffers
    (the state_dict keys stay those of the original model)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GroupBatchNorm2d):
        new = GroupBatchNorm2d(module.num_features, group_size, sync, fuse_relu, eps=module.eps, momentum=momentum,
                               affine=module.affine, track_running_stats=True)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.running_mean is not None:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert(child, group_size, momentum, sync, fuse_relu))
    return module


@torch.no_grad()
def commit_running_stats(model: nn.Module) -> None:
    """Fold the step's group statistics, from all processes, into the running averages.

    All layers at once, in a fixed number of operations: written per layer, it issued
    about two dozen each, and on a GPU each is a kernel launch the host waits to issue
    (docs/BENCHMARKS.md)."""
    bns = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    if not bns:
        return
    sums = [m.stat_sum.view(-1) for m in bns]  # per layer: c means, then c variances
    counts = [m.stat_count for m in bns]
    flat = torch.cat([*sums, torch.stack(counts)])
    dist.all_reduce_sum(flat)
    layout = _flat_layout(tuple(s.numel() for s in sums), tuple(m.momentum for m in bns), flat.device)
    count = flat[layout.total:]
    # A layer that saw no group this step keeps its averages. Decided on the device:
    # `if count > 0` would wait for the GPU once per layer per step.
    seen = count > 0
    keep = torch.where(seen, 1 - layout.momentum, 1.0).float()[layout.layer]
    take = torch.where(seen, layout.momentum, 0.0).float()[layout.layer]
    stats = (flat[:layout.total] / count.clamp_min(1)[layout.layer]).float()
    running = [b for m in bns for b in (m.running_mean, m.running_var)]
    new = torch.cat(running).mul_(keep).add_(stats.mul_(take))
    torch._foreach_copy_(running, list(new.split([b.numel() for b in running])))
    torch._foreach_add_([m.num_batches_tracked for m in bns], list(seen.long().unbind()))
    torch._foreach_zero_(sums + counts)


class _FlatLayout(NamedTuple):
    total: int               # statistics in the flat buffer (all layers' means and variances)
    layer: torch.Tensor      # each statistic's layer
    momentum: torch.Tensor   # each layer's momentum


@functools.lru_cache(maxsize=8)
def _flat_layout(sizes: tuple[int, ...], momenta: tuple[float, ...], device: torch.device) -> _FlatLayout:
    """Built once per model and device, so that a step copies nothing to the device."""
    layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return _FlatLayout(sum(sizes), layer.to(device), torch.tensor(momenta, dtype=torch.float64).to(device))
