"""The convolutions of a Fashion-MNIST ResNet-8 (batch 256, 16 to 64 channels) alone, in
both memory formats and both precisions: forward, and backward split into the input's
gradient and the weights', each the least of 3 timings of 20 calls.

    python experiments/conv_formats.py --out docs/bench/conv_formats.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# (input shape, weight shape, stride, padding): the ResNet-8's convolutions at batch 256
SHAPES = [((256, 16, 28, 28), (16, 16, 3, 3), 1, 1), ((256, 16, 28, 28), (32, 16, 3, 3), 2, 1),
          ((256, 16, 28, 28), (32, 16, 1, 1), 2, 0), ((256, 32, 14, 14), (32, 32, 3, 3), 1, 1),
          ((256, 32, 14, 14), (64, 32, 3, 3), 2, 1), ((256, 64, 7, 7), (64, 64, 3, 3), 1, 1)]


def ms(f, calls: int = 20) -> float:
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def measure(xs, ws, stride: int, pad: int, dtype: torch.dtype, fmt: torch.memory_format) -> dict:
    x = torch.randn(xs, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(ws, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(F.conv2d(x, w, stride=stride, padding=pad))

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False,
                                                           [0, 0], 1, mask)
    return {"forward_ms": ms(lambda: F.conv2d(x, w, stride=stride, padding=pad)),
            "input_grad_ms": ms(backward([True, False, False])),
            "weight_grad_ms": ms(backward([False, True, False]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "experiments"))
    from common import hardware
    rows = []
    for xs, ws, stride, pad in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                r = {"input": xs, "weight": ws, "stride": stride, "dtype": str(dtype).removeprefix("torch."),
                     "format": name, **measure(xs, ws, stride, pad, dtype, fmt)}
                rows.append(r)
                print(f"{str(xs):18s} {str(ws):15s} s{stride} {r['dtype']:8s} {name:13s} forward "
                      f"{r['forward_ms']:6.2f}  input grad {r['input_grad_ms']:6.2f}  weight grad "
                      f"{r['weight_grad_ms']:6.2f} ms", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
                                     "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
