"""BatchNorm over groups of samples as Triton kernels, for a GPU: a candidate form for
experiments/bn_group_forms.py, not used in training until a GPU has measured it.

Why: on a GPU the layer runs one native call per group (largebatch/models/group_bn.py),
and the other way, one call over the groups gathered as channels, costs a permuting copy
each way (experiments/bn_group_forms.py): launches or copies that the arithmetic does not
need. In channels_last a
batch is an (N*H*W, C) matrix whose group k is one block of consecutive rows, so four
kernels suffice: per-channel sums of x over each group's rows (forward) and of dy and
dy * (x - mean) (backward), each in parallel slices of rows, added in float64 by torch
(a fixed order, so the results do not vary from run to run); and one pointwise kernel,
y = x * scale + shift forward and dx = dy * k1 + x * k2 + k3 backward, with the
coefficients per group and channel. Each pass reads the activations once.

Check it without a GPU with Triton's interpreter (numpy, slow; fp32):

    TRITON_INTERPRET=1 python experiments/bn_group_triton.py
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 64, 64
TARGET_PROGRAMS = 1024  # enough slices of rows to fill the GPU's multiprocessors several times


@triton.jit
def _sums(a_ptr, b_ptr, center_ptr, out1_ptr, out2_ptr, rows_per_group, rows_per_split, splits, C,
          A_IS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """For group k = pid // splits, slice s = pid % splits of its rows: the per-channel
    sums of a and of a * (b - center[k]), where a is b - center[k] itself (A_IS_B) or
    another matrix."""
    pid, cb = tl.program_id(0), tl.program_id(1)
    k, s = pid // splits, pid % splits
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    center = tl.load(center_ptr + k * C + cols, mask=cmask, other=0.0)
    start = k * rows_per_group + s * rows_per_split
    end = tl.minimum(start + rows_per_split, (k + 1) * rows_per_group)
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < end)[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        b = tl.where(m, tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32) - center[None, :], 0.0)
        if A_IS_B:
            a = b
        else:
            a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc1 += tl.sum(a, axis=0)
        acc2 += tl.sum(a * b, axis=0)
    tl.store(out1_ptr + pid * C + cols, acc1, mask=cmask)
    tl.store(out2_ptr + pid * C + cols, acc2, mask=cmask)


@triton.jit
def _pointwise(p_ptr, q_ptr, a_ptr, b_ptr, c_ptr, out_ptr, rows, rows_per_group, C,
               HAS_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = p * a[k] + c[k] (+ q * b[k]), k each row's group, coefficients per channel."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (r < rows)[:, None] & (cols < C)[None, :]
    offs = r[:, None].to(tl.int64) * C + cols[None, :]
    coef = (r // rows_per_group)[:, None] * C + cols[None, :]
    y = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32) * tl.load(a_ptr + coef, mask=m, other=0.0)
    y += tl.load(c_ptr + coef, mask=m, other=0.0)
    if HAS_Q:
        y += tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32) * tl.load(b_ptr + coef, mask=m, other=0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as its (N*H*W, C) matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _group_sums(a, b, center, groups: int, a_is_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, C = b.shape
    per_group = rows // groups
    cblocks = triton.cdiv(C, BLOCK_C)
    splits = max(1, min(triton.cdiv(per_group, BLOCK_R), triton.cdiv(TARGET_PROGRAMS, groups * cblocks)))
    per_split = triton.cdiv(per_group, splits)
    out1 = torch.empty(groups * splits, C, device=b.device, dtype=torch.float32)
    out2 = torch.empty_like(out1)
    _sums[(groups * splits, cblocks)](a, b, center, out1, out2, per_group, per_split, splits, C,
                                      A_IS_B=a_is_b, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    # float64, over the slices in a fixed order
    return (out1.view(groups, splits, C).double().sum(1), out2.view(groups, splits, C).double().sum(1))


def _pointwise_call(p, q, a, b, c, groups: int) -> torch.Tensor:
    rows, C = p.shape
    out = torch.empty_like(p)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _pointwise[grid](p, q if q is not None else p, a, b if b is not None else a, c, out, rows, rows // groups, C,
                     HAS_Q=q is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return out


class GroupBatchNormTriton(torch.autograd.Function):
    """batch_norm over `groups` groups of consecutive samples of a channels_last x; returns
    y and each group's mean and unbiased variance (k, C), as GroupBatchNorm2d keeps them."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, C, h, w = x.shape
        X = _rows(x)
        per_group = X.shape[0] // groups
        center = X[::per_group].float().contiguous()  # each group's first row: sums about it lose less
        s1, s2 = _group_sums(X, X, center, groups, True)
        d = s1 / per_group
        mean = center.double() + d
        var = (s2 / per_group - d * d).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        scale = weight.double() * invstd
        shift = bias.double() - mean * scale
        Y = _pointwise_call(X, None, scale.float(), None, shift.float(), groups)
        ctx.save_for_backward(x, weight, mean.float(), invstd.float())
        ctx.groups = groups
        y = Y.view(n, h, w, C).permute(0, 3, 1, 2)
        return y, mean.float(), (var * per_group / max(per_group - 1, 1)).float()

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, invstd = ctx.saved_tensors
        groups = ctx.groups
        n, C, h, w = x.shape
        X, DY = _rows(x), _rows(dy.contiguous(memory_format=torch.channels_last))
        per_group = X.shape[0] // groups
        sum_dy, dot = _group_sums(DY, X, mean, groups, False)  # dot: the sum of dy * (x - mean)
        inv = invstd.double()
        k1 = weight.double() * inv
        k2 = -k1 * inv * inv * dot / per_group
        k3 = -k1 * sum_dy / per_group - mean.double() * k2
        DX = _pointwise_call(DY, X, k1.float(), k2.float(), k3.float(), groups)
        dw = (dot * inv).sum(0).to(weight.dtype)
        db = sum_dy.sum(0).to(weight.dtype)
        return DX.view(n, h, w, C).permute(0, 3, 1, 2), dw, db, None, None


def group_batch_norm(x, weight, bias, groups: int, eps: float):
    """(y, mean, unbiased var) of GroupBatchNormTriton."""
    return GroupBatchNormTriton.apply(x, weight, bias, groups, eps)


def _check(device: str, dtype: torch.dtype, n: int = 8, C: int = 96, hw: int = 5, groups: int = 4) -> None:
    """Against torch's batch norm per group: output, gradients, statistics."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x = (torch.randn(n, C, hw, hw, device=device) * 3 + 2).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight = torch.rand(C, device=device, requires_grad=True)
    bias = torch.rand(C, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    y, mean, var = group_batch_norm(x, weight, bias, groups, 1e-5)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), dy)
    xr = x.detach().float().requires_grad_()
    wr, br = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    means, vars_ = torch.zeros(groups, C, device=device), torch.zeros(groups, C, device=device)
    yr = torch.cat([F.batch_norm(part, means[i], vars_[i], wr, br, True, 1.0, 1e-5)
                    for i, part in enumerate(xr.chunk(groups))])
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for got, want in ((y, yr), (gx, rx), (gw, rw), (gb, rb), (mean, means), (var, vars_)):
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert y.is_contiguous(memory_format=torch.channels_last)


# (samples, channels, side, groups): rows of a group fewer than a block and straddling
# blocks, a group in many slices, channels not a multiple of the block
SHAPES = [(8, 96, 5, 4), (8, 32, 20, 2), (6, 130, 3, 3)]

if __name__ == "__main__":
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    for shape in SHAPES:
        for dt in (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,):
            _check("cuda" if on_gpu else "cpu", dt, *shape)
    print("the Triton group batch norm matches torch's per group")
