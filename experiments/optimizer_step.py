"""One optimizer step over ResNet-50's parameters (channels_last, as training holds
them; random gradients), on the GPU where there is one: each implementation's time (the
least of 10 steps) and how many operations it issues per step (each at least one kernel
on a GPU, where a step of many small ones waits on the host issuing them).

    python experiments/optimizer_step.py --out docs/bench/optimizer_step.json

Implementations:
- SGD as torch runs it: its per-tensor loop, its multi-tensor (foreach) form, and its
  fused kernel (the training default);
- LARS as training runs it (largebatch.optim.LARS: about 8 operations per tensor);
- LARS, multi-tensor: the candidate below, the same update in a few operations per
  group (checked against the training LARS first), for the day a GPU measures it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.optim.sgd import sgd
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from largebatch import malloc  # noqa: E402
from largebatch.autotune import synchronize  # noqa: E402
from largebatch.config import ModelConfig, OptimConfig  # noqa: E402
from largebatch.models import build_model  # noqa: E402
from largebatch.optim import LARS, apply_schedule, param_groups  # noqa: E402
from largebatch.optim.layerwise import guarded  # noqa: E402


class MultiTensorLARS(LARS):
    """LARS's update by group: the decayed gradients and both norms of every tensor in
    a few multi-tensor operations, then torch's fused SGD on the scaled steps."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            wd, grads = group["weight_decay"], [p.grad for p in params]
            steps = torch._foreach_add(grads, params, alpha=wd)
            if group["adapt"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                ratio = guarded(group["trust"] * w_norm / (g_norm + wd * w_norm + group["eps"]), w_norm, g_norm)
                torch._foreach_mul_(steps, list(ratio.unbind()))
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd(params, steps, buffers, weight_decay=0.0, momentum=group["momentum"], lr=group["lr"],
                dampening=0.0, nesterov=group["nesterov"], maximize=False, fused=True)
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf


class CountOps(TorchDispatchMode):
    """Operations that reach a kernel (views and other metadata-only ones left out)."""
    METADATA = {"view", "unbind", "select", "detach", "lift_fresh", "empty", "alias"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] not in self.METADATA
        return func(*args, **(kwargs or {}))


def build(name: str, device: torch.device):
    torch.manual_seed(0)  # the same weights for every implementation
    model = build_model(ModelConfig(name="resnet50", bn_group_size=0), 3, 1000).to(
        device, memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device).to(memory_format=torch.channels_last) \
            if p.ndim == 4 else torch.randn(p.shape, generator=g, device=device)
    cfg = OptimConfig(momentum=0.9)
    groups = param_groups(model, cfg)
    opt = {"SGD, torch's loop": lambda: torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=False),
           "SGD, torch's foreach": lambda: torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True),
           "SGD, torch's fused (training's)": lambda: torch.optim.SGD(groups, lr=0.0, momentum=0.9, fused=True),
           "LARS (training's)": lambda: LARS(groups, lr=0.0, momentum=0.9),
           "LARS, multi-tensor": lambda: MultiTensorLARS(groups, lr=0.0, momentum=0.9)}[name]()
    apply_schedule(opt, 0.1, 5e-5)
    return model, opt


def time_step(opt, device: torch.device, steps: int = 10) -> float:
    for _ in range(3):
        opt.step()
    best = float("inf")
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def check_candidate(device: torch.device) -> float:
    """The largest difference between the two LARS after 3 steps, relative to the weights."""
    (m1, o1), (m2, o2) = build("LARS (training's)", device), build("LARS, multi-tensor", device)
    for _ in range(3):
        o1.step()
        o2.step()
    return max(((p - q).abs().max() / p.abs().max().clamp_min(1e-12)).item()
               for p, q in zip(m1.parameters(), m2.parameters()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    from common import hardware
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    malloc.keep_freed_memory()  # as training does
    diff = check_candidate(device)
    print(f"multi-tensor LARS against training's after 3 steps: largest relative difference {diff:.1e}")
    if diff > 1e-5:
        raise SystemExit("the multi-tensor LARS does not compute training's update")
    rows = []
    for name in ("SGD, torch's loop", "SGD, torch's foreach", "SGD, torch's fused (training's)",
                 "LARS (training's)", "LARS, multi-tensor"):
        _, opt = build(name, device)
        ms = time_step(opt, device)
        counter = CountOps()
        with counter:
            opt.step()
        rows.append({"optimizer": name, "ms": ms, "operations": counter.count})
        print(f"{name:32s} {ms:7.2f} ms a step, {counter.count:5d} operations", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
                                     "device": str(device), "threads": torch.get_num_threads(),
                                     "largest_relative_difference": diff, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
