"""BatchNorm over groups of samples, eight ways (nine on a GPU), on the BN inputs of one ResNet-50 step:
forward + backward of all 53 BN layers, bf16 activations in channels_last, on the GPU
where there is one, each form timed alone and followed by an in-place ReLU as in the
model (which an output that is a view makes costlier). Each form is first checked
against the layer's own output and gradients; the time is the least of 3 repeats, each
the mean of `--calls` passes.

    python experiments/bn_group_forms.py --batch 256 --group 32 --out docs/bench/bn_group_forms.json

Forms:
- per group: the layer's form (the native kernels once per group);
- per group, F.batch_norm + cat: the same through the public function, which runs cuDNN's
  kernels on a GPU, and one copy to join the groups;
- gathered: the groups as k x c channels of one batch of `group` samples, one native
  call, with a transposing copy in and out (the layer's form before 2026-11-27);
- gathered in channels_last: the same, with the copies kept in channels_last, so that
  each moves whole rows of c channels (k*c channels of one batch are g samples' rows
  side by side) and the one call runs cuDNN's channels_last kernels on a GPU (the
  layer's form on GPUs for a while: faster alone, slower in a whole training step);
- gathered, one function: the same copies in one autograd function whose output is not
  a view (GatheredFn: why, there), calling aten's native kernels or F.batch_norm;
- Triton kernels (GPU only): experiments/bn_group_triton.py, sums over each group's rows
  and one pointwise pass each way, no copies (a candidate, checked here first);
- reductions: GroupBatchNorm2d._fusable run eagerly (the form torch.compile traces);
- plain BN: one native call over the whole batch (no groups: what groups cost).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from largebatch import malloc  # noqa: E402
from largebatch.autotune import synchronize  # noqa: E402
from largebatch.models.group_bn import GroupBatchNorm2d  # noqa: E402


def bn_input_shapes(batch: int, device: torch.device) -> list[tuple[int, ...]]:
    """The shape of every BN layer's input in a ResNet-50 forward pass."""
    model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(torch.randn(2, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return [(batch, *s[1:]) for s in shapes]


def gathered(layer: GroupBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    g = layer.group_size
    k = n // g
    mean, var = torch.zeros(k * c, device=x.device), torch.zeros(k * c, device=x.device)
    xg = x.reshape(k, g, *x.shape[1:]).transpose(0, 1).reshape(g, k * c, *x.shape[2:])
    yg = F.batch_norm(xg, mean, var, layer.weight.repeat(k), layer.bias.repeat(k), True, 1.0, layer.eps)
    layer._add_stats(mean.view(k, c), var.view(k, c))
    return yg.reshape(g, k, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous(memory_format=torch.channels_last)


def _gather(t: torch.Tensor, k: int) -> torch.Tensor:
    """(k*g, c, h, w) channels_last -> (g, k*c, h, w) channels_last, one copy."""
    n, c, h, w = t.shape
    g = n // k
    return t.permute(0, 2, 3, 1).reshape(k, g, h, w, c).permute(1, 2, 3, 0, 4).reshape(g, h, w, k * c).permute(0, 3, 1, 2)


def gathered_channels_last(layer: GroupBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The k groups as k*c channels of one batch of g samples, for one kernel call. A
    channels_last batch is (k, g, h, w, c) in memory and (g, h, w, k, c) is that batch,
    so one permuting copy each way, moving whole rows of c channels; autograd copies the
    gradients back the same way. The output is a permuted view of the copy back, as the
    layer had it (GatheredFn returns a tensor of its own instead)."""
    n, c, h, w = x.shape
    k = n // layer.group_size
    mean, var = torch.zeros(k * c, device=x.device), torch.zeros(k * c, device=x.device)
    yg = F.batch_norm(_gather(x, k), mean, var, layer.weight.repeat(k), layer.bias.repeat(k), True, 1.0, layer.eps)
    layer._add_stats(mean.view(k, c), var.view(k, c))
    y = yg.permute(0, 2, 3, 1).reshape(-1, h, w, k, c).permute(3, 0, 1, 2, 4).reshape(n, h, w, c)
    return y.permute(0, 3, 1, 2)


def _ungather(tg: torch.Tensor, like: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of _gather, into a new tensor laid out like `like` (not a view)."""
    out = torch.empty_like(like, memory_format=torch.channels_last)
    n, c, h, w = like.shape
    g = n // k
    tg = tg.contiguous(memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(k, g, h, w, c).copy_(tg.permute(0, 2, 3, 1).view(g, h, w, k, c).permute(3, 0, 1, 2, 4))
    return out


class GatheredFn(torch.autograd.Function):
    """The gathered form as one autograd function: its output is a tensor of its own, so
    the in-place ReLU and residual addition that follow a BN layer in the model stay
    plain in-place operations. The output of `gathered_channels_last` is a view (a
    permutation of the copy back), and an in-place operation on it makes autograd
    route the backward through as_strided and CopySlices nodes, which cost more than
    the layer. functional=False calls aten's native kernels; True, F.batch_norm (cuDNN's
    on a GPU), whose own graph is kept for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, functional):
        k = mean.shape[0]
        xg = _gather(x.contiguous(memory_format=torch.channels_last), k)
        ctx.k, ctx.functional = k, functional
        if functional:
            with torch.enable_grad():
                leaves = (xg.requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_())
                yg = F.batch_norm(xg, mean.view(-1), var.view(-1), leaves[1].repeat(k), leaves[2].repeat(k),
                                  True, 1.0, eps)
            ctx.graph = yg, leaves
            return _ungather(yg.detach(), x, k)
        wk, bk = weight.repeat(k), bias.repeat(k)
        yg, save_mean, save_invstd = torch.ops.aten.native_batch_norm(xg, wk, bk, mean.view(-1), var.view(-1),
                                                                      True, 1.0, eps)
        ctx.save_for_backward(xg, wk, save_mean, save_invstd)
        ctx.eps = eps
        return _ungather(yg, x, k)

    @staticmethod
    def backward(ctx, dy):
        k = ctx.k
        dyg = _gather(dy.contiguous(memory_format=torch.channels_last), k)
        if ctx.functional:
            yg, leaves = ctx.graph
            del ctx.graph
            dxg, dw, db = torch.autograd.grad(yg, leaves, dyg)
        else:
            xg, wk, save_mean, save_invstd = ctx.saved_tensors
            dxg, dw, db = torch.ops.aten.native_batch_norm_backward(dyg, xg, wk, None, None, save_mean, save_invstd,
                                                                    True, ctx.eps, [True, True, True])
            dw, db = dw.view(k, -1).sum(0), db.view(k, -1).sum(0)
        return _ungather(dxg, dy, k), dw, db, None, None, None, None


def gathered_function(layer: GroupBatchNorm2d, x: torch.Tensor, functional: bool = False) -> torch.Tensor:
    k, c = x.shape[0] // layer.group_size, x.shape[1]
    mean, var = torch.zeros(k, c, device=x.device), torch.zeros(k, c, device=x.device)
    y = GatheredFn.apply(x, layer.weight, layer.bias, mean, var, layer.eps, functional)
    layer._add_stats(mean, var)
    return y


def use_gathered_function_in_layer(functional: bool = False) -> None:
    """Make GroupBatchNorm2d normalise channels_last groups with GatheredFn, to time it in
    a whole training step: `gpu_check.sh` calls this from a sitecustomize.py on the
    PYTHONPATH of `largebatch bench` (whose workers are fresh processes)."""
    from largebatch.models import group_bn
    per_group = group_bn._PerGroup.apply

    def apply(x, weight, bias, mean, var, eps):
        if x.is_contiguous(memory_format=torch.channels_last):
            return GatheredFn.apply(x, weight, bias, mean, var, eps, functional)
        return per_group(x, weight, bias, mean, var, eps)
    group_bn._PerGroup.apply = apply


def per_group_functional(layer: GroupBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """F.batch_norm per group (cuDNN's kernels on a GPU, where the layer calls aten's native
    ones), joined by one copy; autograd runs each group's backward."""
    k, c = x.shape[0] // layer.group_size, x.shape[1]
    mean, var = torch.zeros(k, c, device=x.device), torch.zeros(k, c, device=x.device)
    ys = [F.batch_norm(xi, mean[i], var[i], layer.weight, layer.bias, True, 1.0, layer.eps)
          for i, xi in enumerate(x.chunk(k))]
    layer._add_stats(mean, var)
    return torch.cat(ys).contiguous(memory_format=torch.channels_last)


def triton_kernels(layer: GroupBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    from bn_group_triton import group_batch_norm
    y, mean, var = group_batch_norm(x, layer.weight, layer.bias, x.shape[0] // layer.group_size, layer.eps)
    layer._add_stats(mean, var)
    return y


FORMS = {
    "per group": lambda layer, x: layer(x),  # main() keeps the layer to this form
    "per group, F.batch_norm + cat": per_group_functional,
    "gathered": gathered,
    "gathered in channels_last": gathered_channels_last,
    "gathered, one function, native kernels": gathered_function,
    "gathered, one function, F.batch_norm": lambda layer, x: gathered_function(layer, x, functional=True),
    "Triton kernels": triton_kernels,
    "reductions": lambda layer, x: layer._fusable(x, x.shape[0] // layer.group_size, layer.group_size),
    "plain BN": lambda layer, x: F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        del FORMS["Triton kernels"]  # a GPU's; the interpreter would take hours here
    malloc.keep_freed_memory()  # as training does (train.keep_freed_memory)
    torch.manual_seed(0)
    shapes = bn_input_shapes(args.batch, device)
    layers = [GroupBatchNorm2d(s[1], group_size=args.group).to(device) for s in shapes]
    xs = [torch.randn(s, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
          .requires_grad_() for s in shapes]
    dys = [torch.randn_like(x) for x in xs]

    def step(form, relu: bool) -> None:
        outs = [FORMS[form](layer, x) for layer, x in zip(layers, xs)]
        if relu:  # in place, as the model's blocks apply it (group_bn.add_relu)
            outs = [F.relu(y, inplace=True) for y in outs]
        torch.autograd.backward(outs, dys)

    # every form computes what the layer computes (the first, largest layer checked)
    want = FORMS["per group"](layers[0], xs[0])
    want_dx, = torch.autograd.grad(want, xs[0], dys[0])
    for form in [f for f in FORMS if f not in ("per group", "plain BN")]:
        got = FORMS[form](layers[0], xs[0])
        got_dx, = torch.autograd.grad(got, xs[0], dys[0])
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_dx.float(), want_dx.float(), rtol=2e-2, atol=2e-2)

    ms: dict[str, dict[str, float]] = {"alone": {}, "with the in-place ReLU": {}}
    for form in FORMS:
        for case, relu in (("alone", False), ("with the in-place ReLU", True)):
            step(form, relu)  # warm-up
            best = float("inf")
            for _ in range(3):
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    for x in xs:
                        x.grad = None
                    step(form, relu)
                synchronize(device)
                best = min(best, (time.perf_counter() - t0) / args.calls * 1e3)
            ms[case][form] = best
        print(f"{form:40s} {ms['alone'][form]:8.2f} ms alone, {ms['with the in-place ReLU'][form]:8.2f} "
              f"followed by an in-place ReLU (53 layers, forward + backward, per step)", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "group": args.group, "layers": len(shapes),
              "ms_per_step": ms,
              "vs_per_group": {case: {f: t["per group"] / v for f, v in t.items()} for case, t in ms.items()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
