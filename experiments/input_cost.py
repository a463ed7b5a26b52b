"""What the input costs end to end: ResNet-50 trained by largebatch from a JPEG tree with
one loader worker, from the same tree loaded in the training process, and from synthetic
batches already in memory (no decoding at all), alternated, each step timed (data waits
included). The synthetic rate bounds what any input path could reach with the same step.

    python experiments/input_cost.py --tree /tmp/vs_timm_tree/jpeg --rounds 3 --out docs/bench/input_cost.json

Settings as experiments/vs_timm.py's "largebatch same": batch 16, bf16, channels_last,
BN over the batch, no compile; the rate counts the steps after the first `--warmup`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, hardware


def variants(tree: Path) -> dict[str, list[str]]:
    return {"folder, 1 loader worker": ["--data", str(tree), "--set", "data.workers=1"],
            "folder, loaded in the training process": ["--data", str(tree), "--set", "data.workers=0"],
            "synthetic, in memory": ["--set", "data.name=synthetic", "--set", "data.synthetic_size=224",
                                     "--set", "data.synthetic_classes=10", "--set", "data.workers=0"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, required=True, help="a JPEG tree (experiments/make_jpeg_tree.py)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each rate")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    base = [sys.executable, "-m", "largebatch", "train", "--recipe", "goyal-8k", "--set", "train.log_every_steps=1",
            "--set", "schedule.warmup_epochs=0.1", "--set", "train.eval_every_epochs=0",
            "--global-batch", str(args.batch), "--micro-batch", str(args.batch), "--steps", str(args.steps),
            "--set", "train.bf16=true", "--set", "train.channels_last=true", "--set", "train.compile=false",
            "--set", "model.bn_group_size=0"]
    rates: dict[str, list[float]] = {name: [] for name in variants(args.tree)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, extra) in enumerate(variants(args.tree).items()):
                out = Path(tmp) / f"round{r}_variant{i}"
                proc = subprocess.run(base + extra + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
                metrics = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                steps = [m["step_seconds"] for m in metrics if "step_seconds" in m][args.warmup:]
                rates[name].append(args.batch * len(steps) / sum(steps))
                print(f"round {r}: {name}: {rates[name][-1]:.2f} images/s", flush=True)
    ref = rates["synthetic, in memory"]
    result = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup,
              "variants": {name: {"images_per_sec": statistics.median(v), "runs": v,
                                  "vs_synthetic_per_round": [a / b for a, b in zip(v, ref)]}
                           for name, v in rates.items()}}
    for name, v in result["variants"].items():
        print(f"{name:40s} {v['images_per_sec']:6.2f} images/s, per round "
              f"{', '.join(f'{x:.3f}' for x in v['vs_synthetic_per_round'])} of synthetic")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
