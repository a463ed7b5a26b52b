"""What gradient compression costs in accuracy at equal steps: the Fashion-MNIST baseline
recipe on 2 processes (gloo, one thread each), global batch 256, 4 epochs, with the plain
fp32 all-reduce, the bf16 all-reduce and PowerSGD at rank 4 (as in the shaped-link
benchmark), 2 seeds each. Runs train in runs/compression/; each finished run's small
files are copied to experiments/results/compression/ (commit them as they finish), and
a run found there is not trained again.

    python experiments/compression_accuracy.py [--out docs/bench/compression_accuracy.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import ROOT, hardware, keep_results, train

RESULTS = ROOT / "experiments/results/compression"
RUNS = ROOT / "runs/compression"
VARIANTS = {"fp32": [], "bf16": ["--set", "dist.allreduce_bf16=true"], "powersgd": ["--set", "dist.powersgd_rank=4"]}
SEEDS = (0, 1)


def args_for(variant: str, seed: int, epochs: float) -> list[str]:
    # LR 0.2: the recipe's at batch 256 at the time of the committed results
    return ["--recipe", "fmnist-baseline", "--global-batch", "256", "--epochs", f"{epochs:g}",
            "--set", "schedule.peak_lr=0.2", "--set", f"train.seed={seed}", "--set", "train.eval_every_epochs=1", "--set", "train.eval_batch=2000",
            *VARIANTS[variant]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "docs/bench/compression_accuracy.json")
    a = p.parse_args()
    table = {}
    for seed in SEEDS:  # seed-major: a stopped study has both variants of the first seeds
        for variant in VARIANTS:
            name = f"{variant}-s{seed}-e{a.epochs:g}"
            if not (RESULTS / name / "summary.json").exists():
                train(RUNS / name, args_for(variant, seed, a.epochs), threads=1, nproc=2)
                keep_results(RUNS / name, RESULTS / name)
            table.setdefault(variant, []).append(json.loads((RESULTS / name / "summary.json").read_text())["top1"])
    rows = {v: {"top1": t, "mean": statistics.fmean(t), "spread": statistics.stdev(t) if len(t) > 1 else 0.0}
            for v, t in table.items()}
    for v, r in rows.items():
        print(f"{v:9s} {100 * r['mean']:.2f} ± {100 * r['spread']:.2f} %  ({', '.join(f'{100 * x:.2f}' for x in r['top1'])})"
              f"  vs fp32 {100 * (r['mean'] - rows['fp32']['mean']):+.2f} point")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "epochs": a.epochs,
                                 "seeds": list(SEEDS), "variants": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
