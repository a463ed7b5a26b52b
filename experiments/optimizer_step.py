"""One optimizer step over ResNet-50's parameters (channels_last, as training holds
them; random gradients), on the GPU where there is one: each implementation's time (the
least of 10 steps) and how many operations it issues per step (each at least one kernel
on a GPU, where a step of many small ones waits on the host issuing them).

    python experiments/optimizer_step.py --out docs/bench/optimizer_step.json

Implementations:
- SGD as torch runs it: its per-tensor loop, its multi-tensor (foreach) form, and its
  fused kernel (the training default);
- LARS as training runs it (largebatch.optim.LARS: about 8 operations per tensor);
- LARS, multi-tensor: the same update in a few operations per group, which training
  runs on a GPU (checked against the per-tensor form first);
- BN statistics: the other work of a step's optimizer part, folding ResNet-50's 53
  layers' batch statistics into their running averages, as training does it (a fixed
  number of operations) and as it did before 2026-11-27 (about a dozen per layer; kept
  below for the comparison, and checked to give the same averages).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from largebatch import malloc  # noqa: E402
from largebatch.autotune import synchronize  # noqa: E402
from largebatch.config import ModelConfig, OptimConfig  # noqa: E402
from largebatch.models import build_model  # noqa: E402
from largebatch.models.group_bn import GroupBatchNorm2d, commit_running_stats  # noqa: E402
from largebatch.optim import LARS, apply_schedule, param_groups  # noqa: E402
from largebatch.optim.layerwise import LayerwiseOptimizer  # noqa: E402


class PerTensorLARS(LARS):
    """LARS one tensor at a time, on any device (training's form on a CPU)."""

    def update_group(self, group):
        LayerwiseOptimizer.update_group(self, group)


class MultiTensorLARS(LARS):
    """LARS by group, on any device (training's form on a GPU)."""

    def update_group(self, group):
        self.update_by_group([p for p in group["params"] if p.grad is not None], group)


@torch.no_grad()
def commit_per_layer(model: torch.nn.Module) -> None:
    """group_bn.commit_running_stats as it was before 2026-11-27: a dozen operations per layer."""
    bns = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    flat = torch.cat([torch.cat([m.stat_sum.flatten(), m.stat_count.view(1)]) for m in bns])
    offset = 0
    for m in bns:
        c = m.num_features
        sums, count = flat[offset:offset + 2 * c].view(2, c), flat[offset + 2 * c]
        offset += 2 * c + 1
        seen = count > 0
        keep = torch.where(seen, 1 - m.momentum, 1.0).float()
        take = torch.where(seen, m.momentum, 0.0).float()
        count = count.clamp_min(1)
        m.running_mean.mul_(keep).add_((sums[0] / count).float() * take)
        m.running_var.mul_(keep).add_((sums[1] / count).float() * take)
        m.num_batches_tracked.add_(seen.long())
        m.stat_sum.zero_()
        m.stat_count.zero_()


class BNCommit:
    """A ResNet-50 whose BN layers hold a step's statistics, committed by `commit`; the
    statistics are put back before each call (one more operation), so that every call
    does the same work."""

    def __init__(self, commit, device: torch.device):
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(name="resnet50", bn_group_size=32), 3, 1000).to(device)
        self.bns = [m for m in self.model.modules() if isinstance(m, GroupBatchNorm2d)]
        for m in self.bns:
            m.stat_sum.uniform_(0, 8)
            m.stat_count.fill_(8)
        self.stats = [t for m in self.bns for t in (m.stat_sum, m.stat_count)]
        self.saved = [t.clone() for t in self.stats]
        self.commit = commit

    @torch.no_grad()
    def step(self):
        torch._foreach_copy_(self.stats, self.saved)  # one operation, counted with the commit's
        self.commit(self.model)

    def averages(self) -> torch.Tensor:
        return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in self.bns])


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
           "LARS, per tensor": lambda: PerTensorLARS(groups, lr=0.0, momentum=0.9),
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
    (m1, o1), (m2, o2) = build("LARS, per tensor", device), build("LARS, multi-tensor", device)
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
    print(f"multi-tensor LARS against per-tensor after 3 steps: largest relative difference {diff:.1e}")
    if diff > 1e-5:
        raise SystemExit("the two forms of LARS disagree")
    new, old = BNCommit(commit_running_stats, device), BNCommit(commit_per_layer, device)
    new.step()
    old.step()
    if not torch.equal(new.averages(), old.averages()):
        raise SystemExit("the two BN statistics commits disagree")
    training = "multi-tensor" if device.type == "cuda" else "per tensor"
    rows = []
    for name in ("SGD, torch's loop", "SGD, torch's foreach", "SGD, torch's fused (training's)",
                 "LARS, per tensor", "LARS, multi-tensor", "BN statistics, per layer (before)",
                 "BN statistics (training's)"):
        if name.startswith("BN"):
            opt = old if "before" in name else new
        else:
            _, opt = build(name, device)
        ms = time_step(opt, device)
        name += " (training's)" if name == f"LARS, {training}" else ""
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
