"""What the input costs end to end: ResNet-50 trained by largebatch from a JPEG tree with
one loader worker, from the same tree loaded in the training process, and from synthetic
batches already in memory (no decoding at all), alternated, each step timed (data waits
included). The synthetic rate bounds what any input path could reach with the same step.

    python experiments/input_cost.py --tree /tmp/vs_timm_tree/jpeg --rounds 3 --out docs/bench/input_cost.json

The command is experiments/vs_timm.py's "largebatch same" (vs_timm.largebatch_same: batch
16, bf16, channels_last, BN over the batch, no compile), timed by its run(): the rate
counts the steps after the first `--warmup`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import hardware
from vs_timm import SYNTHETIC, largebatch_same, run


def variants(tree: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name: (where the images come from, settings beside timm's same ones)."""
    in_process = ("--set", "data.workers=0")
    return {"folder, 1 loader worker": (["--data", str(tree)], ()),
            "folder, loaded in the training process": (["--data", str(tree)], in_process),
            "synthetic, in memory": (SYNTHETIC, in_process)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, required=True, help="a JPEG tree (experiments/make_jpeg_tree.py)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each rate")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in variants(args.tree)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        for r in range(args.rounds):
            for name, (data, extra) in variants(args.tree).items():
                cmd = largebatch_same(data, work, extra, batch=args.batch, steps=args.steps)
                rates[name].append(run(name, cmd, args.batch, args.warmup, work)["images_per_sec"])
                print(f"round {r}: {name}: {rates[name][-1]:.2f} images/s", flush=True)
    ref = rates["synthetic, in memory"]
    result = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "batch": args.batch, "steps": args.steps,
              "warmup_steps": args.warmup,
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
