"""A model's convolutions alone: forward, and backward split into the input's gradient
and the weights', each the least of 3 timings of 20 calls, with each one's rate beside
the process's measured matrix-product rate. By default the Fashion-MNIST ResNet-8's
convolutions (batch 256) in both memory formats and both precisions; with --model, the
shapes of any model of the zoo, found by running it once.

    python experiments/conv_formats.py --out docs/bench/conv_formats.json
    python experiments/conv_formats.py --model resnet50 --batch 16 --size 224 --channels 3 \\
        --dtypes bf16 --formats channels_last --out docs/bench/resnet50_convs_zen5.json
"""
from __future__ import annotations

import argparse
import collections
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
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


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


def model_shapes(name: str, batch: int, size: int, channels: int) -> collections.Counter:
    """(input shape, weight shape, stride, padding) -> how many of the model's
    convolutions have it (groups and dilation of 1 only, as in the ResNets)."""
    from largebatch.config import ModelConfig
    from largebatch.models import build_model
    model, shapes = build_model(ModelConfig(name=name, bn_group_size=0), channels, 10), collections.Counter()

    def record(conv, inputs, _):
        shapes[(tuple(inputs[0].shape), tuple(conv.weight.shape), conv.stride[0], conv.padding[0])] += 1
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(batch, channels, size, size))
    return shapes


def measure(xs, ws, stride: int, pad: int, dtype: torch.dtype, fmt: torch.memory_format) -> dict:
    x = torch.randn(xs, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(ws, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(F.conv2d(x, w, stride=stride, padding=pad))

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False,
                                                           [0, 0], 1, mask)
    return {"forward_ms": ms(lambda: F.conv2d(x, w, stride=stride, padding=pad)),
            "input_grad_ms": ms(backward([True, False, False])),
            "weight_grad_ms": ms(backward([False, True, False])),
            "gflop": 2 * g.numel() * ws[1] * ws[2] * ws[3] / 1e9}  # one pass: forward, or either gradient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model of the zoo (default: the ResNet-8's shapes at batch 256)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "experiments"))
    from common import hardware
    from largebatch.bench import matmul_gflops
    from largebatch.malloc import keep_freed_memory
    keep_freed_memory()  # as training does: without it, fresh outputs page-fault
    shapes = (model_shapes(a.model, a.batch, a.size, a.channels) if a.model
              else collections.Counter({s: 1 for s in SHAPES}))
    rows, totals = [], collections.defaultdict(collections.Counter)
    for (xs, ws, stride, pad), count in shapes.items():
        for dname in a.dtypes:
            for fname in a.formats:
                r = {"input": xs, "weight": ws, "stride": stride, "count": count, "dtype": dname, "format": fname,
                     **measure(xs, ws, stride, pad, DTYPES[dname], FORMATS[fname])}
                rows.append(r)
                t = totals[(dname, fname)]
                stem = a.model and xs[1] == a.channels  # takes the images: training needs no input gradient
                for part in ("forward", "weight_grad") + (() if stem else ("input_grad",)):
                    t[part + "_ms"] += count * r[part + "_ms"]
                t["gflop"] += count * r["gflop"]
                t["input_grad_gflop"] += 0 if stem else count * r["gflop"]
                rate = lambda part: r["gflop"] / r[part + "_ms"] * 1e3  # noqa: E731
                print(f"{str(xs):18s} {str(ws):18s} s{stride} x{count:<2d} {dname} {fname:13s} forward "
                      f"{r['forward_ms']:6.2f} ms ({rate('forward'):4.0f} GFLOP/s)  input grad "
                      f"{r['input_grad_ms']:6.2f} ({rate('input_grad'):4.0f})  weight grad "
                      f"{r['weight_grad_ms']:6.2f} ({rate('weight_grad'):4.0f})", flush=True)
    matmul = {d: matmul_gflops(DTYPES[d]) for d in a.dtypes}
    summary = []
    for (dname, fname), t in totals.items():
        s = {"dtype": dname, "format": fname, **{k: round(v, 2) for k, v in t.items()},
             "matmul_gflops": round(matmul[dname], 1),
             "share_forward": t["gflop"] / t["forward_ms"] * 1e3 / matmul[dname],
             "share_input_grad": t["input_grad_gflop"] / t["input_grad_ms"] * 1e3 / matmul[dname],
             "share_weight_grad": t["gflop"] / t["weight_grad_ms"] * 1e3 / matmul[dname]}
        summary.append(s)
        print(f"all (the stem without an input gradient), {dname} {fname}: forward {t['forward_ms']:.1f} ms, input grad {t['input_grad_ms']:.1f}, "
              f"weight grad {t['weight_grad_ms']:.1f}; share of the {dname} matrix-product rate "
              f"({matmul[dname]:.0f} GFLOP/s): forward {s['share_forward']:.0%}, input grad "
              f"{s['share_input_grad']:.0%}, weight grad {s['share_weight_grad']:.0%}")
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
                                     "threads": torch.get_num_threads(), "model": a.model or "resnet8 (fixed list)",
                                     "batch": a.batch if a.model else 256, "rows": rows, "summary": summary},
                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
