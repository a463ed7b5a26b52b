"""The critical-batch study on Fashion-MNIST, after Shallue et al. (2019): for each global
batch, the LR is tuned on a small grid; every run trains a fixed epoch budget and is
evaluated every quarter or half epoch, so one run gives both the accuracy at the budget and the
first step at which test top-1 reaches a target (steps to target).

Runs go through the public CLI (one process, 2 threads) into runs/critical_batch/NAME.
A finished run's summary.json and metrics.jsonl are copied to
experiments/results/critical_batch/NAME/, which is committed: a run whose results are
there is never trained again, so the study continues across machines and sessions.

    python experiments/critical_batch.py               # train what is missing, in priority order
    python experiments/critical_batch.py --list        # the plan, with what is done
    python experiments/critical_batch.py --report      # only regenerate the report from results
    python experiments/critical_batch.py --max-runs 1  # train at most one missing run

Recipe (fixed for every batch, so only LR and warmup vary): fmnist-baseline (ResNet-8,
bf16, no augmentation, wd 5e-4 off BN and biases, BN over groups of 32 samples) with
zero-gamma off, SGD momentum 0.9, cosine decay to zero over the budget, linear warmup
from LR 0 that grows with the batch. The LR grid spans the square-root rule to the
linear rule from the batch-128 baseline LR 0.1: lr(B) = 0.1 * (B / 128) ** p, p in
{0.5, 0.75, 1}; at batch 128 the grid is {0.05, 0.1, 0.2}.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, train

RESULTS = ROOT / "experiments/results/critical_batch"
RUNS = ROOT / "runs/critical_batch"
EPOCHS = 12
SMALL, SMALL_LR = 128, 0.1


def eval_every(batch: int) -> float:
    """In epochs: every half epoch (234 steps) at the small batches, every quarter from
    1,024 up, where an epoch is a few dozen steps and steps to target needs the resolution."""
    return 0.5 if batch < 1024 else 0.25


def warmup_epochs(batch: int) -> float:
    """Grows with log2(batch / 128): none at 128, 2.4 epochs (a fifth of the budget) at 16,384."""
    return round(EPOCHS * min(0.2, 0.03 * math.log2(batch / SMALL)), 3) if batch > SMALL else 0.0


@dataclass(frozen=True)
class Run:
    batch: int
    lr: float
    seed: int = 0
    variant: str = ""            # "" = the study recipe; else a named change below
    epochs: float = EPOCHS

    @property
    def name(self) -> str:
        tag = f"-{self.variant}" if self.variant else ""
        return f"b{self.batch}-lr{self.lr:.4g}{tag}-e{self.epochs:g}-s{self.seed}"

    def cli(self) -> list[str]:
        # bounded memory: the largest multiple of 32 up to 1,024 that divides the batch
        # (BN groups of 32 samples keep the result the same for any micro-batch)
        micro = max(m for m in range(32, min(self.batch, 1024) + 1, 32) if self.batch % m == 0)
        args = ["--recipe", "fmnist-baseline", "--global-batch", str(self.batch), "--micro-batch", str(micro),
                "--epochs", f"{self.epochs:g}",
                "--set", f"schedule.peak_lr={self.lr:.6g}",
                "--set", f"schedule.warmup_epochs={warmup_epochs(self.batch):g}",
                "--set", "schedule.warmup_start_lr=0.0",
                "--set", "schedule.decay=cosine",
                "--set", "model.zero_init_gamma=none",
                "--set", f"train.seed={self.seed}",
                "--set", f"train.eval_every_epochs={eval_every(self.batch)}",
                "--set", "train.eval_batch=2000",
                "--set", "train.log_every_steps=5"]
        return args + VARIANTS[self.variant]


VARIANTS = {
    "": [],
    "zerogamma": ["--set", "model.zero_init_gamma=all"],
    "lars": ["--set", "optim.name=lars", "--set", "optim.lars_trust=0.02"],
    "ls": ["--set", "optim.label_smoothing=0.1"],
    "nesterov": ["--set", "optim.nesterov=true"],
}


def lr_grid(batch: int) -> list[float]:
    if batch == SMALL:
        return [SMALL_LR / 2, SMALL_LR, SMALL_LR * 2]
    return [round(SMALL_LR * (batch / SMALL) ** p, 4) for p in (0.5, 0.75, 1.0)]


def plan() -> list[Run]:
    """In priority order: the batches that map to the paper's and the records' batches
    (14K, 32K, 64K on ImageNet = 672, 1,536, 3,072 here) with the baseline first, then
    the powers of two that trace the knee."""
    runs = []
    runs.append(Run(SMALL, SMALL_LR))
    for b in (3072, 1536, 672):
        runs += [Run(b, lr) for lr in lr_grid(b)]
    runs += [Run(SMALL, lr) for lr in lr_grid(SMALL) if lr != SMALL_LR]
    for b in (1024, 4096, 256, 8192, 512, 2048, 16384):
        runs += [Run(b, lr) for lr in lr_grid(b)]
    return runs


def results_of(run: Run) -> dict | None:
    d = RESULTS / run.name
    if not (d / "summary.json").exists():
        return None
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"summary": json.loads((d / "summary.json").read_text()),
            "evals": [x for x in lines if x.get("eval")]}


def run_one(run: Run) -> None:
    out = RUNS / run.name
    train(out, run.cli())
    dest = RESULTS / run.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("summary.json", "metrics.jsonl", "config.yaml", "run.json"):
        shutil.copy(out / f, dest / f)
    (dest / "command.txt").write_text("largebatch train " + " ".join(run.cli()) + f" --out runs/critical_batch/{run.name}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--max-runs", type=int, default=0)
    a = p.parse_args()
    runs = plan()
    if a.list:
        for r in runs:
            res = results_of(r)
            print(f"{r.name:40} {'done: top-1 %.4f' % res['summary']['top1'] if res else 'missing'}")
        return
    if not a.report:
        done = 0
        for r in runs:
            if results_of(r) is None and (not a.max_runs or done < a.max_runs):
                run_one(r)
                done += 1


if __name__ == "__main__":
    main()
