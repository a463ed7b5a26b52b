"""What measuring the gradient noise scale costs per training step: the real step
(train.train_step with grad_sync measuring or not), interleaved repeats, one process;
and, since that difference drowns in the step's own spread, the measuring work timed
alone: the two squared norms over all gradients that a measured step adds.

    python experiments/noise_scale_cost.py --out docs/bench/noise_scale_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from largebatch import grad_sync
from largebatch.config import build_config
from largebatch.data import make_loader
from largebatch.train import setup, train_step

CASES = {  # name: (overrides, global batch, micro-batch)
    "resnet8-fmnist": (["model.name=resnet8", "data.name=fmnist", "model.bn_group_size=32"], 256, 128),
    "resnet50-224-bf16": (["model.name=resnet50", "data.name=synthetic", "data.synthetic_samples=256",
                           "model.bn_group_size=0", "train.bf16=true", "train.channels_last=true"], 32, 16),
}


def time_steps(run, measure: bool, steps: int) -> float:
    run.sync = grad_sync.build(run.model, run.device, run.layout.accum_steps, run.cfg.dist, measure=measure)
    batches = iter(make_loader(run.train_set, run.sampler.micro_batches(0, steps + 1), 0, run.device))
    loss_fn = torch.nn.CrossEntropyLoss()
    train_step(run, batches, loss_fn)  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, batches, loss_fn)
        norms = run.sync.take_sq_norms()
        if norms is not None:
            float(norms[1])  # what the log window does, once per line, here every step
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    from largebatch.runlog import environment
    results = {"environment": environment(), "cases": {}}
    for name, (overrides, batch, micro) in CASES.items():
        cfg = build_config({}, [*overrides, f"train.global_batch={batch}", f"train.micro_batch={micro}"])
        run = setup(cfg, Path(tempfile.mkdtemp()))
        steps = 20 if "resnet8" in name else 3
        off, on = [], []
        for _ in range(a.repeats):
            off.append(time_steps(run, False, steps))
            on.append(time_steps(run, True, steps))
        ratio = statistics.median(on) / statistics.median(off)
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        norms = []
        for _ in range(20):
            t0 = time.perf_counter()
            float(grad_sync._sq_norm(grads) + grad_sync._sq_norm(grads))
            norms.append(time.perf_counter() - t0)
        share = statistics.median(norms) / statistics.median(off)
        results["cases"][name] = {"step_seconds_off": off, "step_seconds_on": on, "median_ratio": ratio,
                                  "two_norms_seconds": norms, "two_norms_share_of_step": share}
        print(f"{name}: step {statistics.median(off):.4f} s without, {statistics.median(on):.4f} s with "
              f"measuring ({100 * (ratio - 1):+.2f} %); the two norms alone: {statistics.median(norms) * 1e3:.2f} ms "
              f"= {100 * share:.3f} % of a step", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
