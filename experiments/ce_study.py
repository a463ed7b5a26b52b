"""Does a Collapsed Ensemble pay where a single model is not saturated? Ordinary run vs
LR-cycle snapshots (the SC18 run-B pattern, cosine-annealed cycles, FGE-style short
cycles), each also as a weight average, at an equal epoch budget and several seeds.

Setting (why): ResNet-8 on a 20,000-image subset of Fashion-MNIST (the full 10,000-image
test set), with augmentation, 36 epochs at batch 256. On the full training set a ResNet-8
nearly saturates Fashion-MNIST in 12 epochs and its snapshots are too alike for an
ensemble to correct anything (docs/COLLAPSED_ENSEMBLE_12EPOCHS.md, the earlier study); a third of
the data leaves a generalisation gap for averaging to close, and 36 epochs give cycles of
several epochs (4 cycles of 5.4 epochs after a main phase of 14.4). The large-batch
setting repeats the ordinary run and the cosine cycles at batch 1,536, the largest batch
the critical-batch study found within about half a point of batch 128. A ResNet-20 (three
times the blocks) repeats the ordinary run and the cosine cycles once: the ResNet-8's
snapshots turned out too alike to gain from an ensemble, and a model with more capacity
has more variance between snapshots for one to remove.

    python experiments/ce_study.py                # train what is missing, then write the doc
    python experiments/ce_study.py --report       # only the doc, from experiments/results/ce_study/
    python experiments/ce_study.py --max-runs 1   # at most one run
    python experiments/ce_study.py --smoke        # a 1-epoch pass of every kind of run (checks the script)
    python experiments/ce_study.py --save-partial # keep unfinished runs' checkpoints in git

Every finished run's summary.json, metrics.jsonl, ensemble.json (members, last-k
probability ensembles and the weight average, with inference costs) and command are
copied to experiments/results/ce_study/NAME/ and committed, so the study continues
across machines.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, hardware, keep_results, largebatch, mean_spread, save_partials, train
from zero_gamma_short import make_subset

RESULTS = ROOT / "experiments/results/ce_study"
RUNS = ROOT / "runs/ce_study"
PARTIAL = RESULTS / "partial"  # unfinished runs' newest checkpoint and snapshots, committed before the machine goes away
SUBSET, EPOCHS, SEEDS = 20_000, 36, (0, 1, 2)
# kind: (ensemble.cycle_shape, cycles, other settings). "equal": cosine cycles that all
# restart at the same peak (Huang et al. restart at the initial LR each time), so the
# snapshots are equally trained rather than each a refinement of the one before.
CYCLED = {"sc18": ("sc18", 4, []), "cosine": ("cosine", 4, []), "fge": ("fge", 8, []),
          "equal": ("cosine", 4, ["--set", "ensemble.peak_decay=1.0"])}
KINDS = ("ordinary", *CYCLED)


@dataclass(frozen=True)
class Run:
    kind: str          # one of KINDS
    batch: int
    seed: int
    epochs: float = EPOCHS
    model: str = "resnet8"

    @property
    def name(self) -> str:
        model = "" if self.model == "resnet8" else f"-{self.model}"
        return f"{self.kind}-b{self.batch}{model}-e{self.epochs:g}-s{self.seed}"

    def cli(self, data: Path) -> list[str]:
        lr = 0.2 * self.batch / 256 if self.batch <= 256 else 0.2 * (self.batch / 256) ** 0.75
        args = ["--recipe", "fmnist-baseline", "--data", str(data), "--global-batch", str(self.batch),
                "--micro-batch", str(min(self.batch, 256)), "--epochs", f"{self.epochs:g}",
                "--set", f"schedule.peak_lr={lr:.4g}", "--set", f"schedule.warmup_epochs={min(1.0, self.epochs / 10):g}",
                "--set", "schedule.decay=cosine", "--set", "data.augment=true",
                "--set", f"train.seed={self.seed}", "--set", "train.eval_every_epochs=2",
                "--set", "train.eval_batch=2000"]
        if self.model != "resnet8":
            args += ["--set", f"model.name={self.model}"]
        if self.kind != "ordinary":
            collapse = 0.1 if self.kind == "sc18" else 0.0  # the run-B pattern ends in a collapse
            shape, cycles, extra = CYCLED[self.kind]
            args += ["--set", f"ensemble.cycles={cycles}", "--set", f"ensemble.cycle_shape={shape}",
                     "--set", "ensemble.main_fraction=0.4", "--set", f"ensemble.collapse_fraction={collapse}", *extra]
        return args


def plan(epochs: float = EPOCHS) -> list[Run]:
    """Seed 0 of the four kinds at batch 256; then whether a larger model, whose
    snapshots have more variance to average away, changes the answer (ResNet-20, ordinary
    and cosine cycles), before more seeds of a model whose first seed showed no gain;
    then, since the ResNet-20's cosine snapshots still agreed, cycles of equal peaks;
    then, since equal peaks gave the study's first ensemble above its final snapshot (and
    0.20 above the ordinary run), seeds 1 and 2 of that comparison; then seeds 1 and 2 of
    the ResNet-8 kinds, the ordinary run and SC18 (the closest to paying on seed 0) first;
    then the large batch."""
    kinds = ("ordinary", "sc18", "cosine", "fge")
    runs = [Run(k, 256, SEEDS[0], epochs) for k in kinds]
    runs += [Run(k, 256, 0, epochs, model="resnet20") for k in ("ordinary", "cosine", "equal")]
    runs += [Run(k, 256, s, epochs, model="resnet20") for s in SEEDS[1:] for k in ("ordinary", "equal")]
    runs += [Run(k, 256, s, epochs) for k in kinds for s in SEEDS[1:]]
    runs += [Run(k, 1536, s, epochs) for s in SEEDS for k in ("ordinary", "cosine")]
    return runs


def results_of(run: Run) -> dict | None:
    d = RESULTS / run.name
    if not (d / "summary.json").exists():
        return None
    out = {"summary": json.loads((d / "summary.json").read_text())}
    if (d / "ensemble.json").exists():
        out["ensemble"] = json.loads((d / "ensemble.json").read_text())
    return out


def run_one(run: Run, data: Path, results: Path) -> None:
    out = RUNS / run.name
    args = run.cli(data)
    train(out, args, partial=PARTIAL / run.name)
    dest = results / run.name
    dest.mkdir(parents=True, exist_ok=True)
    commands = ["largebatch train " + " ".join(args) + f" --out {out.relative_to(ROOT)}"]
    if run.kind != "ordinary":
        snaps = sorted((out / "snapshots").glob("[0-9][0-9].pt"))
        report = out / "ensemble.json"
        if not report.exists():
            largebatch("ensemble", *snaps, "--average", out / "average.pt", "--out", report)
        commands.append(f"largebatch ensemble {out.relative_to(ROOT)}/snapshots/*.pt --average "
                        f"{out.relative_to(ROOT)}/average.pt --out {report.relative_to(ROOT)}")
        shutil.copy(report, dest / "ensemble.json")
    keep_results(out, dest)
    (dest / "command.txt").write_text("\n".join(commands) + "\n")


def independent_dir(batch: int, model: str) -> Path:
    tag = "" if model == "resnet8" else f"-{model}"
    return RESULTS / f"independent-b{batch}{tag}-e{EPOCHS:g}"


def independent_ensembles(runs: list[Run]) -> None:
    """The reference an ensemble inside one budget is up against: the final models of the
    ordinary runs of different seeds as a probability ensemble, at k times the budget
    (the lowest seed last, so its last-k prefixes are that seed alone, then with the next,
    ...), taken again when a seed is added. Needs the runs' checkpoints on this machine; skipped where
    they are gone."""
    for batch, model in {(r.batch, r.model) for r in runs}:
        seeds = sorted(r.seed for r in runs if (r.kind, r.batch, r.model) == ("ordinary", batch, model)
                       and results_of(r) and (RUNS / r.name / "checkpoints/last.pt").exists())
        if len(seeds) < 2:
            continue
        dest = independent_dir(batch, model)
        if len((independent_of(batch, model) or {}).get("members", [])) == len(seeds):
            continue
        finals = [RUNS / Run("ordinary", batch, s, EPOCHS, model).name / "checkpoints/last.pt" for s in reversed(seeds)]
        dest.mkdir(parents=True, exist_ok=True)
        largebatch("ensemble", *finals, "--out", dest / "ensemble.json")
        (dest / "command.txt").write_text("largebatch ensemble " + " ".join(str(f.relative_to(ROOT)) for f in finals)
                                          + f" --out {(dest / 'ensemble.json').relative_to(ROOT)}\n")


def independent_of(batch: int, model: str) -> dict | None:
    f = independent_dir(batch, model) / "ensemble.json"
    return json.loads(f.read_text()) if f.exists() else None


def differs(member: dict) -> str:
    if "disagrees_with_last" not in member:
        return ""  # evaluated before the ensemble command measured it
    return f" [{100 * member['disagrees_with_last']:.1f} / {100 * member['right_where_last_wrong']:.1f}]"


def report(runs: list[Run], doc: Path) -> None:
    done = {r: res for r in runs if (res := results_of(r))}
    lines = ["# The Collapsed Ensemble on Fashion-MNIST", "",
             "Generated by `python experiments/ce_study.py --report` from the runs committed under "
             "`experiments/results/ce_study/`; no number here is edited by hand.", "",
             f"Setting: ResNet-8 (ResNet-20 where a section says so), a {SUBSET:,}-image subset of Fashion-MNIST (full test set), augmentation, "
             f"{EPOCHS} epochs, cosine decay, bf16, one process with 2 threads; seeds {', '.join(map(str, SEEDS))}; "
             f"test top-1 in %, mean ± half the range over seeds. Hardware of the runs: "
             f"{sorted({json.loads((RESULTS / r.name / 'run.json').read_text()).get('cpu', '?') for r in done}) or [hardware()]}.",
             "", f"Progress: {len(done)} of {len(runs)} planned runs finished.", ""]
    for batch, model in sorted({(r.batch, r.model) for r in done}, key=lambda bm: (bm[1] != "resnet8", bm)):
        lines += [f"## Global batch {batch}" + ("" if model == "resnet8" else f", {model}"), "",
                  "| run | single final model | best probability ensemble of k >= 2 (k = forward passes) "
                  "| weight average (1 pass) | best ensemble − ordinary run, paired by seed: mean (each seed) | seeds |",
                  "|---|---|---|---|---|---|"]
        ordinary = {r.seed: res["summary"]["top1"] for r, res in done.items()
                    if (r.batch, r.model, r.kind) == (batch, model, "ordinary")}
        for kind in KINDS:
            rs = {r.seed: done[r] for r in runs if (r.batch, r.model, r.kind) == (batch, model, kind) and r in done}
            if not rs:
                continue
            final = mean_spread([x["summary"]["top1"] for x in rs.values()])
            ens = avg = paired = "—"
            if kind != "ordinary" and all("ensemble" in x for x in rs.values()):
                k_max = min(len(x["ensemble"]["ensembles"]) for x in rs.values())
                # k = 1 is the final model alone: the ensembles start at 2
                by_k = {k: {seed: x["ensemble"]["ensembles"][k - 1]["top1"] for seed, x in rs.items()}
                        for k in range(2, k_max + 1)}
                best = max(by_k, key=lambda k: sum(by_k[k].values()))
                ens = f"{mean_spread(list(by_k[best].values()))} (k = {best})"
                if all("average" in x["ensemble"] for x in rs.values()):
                    avg = mean_spread([x["ensemble"]["average"]["top1"] for x in rs.values()])
                diffs = [100 * (top1 - ordinary[seed]) for seed, top1 in sorted(by_k[best].items()) if seed in ordinary]
                if diffs:
                    paired = f"{sum(diffs) / len(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})"
            lines.append(f"| {kind} | {final} | {ens} | {avg} | {paired} | {len(rs)} |")
        if (ind := independent_of(batch, model)):
            k = ind["ensembles"][-1]
            lines.append(f"| reference: the ordinary runs of {k['k']} seeds as one ensemble ({k['k']}x the budget) | — | "
                         f"{100 * k['top1']:.2f} (k = {k['k']}) | — | — | {k['k']} |")
        lines.append("")
    lines += ["The paper (SC18 authors' run B, ResNet-50 on ImageNet-1K): 77.0 % for the ordinary run, "
              "77.5 % for the Collapsed Ensemble at the same budget (docs/SC18.md). The earlier study on the full "
              "training set, 12 epochs at batch 1,024, where the ensemble gained nothing: "
              "[COLLAPSED_ENSEMBLE_12EPOCHS.md](COLLAPSED_ENSEMBLE_12EPOCHS.md).", ""]
    reading = ROOT / "experiments/ce_study_reading.md"
    if reading.exists():
        lines += ["## Reading", "", reading.read_text().strip(), ""]
    lines += ["## Every finished run", "",
              "Members are the snapshots alone (phase: top-1 %); k = the last k snapshots as a probability "
              "ensemble; the weight average has its BatchNorm statistics recomputed on training data. Cost: "
              "forward passes per image and seconds over the 10,000 test images on the CPU of the run.", "",
              "Beside each snapshot but the last, in brackets: the share of test images on which its top-1 class "
              "differs from the last snapshot's (only those can an ensemble change), and the share it gets right "
              "where the last snapshot is wrong (the most an ensemble with it could correct), in %.", "",
              "| run | final model | members | last-k ensembles: top-1 % (passes, s) | weight average (passes, s) |",
              "|---|---|---|---|---|"]
    for r, res in done.items():
        e = res.get("ensemble")
        # every member but the last is set against the last
        members = ", ".join(f"{m['phase']}: {100 * m['top1']:.2f}" + (differs(m) if j < len(e["members"]) - 1 else "")
                            for j, m in enumerate(e["members"])) if e else "—"
        ens = "; ".join(f"k={x['k']}: {100 * x['top1']:.2f} ({x['forward_passes']}, {x['seconds']:.1f})"
                        for x in e["ensembles"]) if e else "—"
        avg = (f"{100 * e['average']['top1']:.2f} ({e['average']['forward_passes']}, {e['average']['seconds']:.1f})"
               if e and "average" in e else "—")
        lines.append(f"| {r.name} | {100 * res['summary']['top1']:.2f} | {members} | {ens} | {avg} |")
    lines += ["", "## Commands", "", "Each run's exact commands (`experiments/results/ce_study/NAME/command.txt`); "
              f"`runs/ce_study/data` holds the first {SUBSET:,} training images and the full test set as IDX files "
              "(written by the script, `make_subset` in experiments/zero_gamma_short.py):", "", "```"]
    lines += [c.replace(f"{ROOT}/", "") for r in done for c in (RESULTS / r.name / "command.txt").read_text().splitlines()]
    lines += [c for f in sorted(RESULTS.glob("independent-*/command.txt")) for c in f.read_text().splitlines()]
    lines += ["```", ""]
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true")
    p.add_argument("--max-runs", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="1 epoch of each kind of run into runs/ce_study_smoke")
    p.add_argument("--save-partial", action="store_true",
                   help="copy unfinished runs' newest checkpoints and snapshots under results/partial "
                        "(before a machine goes away)")
    a = p.parse_args()
    global RUNS
    if a.save_partial:
        save_partials([r.name for r in plan() if results_of(r) is None], RUNS, PARTIAL)
        return
    data = make_subset(ROOT / "runs/ce_study/data", SUBSET)
    if a.smoke:
        RUNS = ROOT / "runs/ce_study_smoke"
        for r in [Run(k, 256, 0, 1.0) for k in KINDS]:
            run_one(r, data, RUNS / "results")
        print("smoke: every kind of run trained and evaluated")
        return
    runs = plan()
    if not a.report:
        done = 0
        for r in runs:
            if results_of(r) is None and (not a.max_runs or done < a.max_runs):
                run_one(r, data, RESULTS)
                done += 1
        independent_ensembles(runs)
    report(runs, ROOT / "docs/COLLAPSED_ENSEMBLE.md")


if __name__ == "__main__":
    main()
