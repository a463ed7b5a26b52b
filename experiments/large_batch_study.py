"""The large-batch study on Fashion-MNIST: where the recipe holds accuracy and where it
breaks. Runs the grid through the public CLI (one process, 2 threads), one directory
per run, skips finished runs (so a stopped study continues), then regenerates
docs/RESULTS.md and its plots from the runs' summary.json and metrics.jsonl files.

    python experiments/large_batch_study.py            # the full grid (about an hour on 2 cores)
    python experiments/large_batch_study.py --quick    # a smoke check in a few minutes

Model and budget: ResNet-8 (fmnist-baseline: bf16, cosine, no augmentation, wd 5e-4 off
BN and biases), 3 epochs for the grid, 9 epochs for the longer-budget axis: the whole
study then takes about an hour on 2 cores (a 4-epoch grid would not fit in 90 minutes
with the 3x axis).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, command, hardware, mean_spread, train

SMALL = 128                       # the small-batch baseline
BASE_LR = 0.2 / 256 * SMALL       # fmnist-baseline's LR at batch 128: 0.1


@dataclass
class Run:
    name: str
    technique: str
    batch: int
    epochs: float
    args: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def dirname(self) -> str:
        return f"{self.name}-s{self.seed}"

    def cli(self) -> list[str]:
        micro = min(self.batch, 1024)  # bounded memory; BN groups of 32 make the result layout-free
        return ["--recipe", "fmnist-baseline", "--global-batch", str(self.batch), "--micro-batch", str(micro),
                "--epochs", f"{self.epochs:g}", "--set", f"train.seed={self.seed}", *self.args]


def techniques(epochs: float) -> dict[str, list[str]]:
    warm = ["--set", f"schedule.warmup_epochs={epochs / 4:g}", "--set", f"schedule.warmup_start_lr={BASE_LR}"]
    return {
        "no LR scaling": ["--set", f"schedule.peak_lr={BASE_LR}"],
        "linear scaling": [],
        "linear + warmup": warm,
        "linear + warmup + LARS": [*warm, "--set", "optim.name=lars", "--set", "optim.lars_trust=0.02"],
    }


def grid(quick: bool, seeds: list[int]) -> list[Run]:
    epochs, long_epochs = (0.3, 0.6) if quick else (3.0, 9.0)
    batches = [SMALL, 2048] if quick else [SMALL, 2048, 8192, 16384]
    large = 2048 if quick else 8192
    tech = techniques(epochs)
    runs = []
    for seed in seeds:
        for b in batches:
            for t, args in tech.items():
                # at the small batch the first three techniques are one run (LR 0.1, no warmup needed)
                if b == SMALL and t in ("no LR scaling", "linear + warmup"):
                    continue
                runs.append(Run(f"{t.replace(' + ', '-').replace(' ', '-')}-b{b}", t, b, epochs, args, seed))
        warm = tech["linear + warmup"]
        decays = {"poly power 1": ["--set", "schedule.decay=poly"],
                  "poly power 2": ["--set", "schedule.decay=poly", "--set", "schedule.poly_power=2"],
                  "step": ["--set", "schedule.decay=step", "--set",
                           f"schedule.milestones=[{epochs / 2:g}, {epochs * 3 / 4:g}]"]}
        for d, args in decays.items():
            runs.append(Run(f"decay-{d.replace(' ', '-')}-b{large}", f"decay: {d}", large, epochs, [*warm, *args], seed))
        runs.append(Run(f"bn-whole-micro-batch-b{large}", "BN over the whole micro-batch (1,024)", large, epochs,
                        [*warm, "--set", "model.bn_group_size=0"], seed))
        for b in (SMALL, large):
            runs.append(Run(f"collapsed-ensemble-b{b}", "Collapsed Ensemble (3 cycles)", b, epochs,
                            [*(warm if b != SMALL else []), "--set", "ensemble.cycles=3"], seed))
        long_warm = techniques(long_epochs)["linear + warmup"]
        for b in ([SMALL, large] if quick else [SMALL, 8192, 16384]):
            runs.append(Run(f"long-linear-warmup-b{b}", "linear + warmup, 3x epochs", b, long_epochs,
                            long_warm if b != SMALL else [], seed))
    return runs


def load_curve(run_dir: Path) -> tuple[list, list]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [x for x in lines if x.get("eval")]
    steps = [x for x in lines if "lr" in x and not x.get("eval")]
    return [(x["epoch"], x["top1"]) for x in evals], [(x["step"], x["lr"]) for x in steps]


def plots(results: list[tuple[Run, dict]], runs_dir: Path, doc_dir: Path, tag: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    grid_epochs = min(r.epochs for r, _ in results)
    # accuracy vs batch, per technique (mean over seeds)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in ["no LR scaling", "linear scaling", "linear + warmup", "linear + warmup + LARS"]:
        pts = {}
        for r, s in results:
            same = r.technique == t or (r.batch == SMALL and r.technique == "linear scaling" and t != "linear + warmup + LARS")
            if same and r.epochs == grid_epochs:
                pts.setdefault(r.batch, []).append(s["top1"] * 100)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=t)
    long = sorted((r.batch, s["top1"] * 100) for r, s in results if r.technique.endswith("3x epochs"))
    if long:
        ax.plot([b for b, _ in long], [a for _, a in long], marker="s", linestyle="--", label="linear + warmup, 3x epochs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fashion-MNIST, ResNet-8, {grid_epochs:g} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names.append(f"study{tag}_accuracy_vs_batch.png")
    fig.tight_layout()
    fig.savefig(doc_dir / names[-1], dpi=110)
    plt.close(fig)
    # LR schedules and training curves of a few runs
    chosen = [(r, s) for r, s in results if r.seed == results[0][0].seed and r.batch in (SMALL, max(x.batch for x, _ in results))
              and r.epochs == grid_epochs and r.technique != "linear + warmup + LARS"][:6]
    chosen += [(r, s) for r, s in results if r.technique.startswith("Collapsed") and r.seed == results[0][0].seed]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r, _ in chosen:
        curve, lrs = load_curve(runs_dir / r.dirname)
        a1.plot([s / max(x for x, _ in lrs) * r.epochs for s, _ in lrs], [lr for _, lr in lrs], label=r.name)
        a2.plot([e for e, _ in curve], [t * 100 for _, t in curve], marker=".", label=r.name)
    a1.set_xlabel("epoch")
    a1.set_ylabel("learning rate")
    a1.set_yscale("log")
    a1.set_title("LR schedules (logged steps)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test top-1 (%)")
    a2.set_title("training curves")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    names.append(f"study{tag}_schedules_and_curves.png")
    fig.tight_layout()
    fig.savefig(doc_dir / names[-1], dpi=110)
    plt.close(fig)
    return names


def render(results: list[tuple[Run, dict]], figures: list[str], runs_dir: Path, quick: bool) -> str:
    rows = {}
    for r, s in results:
        rows.setdefault((r.technique, r.batch, r.epochs), []).append((r, s))
    # the baseline of each budget: the small batch with the small-batch LR
    base = {}
    for r, s in results:
        if r.batch == SMALL and r.technique in ("linear scaling", "linear + warmup, 3x epochs"):
            base.setdefault(r.epochs, []).append(s["top1"])
    lines = ["# Results: the large-batch study on Fashion-MNIST" + (" (quick smoke run)" if quick else ""), "",
             "Generated by `python experiments/large_batch_study.py" + (" --quick" if quick else "") +
             "` from the runs' `summary.json` and `metrics.jsonl`; the numbers are not edited by hand.", "",
             f"Hardware: {hardware()}. Each run: one process, 2 threads, bf16 autocast. Wall times are "
             f"those of the runs as they happened (other work may have shared the machine).", "",
             "Test top-1 in %, mean ± half the range over seeds (one seed: the value). "
             f"The small-batch baseline is batch {SMALL} at LR {BASE_LR:g} (no LR scaling, no warmup).", "",
             "| technique | global batch | epochs | steps | test top-1 (%) | vs batch-128 baseline, same epochs (points) | seeds | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for (tech, batch, epochs), group in rows.items():
        accs = [s["top1"] for _, s in group]
        ref = base.get(epochs)
        delta = (sum(accs) / len(accs) - sum(ref) / len(ref)) * 100 if ref else float("nan")
        wall = sum(s["wall_seconds"] for _, s in group) / len(group)
        extra = ""
        if "ensemble_top1" in group[0][1]:
            extra = f" (final model; ensemble of {len(group[0][1]['snapshots'])}: " \
                    f"{mean_spread([s['ensemble_top1'] for _, s in group])})"
        lines.append(f"| {tech} | {batch} | {epochs:g} | {group[0][1]['steps']} | {mean_spread(accs)}{extra} | "
                     f"{delta:+.2f} | {len(group)} | {wall:.0f} |")
    lines += [""] + [f"![{f}]({f})" for f in figures] + ["", "## Reading", "", "READING", "",
                                                          "## Commands", "", "```"]
    lines += [command(r.cli(), runs_dir / r.dirname) for r, _ in results] + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny grid, written to runs/study-quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", type=Path)
    p.add_argument("--doc", type=Path, help="default docs/RESULTS.md (quick: runs/study-quick/RESULTS.md)")
    p.add_argument("--reading", type=Path, default=ROOT / "experiments/study_reading.md",
                   help="the hand-written reading of the results, put under 'Reading'")
    a = p.parse_args()
    runs_dir = a.runs or ROOT / ("runs/study-quick" if a.quick else "runs/study")
    doc = a.doc or (runs_dir / "RESULTS.md" if a.quick else ROOT / "docs/RESULTS.md")
    results = [(r, train(runs_dir / r.dirname, r.cli())) for r in grid(a.quick, a.seeds)]
    doc.parent.mkdir(parents=True, exist_ok=True)
    figures = plots(results, runs_dir, doc.parent, "_quick" if a.quick else "")
    text = render(results, figures, runs_dir, a.quick)
    reading = a.reading.read_text().strip() if a.reading.exists() and not a.quick else "(not written for this run)"
    doc.write_text(text.replace("READING", reading))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
