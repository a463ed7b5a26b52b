"""The small-model path: a Fashion-MNIST ResNet-8 training step (forward, backward, SGD)
in a bare loop, in the variants that could make it faster: precision, BN groups (the
layout-invariant default) or plain BN, channels_last, torch.compile, flushed subnormals,
micro-batch size. Each variant runs in its own process; rounds are interleaved so that
a shared machine's drift falls on every variant alike; the median of the rounds is kept.

    python experiments/small_model.py --out docs/bench/small_model.json

Ratios are to bf16, BN groups of 32, batch 256, contiguous memory, eager: the Fashion-MNIST
recipes' setting but for the memory format, which training measures on each machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "bf16 group32"
VARIANTS = {  # name: (bf16, BN group, channels_last, compile, flush subnormals, batch)
    DEFAULT: (True, 32, False, False, False, 256),
    "fp32 group32": (False, 32, False, False, False, 256),
    "bf16 plain BN": (True, 0, False, False, False, 256),
    "bf16 group32 channels_last": (True, 32, True, False, False, 256),
    "bf16 plain BN channels_last": (True, 0, True, False, False, 256),
    "bf16 group32 flush subnormals": (True, 32, False, False, True, 256),
    "bf16 group32 batch 64": (True, 32, False, False, False, 64),
    "bf16 group32 batch 1024": (True, 32, False, False, False, 1024),
    "bf16 group32 compiled": (True, 32, False, True, False, 256),
    "bf16 plain BN compiled": (True, 0, False, True, False, 256),
    # the recipes' setting under another allocator or OpenMP wait policy (ENV below), or
    # with the C library's malloc as it comes
    "bf16 group32 jemalloc": (True, 32, False, False, False, 256),
    "bf16 group32 tcmalloc": (True, 32, False, False, False, 256),
    "bf16 group32 OpenMP active wait": (True, 32, False, False, False, 256),
    "bf16 group32 system malloc": (True, 32, False, False, False, 256),
}
LIBS = Path("/usr/lib/x86_64-linux-gnu")
ENV = {  # what a variant adds to the worker's environment
    "bf16 group32 jemalloc": {"LD_PRELOAD": str(LIBS / "libjemalloc.so.2")},
    "bf16 group32 tcmalloc": {"LD_PRELOAD": str(LIBS / "libtcmalloc_minimal.so.4")},
    "bf16 group32 OpenMP active wait": {"OMP_WAIT_POLICY": "ACTIVE"},
}
# Every variant keeps freed memory (largebatch.malloc.keep_freed_memory()), as training
# does, but those that test the C library's own malloc or another allocator.
SYSTEM_MALLOC = {"bf16 group32 system malloc", *ENV}


def measure(bf16: bool, group: int, channels_last: bool, compiled: bool, flush: bool, batch: int,
            images: int, keep_malloc: bool = False) -> dict:
    """Images/s of the bare training loop, after warm-up (and compile)."""
    import torch

    from largebatch.config import build_config
    from largebatch.malloc import keep_freed_memory
    from largebatch.models import build_model
    if keep_malloc:
        assert keep_freed_memory(), "this C library has no mallopt"
    if flush:
        torch.set_flush_denormal(True)
    cfg = build_config({"model": {"name": "resnet8", "zero_init_gamma": "none", "bn_group_size": group}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warmup = time.perf_counter() - t0
    steps = max(3, images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_sec": steps * batch / (time.perf_counter() - t0), "warmup_seconds": warmup,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=8192, help="images timed per variant and round")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (and the baseline) only")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(*VARIANTS[args.worker], args.images, args.worker not in SYSTEM_MALLOC)))
        return
    sys.path.insert(0, str(ROOT))
    from common import hardware  # noqa: E402
    names = [n for n in VARIANTS if not args.only or n in args.only or n == DEFAULT]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV.get(name, {})}
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--images", str(args.images)],
                                 capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name:32s} {runs[name][-1]['images_per_sec']:7.0f} images/s", flush=True)
    base = statistics.median(m["images_per_sec"] for m in runs[DEFAULT])
    result = {"hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "images_per_round": args.images, "baseline": DEFAULT, "variants": {}}
    for name, ms in runs.items():
        rate = statistics.median(m["images_per_sec"] for m in ms)
        result["variants"][name] = {"images_per_sec": rate, "ratio": rate / base,
                                    "runs": [m["images_per_sec"] for m in ms],
                                    "warmup_seconds": statistics.median(m["warmup_seconds"] for m in ms)}
        print(f"{name:32s} {rate:7.0f} images/s  {rate / base:5.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
