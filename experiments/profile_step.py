"""Where a training step's time goes: a bare step (forward, backward, SGD; freed memory
kept, as training does) of a model traced by torch.profiler, its operators' own time
summed by kind (convolutions forward and backward, batch norm, ReLU, additions, copies,
the optimizer, the rest).

    python experiments/profile_step.py --model resnet50 --batch 16 --channels-last
    python experiments/profile_step.py --model resnet8 --batch 256 --group 32 --channels-last
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KINDS = {  # operator name (aten::...) -> kind; what is not named here is "other"
    "mkldnn_convolution": "convolution forward", "convolution_backward": "convolution backward",
    "native_batch_norm": "batch norm", "native_batch_norm_backward": "batch norm",
    "clamp_min_": "ReLU", "threshold_backward": "ReLU", "add_": "additions", "add": "additions",
    "copy_": "copies", "_to_copy": "copies", "clone": "copies",
    "max_pool2d_with_indices": "pooling", "max_pool2d_with_indices_backward": "pooling",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--group", type=int, default=0, help="BN group size (0: plain BN)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "experiments"))
    from common import hardware

    from largebatch.config import build_config
    from largebatch.malloc import keep_freed_memory
    from largebatch.models import TORCHVISION, build_model
    keep_freed_memory()
    cfg = build_config({"model": {"name": a.model, "zero_init_gamma": "none", "bn_group_size": a.group}})
    size, channels, classes = (224, 3, 1000) if a.model in TORCHVISION else (28, 1, 10)
    torch.manual_seed(0)
    model = build_model(cfg.model, channels, classes)
    x, y = torch.randn(a.batch, channels, size, size), torch.randint(0, classes, (a.batch,))
    if a.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.fp32):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    rate = a.steps * a.batch / (time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    kinds: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages():
        name = e.key.removeprefix("aten::")
        kind = KINDS.get(name, "optimizer" if e.key.startswith("Optimizer.step") else "other")
        kinds[kind] += e.self_cpu_time_total / 1e3 / a.steps  # ms per step
    total = sum(kinds.values())
    print(f"{a.model}, batch {a.batch}, {'fp32' if a.fp32 else 'bf16'}, "
          f"{'channels_last' if a.channels_last else 'contiguous'}: {rate:.1f} images/s untraced")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:22s} {ms:8.1f} ms per step  {100 * ms / total:5.1f} %")
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
                                     "args": vars(a) | {"out": str(a.out)}, "images_per_sec": rate,
                                     "ms_per_step": dict(kinds)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
