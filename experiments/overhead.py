"""largebatch's training step against a bare PyTorch loop: same ResNet-50, batch,
threads and dtype, synthetic data, in one process, interleaved, so that a noisy
neighbour hits both alike. Reports images/s of each and their ratio.

    python experiments/overhead.py [--model resnet50] [--batch 16] [--dtype bf16] [--steps 5] [--repeats 4] [--channels-last]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from largebatch.bench import bench_config
from largebatch.train import setup, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bf16 = a.dtype == "bf16"

    # largebatch: the real step (train.train_step) on its synthetic data
    spec = {"model": a.model, "batch": a.batch, "image_size": 224, "classes": 1000, "channels": 3,
            "dtype": a.dtype, "channels_last": a.channels_last, "threads": a.threads, "warmup": 0,
            "steps": 10 ** 6, "repeats": 1}
    run = setup(bench_config(spec, 1), Path(tempfile.mkdtemp()))
    ours = lambda: train_step(run, run.batches, run.loss_fn)

    # the bare loop: torchvision's model, plain BatchNorm, SGD, a fixed batch
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
    x, y = torch.randn(a.batch, 3, 224, 224), torch.randint(1000, (a.batch,))
    if a.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def bare():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = run.loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()

    def rate(step) -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        return a.steps * a.batch / (time.perf_counter() - t0)

    for step in (bare, ours):  # warm-up
        rate(step)
    runs = {"bare": [], "largebatch": []}
    for _ in range(a.repeats):
        runs["bare"].append(rate(bare))
        runs["largebatch"].append(rate(ours))
    result = {"model": a.model, "batch": a.batch, "dtype": a.dtype, "channels_last": a.channels_last,
              "threads": a.threads, "steps": a.steps, "repeats": a.repeats, "bare_images_per_sec": statistics.fmean(runs["bare"]),
              "largebatch_images_per_sec": statistics.fmean(runs["largebatch"]), "runs": runs,
              "ratio_per_repeat": [o / b for o, b in zip(runs["largebatch"], runs["bare"])]}
    result["ratio"] = result["largebatch_images_per_sec"] / result["bare_images_per_sec"]
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
