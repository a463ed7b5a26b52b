"""Does zero-gamma cripple short runs? The small-batch recipe (fmnist-baseline) for 5
epochs on a 4,000-image subset of Fashion-MNIST (the full test set), with zero-gamma on
every residual block against zero-gamma off, for a few seeds.

    python experiments/zero_gamma_short.py   # results in experiments/results/zero_gamma_short/
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from common import ROOT, keep_results, mean_spread, train
from largebatch.data import fmnist

SUBSET = 4000
RESULTS = ROOT / "experiments/results/zero_gamma_short"


def make_subset(dest: Path, n: int = SUBSET) -> Path:
    """The first n training images (and the full test set) as IDX files in dest."""
    src = fmnist.resolve_dir(None)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in fmnist.FILES["test"]:
        shutil.copy(src / f"{stem}.gz", dest / f"{stem}.gz")
    images, labels = (fmnist.read_idx(src / f"{s}.gz") for s in fmnist.FILES["train"])
    for stem, arr in zip(fmnist.FILES["train"], (images[:n], labels[:n])):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        with gzip.open(dest / f"{stem}.gz", "wb") as f:
            f.write(header + arr.tobytes())
    return dest


def main() -> None:
    data = make_subset(ROOT / "runs/zero_gamma_short/data")
    rows = {}
    for gamma in ("all", "none"):
        for seed in (0, 1):
            name = f"zero-gamma-{gamma}-s{seed}"
            out = ROOT / "runs/zero_gamma_short" / name
            # LR 0.1: the recipe's at the time of the committed results
            args = ["--recipe", "fmnist-baseline", "--data", str(data), "--epochs", "5",
                    "--set", "schedule.peak_lr=0.1", "--set", f"model.zero_init_gamma={gamma}", "--set", f"train.seed={seed}"]
            summary = train(out, args)
            keep_results(out, RESULTS / name)
            rows.setdefault(gamma, []).append(summary["top1"])
    for gamma, accs in rows.items():
        print(f"zero_init_gamma={gamma}: test top-1 {mean_spread(accs)} % over seeds {len(accs)}")
    (RESULTS / "table.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
