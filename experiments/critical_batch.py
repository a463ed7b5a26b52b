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
    python experiments/critical_batch.py --save-partial  # keep unfinished runs' checkpoints in git
    touch runs/critical_batch/STOP                     # stop after the run in progress

Recipe (fixed for every batch, so only LR and warmup vary): fmnist-baseline (ResNet-8,
bf16, no augmentation, wd 5e-4 off BN and biases, BN over groups of 32 samples) with
zero-gamma off, SGD momentum 0.9, cosine decay to zero over the budget, linear warmup
from LR 0 that grows with the batch. The LR grid runs from the square-root rule past the
linear rule from the batch-128 LR 0.1: lr(B) = 0.1 * (B / 128) ** p, starting at
p in {0.75, 1} (a batch started later: at the nearest searched batch's best p and the
quarter below) and growing by quarters toward the better edge, p from 0.25 to 1.5 (at
batch 128, each quarter doubles the LR from 0.1 at p = 0.75). A run that diverges is
kept as a result (0 %, with the reason) and the search moves away from it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from common import ROOT, Diverged, keep_results, save_partials, train

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
        # Bounded memory, and at least two micro-batches so that every run measures the
        # gradient noise scale: the largest multiple of 32 up to min(batch / 2, 1,024) that
        # divides the batch (BN groups of 32 samples make the training the same for any
        # micro-batch).
        micro = max(m for m in range(32, min(self.batch // 2, 1024) + 1, 32) if self.batch % m == 0)
        args = ["--recipe", "fmnist-baseline", "--global-batch", str(self.batch), "--micro-batch", str(micro),
                "--epochs", f"{self.epochs:g}",
                "--set", f"schedule.peak_lr={self.lr:.6g}",
                "--set", f"schedule.warmup_epochs={warmup_epochs(self.batch):g}",
                "--set", "schedule.warmup_start=0.0",
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
    "lamb": ["--set", "optim.name=lamb"],
    "ls": ["--set", "optim.label_smoothing=0.1"],
    "nesterov": ["--set", "optim.nesterov=true"],
    # Batch-size control (Smith et al. 2018): from 768, the batch doubles every 4 epochs at a
    # constant LR, the doubling standing in for the decay; the last phase decays to zero.
    "grow3072": ["--set", "phases=[{name: b768, epochs: 4, decay: constant, warmup_epochs: 0.93, snapshot: false}, "
                          "{name: b1536, epochs: 4, decay: constant, global_batch: 1536, scale_lr: false, "
                          "snapshot: false}, {name: b3072, epochs: 4, decay: cosine, global_batch: 3072, "
                          "scale_lr: false, snapshot: false}]"],
}


# LAMB's LR is the fraction of its weights a layer moves per step, as LARS's LR times its
# trust coefficient is: its grid is LARS's times 0.02, so both search the same steps.
LR_SCALE = {"lamb": 0.02}


def lr_at(batch: int, p: float, variant: str = "") -> float:
    """The grid's LR at exponent p: lr(B) = 0.1 * (B / 128) ** p. At batch 128 itself the
    exponent is read as a factor 2 ** (4 p - 3): p = 0.75 is the baseline LR, each quarter a
    doubling, so the baseline is tuned on the same number of points as every other batch."""
    factor = 2 ** (4 * p - 3) if batch == SMALL else (batch / SMALL) ** p
    lr = round(SMALL_LR * factor, 4)
    return lr * LR_SCALE[variant] if variant in LR_SCALE else lr


def lr_grid(batch: int) -> list[float]:
    """The first points of every batch's grid: the square-root, the 3/4 and the linear rule."""
    return [lr_at(batch, p) for p in (0.5, 0.75, 1.0)]


P_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def first_points(batch: int, variant: str) -> list[float]:
    """Where a batch's search starts. The first batches started at p = 0.75 and 1; their
    best lay one or two quarters higher, costing a run or two each to walk there. A batch
    not yet started now begins at the best p of the nearest batch (in log2, other than the
    baseline, whose p means something else) whose search has runs, and the quarter below
    it (larger batches want smaller exponents)."""
    started = lambda b: [p for p in P_GRID if results_of(Run(b, lr_at(b, p, variant), variant=variant))]  # noqa: E731
    if started(batch):
        return [0.75, 1.0]
    others = {int(d.name[1:].split("-")[0]) for d in RESULTS.glob("b*-s0")
              if d.name.split("-")[2:-2] == ([variant] if variant else [])}
    others = [b for b in others if b not in (batch, SMALL) and started(b)]  # 128's p counts doublings
    if not others:
        return [0.75, 1.0]
    near = min(others, key=lambda b: (abs(math.log2(b / batch)), b))
    best = best_run(near, variant)
    p = next(p for p in P_GRID if lr_at(near, p, variant) == best.lr)
    return [q for q in (p - 0.25, p) if q >= P_GRID[0]]


def tuned(batch: int, seed: int = 0, variant: str = "") -> list[Run]:
    """The LR search for one batch (and variant), grown from what has finished: two first
    points (first_points), then one more quarter in the better direction while the best
    is at an edge of what has been tried (p from 0.25 to 1.5). Seeds other than 0 rerun
    the best LR of seed 0."""
    if seed:
        best = best_run(batch, variant)
        return [replace(best, seed=seed)] if best else []
    run_at = lambda p: Run(batch, lr_at(batch, p, variant), variant=variant)  # noqa: E731
    ps = first_points(batch, variant) + [p for p in P_GRID if results_of(run_at(p))]
    while True:
        ps = sorted(set(ps))
        top1 = {p: res["summary"]["top1"] for p in ps if (res := results_of(run_at(p)))}
        if len(top1) < len(ps):
            break  # a run of the grid is still to do
        best = max(top1, key=top1.get)
        step = -0.25 if best == ps[0] else 0.25 if best == ps[-1] else 0
        if not step or not 0.25 <= best + step <= 1.5:
            break
        ps.append(best + step)
    return [run_at(p) for p in sorted(set(ps))]


def best_run(batch: int, variant: str = "") -> Run | None:
    """The best finished seed-0 run of a batch's LR search."""
    done = [(r, res) for r in tuned(batch, variant=variant) if (res := results_of(r))]
    return max(done, key=lambda rv: rv[1]["summary"]["top1"])[0] if done else None


def plan() -> list[Run]:
    """In priority order, re-read after every run (the LR searches grow from the results):
    the baseline, the batches that map to the paper's and the records' batches (14K, 32K,
    64K on ImageNet = 672, 1,536, 3,072 here), the baseline's own LR search, LARS at 3,072,
    the second seeds the targets need, batch-size control (a target of its own), 1,024
    (the fmnist-large recipe's batch), LARS at 1,536, the powers of two that trace the
    knee (those that test the knee's fits first), LARS's
    second seed, then the other recipe variants."""
    runs = [Run(SMALL, SMALL_LR)]
    for b in (3072, 1536, 672, SMALL):
        runs += tuned(b)
    runs += tuned(3072, variant="lars")
    for b in (SMALL, 672, 1536):
        runs += tuned(b, seed=1)
    runs += tuned(768, variant="grow3072")  # searched like a batch of its own, from its first batch
    runs += tuned(1024)
    # SGD is 0.68 point short at 1,536 over two seeds; the 32K records used LARS, which at
    # 3,072 gained 2.6 points over SGD's best
    runs += tuned(1536, variant="lars")
    for b in (2048, 4096, 256, 512, 8192, 16384):
        runs += tuned(b)
    # At 3,072 the best (LARS) is over a point below the baseline: a second seed cannot
    # change the answer there, so it waits for the knee batches.
    runs += tuned(3072, seed=1, variant="lars")
    runs += [Run(3072, lr, variant=v) for v in ("ls", "nesterov") for lr in lr_grid(3072)[:2]]
    runs += tuned(3072, variant="lamb")  # LAMB, to see whether it earns its place beside LARS
    return list(dict.fromkeys(runs))


def results_of(run: Run) -> dict | None:
    d = RESULTS / run.name
    if not (d / "summary.json").exists():
        return None
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"summary": json.loads((d / "summary.json").read_text()),
            "evals": [x for x in lines if x.get("eval")]}


STOP = RUNS / "STOP"  # touch it to end the study after the run in progress (then remove it)
PARTIAL = RESULTS / "partial"  # an unfinished run's newest checkpoint, committed when a session ends


def run_one(run: Run) -> None:
    out = RUNS / run.name
    t0 = time.time()
    try:
        train(out, run.cli(), partial=PARTIAL / run.name)
    except Diverged as e:
        # An LR too high for its batch is an answer of the search: kept as a finished run
        # at 0 % (below every run that trained), with the reason, so it is not retried.
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        step = max((x["step"] for x in lines), default=0)
        summary = {"top1": 0.0, "top5": 0.0, "steps": step, "wall_seconds": time.time() - t0, "diverged": str(e)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"    diverged: {e}", flush=True)
    dest = RESULTS / run.name
    keep_results(out, dest)
    argv = json.loads((out / "run.json").read_text())["command"]  # as it ran (a resumed run: the last start)
    (dest / "command.txt").write_text("largebatch train " + " ".join(argv[1:]) + "\n")


TARGETS = (0.90, 0.91)
PAPER = [  # (what, ImageNet batch, top-1 %, source) -- set beside ours by batch / training-set size
    ("Goyal et al. 2017, linear scaling + 5-epoch warmup", 8192, 76.3, "within 0.2 of their batch-256 run"),
    ("SC18 authors, run A (Intel Caffe, 90 epochs + collapse)", 14336, 76.1, "their batch-4,096 run B: 76.3"),
    ("You et al. 2017, LARS, poly power 2", 32768, 75.0, "about 75 %"),
    ("Jia et al. 2018, LARS, mixed precision", 65536, 75.8, ""),
]
IMAGENET, FMNIST = 1_280_000, 60_000  # the round figure: 14,336 maps to 672


def steps_to(evals: list[dict], target: float) -> int | None:
    return next((e["step"] for e in evals if e["top1"] >= target), None)


def noise_at(lines: list[dict], step: int | None) -> float | None:
    """The smoothed noise scale logged nearest before `step` (or at the end)."""
    logged = [x for x in lines if x.get("noise_scale") and (step is None or x["step"] <= step)]
    return logged[-1]["noise_scale"] if logged else None


def fewest_steps(by_batch: dict, target: float = TARGETS[0]) -> dict:
    """Per batch, the fewest steps to `target` over the LRs tried, and that LR
    (Shallue et al. tune the metaparameters per batch for steps to target; the LR with the
    best final accuracy is not always the fastest to the target)."""
    out = {}
    for b, runs in by_batch.items():
        reached = [(t, r.lr) for r, res in runs if (t := steps_to(res["evals"], target)) is not None]
        out[b] = min(reached) if reached else (None, None)
    return out


def knee_fit(fewest: dict) -> tuple[float, float] | None:
    return fit_knee([(b, t) for b, (t, _) in fewest.items() if t is not None])


def noise_at_target(by_batch: dict, target: float) -> list[float]:
    """B_simple as logged where each run of the LR searches first reaches `target`: what
    the tool would have told a user of that run about the batch the problem can take."""
    out = []
    for runs in by_batch.values():
        for r, res in runs:
            t = steps_to(res["evals"], target)
            if t is not None and (n := noise_at(metrics_of(r), t)) is not None:
                out.append(n)
    return out


def late_noise(run: Run, decay: float = 0.9) -> float | None:
    """B_simple over the second half of a run (the value `largebatch plan` reads), rebuilt
    from its log lines for runs that finished before summary.json carried it: each line
    holds the bias-corrected moving averages, which give back every window's estimate
    exactly. Checked against the run mean in summary.json; None where they disagree."""
    summary = json.loads((RESULTS / run.name / "summary.json").read_text())
    if summary.get("noise_scale_late"):
        return summary["noise_scale_late"]
    lines = [x for x in metrics_of(run) if x.get("grad_sq") is not None and not x.get("eval")]
    prev_g = prev_s = sum_g = sum_s = late_g = late_s = 0.0
    for t, x in enumerate(lines, 1):
        g, s = x["grad_sq"] * (1 - decay ** t), x["trace_cov"] * (1 - decay ** t)
        e_g, e_s = (g - decay * prev_g) / (1 - decay), (s - decay * prev_s) / (1 - decay)
        prev_g, prev_s = g, s
        sum_g, sum_s = sum_g + e_g, sum_s + e_s
        if 2 * x["step"] > summary["steps"]:
            late_g, late_s = late_g + e_g, late_s + e_s
    mean = summary.get("noise_scale")
    if not mean or sum_g <= 0 or abs(sum_s / sum_g / mean - 1) > 1e-6 or late_g <= 0:
        return None
    return late_s / late_g


def predicted_ratio(batch: int, noise: float) -> float:
    """`largebatch plan`'s epochs at `batch` over the baseline's: E(B) = E_min (1 + B / B_noise)."""
    return (1 + batch / noise) / (1 + SMALL / noise)


def metrics_of(run: Run) -> list[dict]:
    return [json.loads(x) for x in (RESULTS / run.name / "metrics.jsonl").read_text().splitlines() if x.strip()]


def fit_knee(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    """Least squares of S(B) = S_min (1 + B_crit / B) in 1/B (linear: S = a + b / B)."""
    if len(points) < 3:
        return None
    xs, ys = [1.0 / b for b, _ in points], [float(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    s_min = my - slope * mx
    return (s_min, slope / s_min) if s_min > 0 else None


def plot(best: dict, by_batch: dict, fewest: dict, knee, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.3))
    pts = sorted((b, t) for b, (t, _) in fewest.items())
    reached = [(b, t) for b, t in pts if t is not None]
    if reached:
        a1.plot(*zip(*reached), marker="o", label="fewest steps over the LRs tried")
        b0, t0 = reached[0]
        xs = [b for b, _ in pts]
        a1.plot(xs, [t0 * b0 / b for b in xs], linestyle=":", color="gray", label="perfect scaling")
        if knee:
            a1.plot(xs, [knee[0] * (1 + knee[1] / b) for b in xs], linestyle="--", label="S_min (1 + B_crit / B)")
    for b, t in pts:
        if t is None:
            a1.axvline(b, color="red", alpha=0.3)
            a1.text(b, 0.02, " not reached", transform=a1.get_xaxis_transform(), fontsize=7, rotation=90,
                    color="red")
    a1.set(xscale="log", yscale="log", xlabel="global batch", ylabel=f"steps to {TARGETS[0]:.0%} test top-1",
           title="steps to target")
    xs = sorted(by_batch)
    a2.plot(xs, [100 * best[b][1]["summary"]["top1"] for b in xs], marker="o", label="best LR of the grid")
    linear = [(b, 100 * res["summary"]["top1"]) for b in xs for r, res in by_batch[b]
              if r.lr == lr_at(b, 1.0) and not r.variant]
    if linear:
        a2.plot(*zip(*linear), marker="s", linestyle="--", label="linear rule")
    a2.set(xscale="log", xlabel="global batch", ylabel="test top-1 (%)", title=f"accuracy at {EPOCHS} epochs")
    for b, (r, res) in sorted(best.items()):
        lines = [json.loads(x) for x in (RESULTS / r.name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ns = [(x["epoch"], x["noise_scale"]) for x in lines if x.get("noise_scale")]
        if ns:
            a3.plot(*zip(*ns), label=f"batch {b}")
    a3.set(yscale="log", xlabel="epoch", ylabel="B_simple (negative estimates not shown)",
           title="measured gradient noise scale")
    for a in (a1, a2):
        a.set_xticks(sorted(by_batch), labels=[str(b) for b in sorted(by_batch)], minor=False)
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prediction_table(done: list, base: Run) -> list[str]:
    """What `largebatch plan --noise-scale` would have told a user from the baseline's
    runs, against the epochs the study's runs took to each target (the fewest over every
    LR and recipe tried at the batch, seed 0)."""
    seeds = [r for r, _ in done if replace(r, seed=0) == base]
    means = [results_of(r)["summary"]["noise_scale"] for r in seeds]
    lates = [v for r in seeds if (v := late_noise(r)) is not None]
    if not means or not lates:
        return []
    mean, late = statistics.fmean(means), statistics.fmean(lates)
    fewest = {}
    for target in TARGETS:
        for r, res in done:
            if r.seed == 0 and not r.variant.startswith("grow"):
                t = steps_to(res["evals"], target)
                if t is not None and t < fewest.get((r.batch, target), math.inf):
                    fewest[r.batch, target] = t
    lines = ["", "## What the tool predicts", "",
             f"`largebatch plan --noise-scale RUN` turns a run's noise scale into epochs per batch, E(B) = E_min "
             f"(1 + B / B_noise). From the baseline's runs (batch {SMALL}, LR {base.lr:g}, {len(seeds)} seeds): "
             f"B_simple over the whole run {mean:.0f}, over its second half {late:.0f} (what `plan` reads). "
             f"Epochs to the target at each batch over the baseline's, predicted and as the runs took them "
             f"(the fewest over every LR and recipe tried, seed 0).", "",
             "| global batch | predicted from the run mean | predicted from the second half | "
             + " | ".join(f"runs, to {100 * t:g} %" for t in TARGETS) + " |",
             "|---|---|---|" + "---|" * len(TARGETS)]
    for b in sorted({b for b, _ in fewest} - {SMALL}):
        took = []
        for target in TARGETS:
            t, t0 = fewest.get((b, target)), fewest.get((SMALL, target))
            took.append(f"{t * b / (t0 * SMALL):.2f}" if t and t0 else "not reached")
        lines.append(f"| {b} | {predicted_ratio(b, mean):.2f} | {predicted_ratio(b, late):.2f} | " + " | ".join(took) + " |")
    return lines


def control_table(done: list, base: Run) -> list[str]:
    """Batch-size control against fixed batches at the same epochs: the first step at
    which each reaches the baseline's accuracy (its mean over seeds, less the study's 0.3
    point), for the control runs and every fixed batch's best run (seed 0)."""
    grown = [(r, res) for r, res in done if r.variant.startswith("grow")]
    if not grown:
        return []
    m0 = statistics.fmean(res["summary"]["top1"] for r, res in done if replace(r, seed=0) == base)
    target = m0 - 0.003
    fixed = {}
    for r, res in done:
        if r.seed == 0 and not r.variant.startswith("grow") and (
                r.batch not in fixed or res["summary"]["top1"] > fixed[r.batch][1]["summary"]["top1"]):
            fixed[r.batch] = (r, res)
    rows = sorted(grown, key=lambda rv: rv[0].lr) + [fixed[b] for b in sorted(fixed)]
    lines = ["", "## Batch-size control against fixed batches", "",
             f"Same {EPOCHS} epochs. Target: the baseline's mean over seeds less 0.3 point ({100 * target:.2f} %). "
             f"Control runs start at batch {grown[0][0].batch} and double the batch every 4 epochs at a constant "
             f"LR, the last phase decaying to zero (the study's `grow3072` variant); fixed batches: the best run "
             f"at each batch over every LR and recipe tried (seed 0).", "",
             "| run | steps | test top-1 (%) | first step at the target | steps to 90 % |", "|---|---|---|---|---|"]
    for r, res in rows:
        t, t90 = steps_to(res["evals"], target), steps_to(res["evals"], TARGETS[0])
        lines.append(f"| {r.name} | {res['summary']['steps']} | {100 * res['summary']['top1']:.2f} | "
                     f"{t if t is not None else 'not reached'} | {t90 if t90 is not None else 'not reached'} |")
    return lines


def report(runs: list[Run], doc: Path) -> None:
    done = [(r, res) for r in runs if (res := results_of(r))]
    missing = [r for r in runs if not results_of(r)]
    by_batch: dict[int, list] = {}  # the study recipe's LR searches (seed 0); variants get their own table
    for r, res in done:
        if not r.variant and r.seed == 0:
            by_batch.setdefault(r.batch, []).append((r, res))
    best = {b: max(v, key=lambda rv: rv[1]["summary"]["top1"]) for b, v in by_batch.items()}
    base = best.get(SMALL)
    lines = ["# Results: how large a batch Fashion-MNIST can take", "",
             "Generated by `python experiments/critical_batch.py --report` from the runs committed under "
             "`experiments/results/critical_batch/` (each with its `summary.json`, `metrics.jsonl`, "
             "`config.yaml`, `run.json` and exact command); no number here is edited by hand.", "",
             f"Study: ResNet-8 on Fashion-MNIST (60,000 training images, test set of 10,000), {EPOCHS} epochs "
             f"at every batch, cosine decay, warmup growing with the batch, zero-gamma off, bf16, one process "
             f"with 2 threads; the peak LR tuned per batch on a grid from the square-root to the linear rule "
             f"(see the script's docstring). Steps to target = the first evaluation (every quarter or half "
             f"epoch) at or above the target test top-1.", "",
             f"Progress: {len(done)} of {len(runs)} planned runs finished; the study continues where it "
             f"stopped (`python experiments/critical_batch.py`).", "",
             "## Every finished run", "",
             "| global batch | variant | seed | peak LR | warmup (epochs) | steps | test top-1 (%) | steps to 90 % | "
             "steps to 91 % | B_simple at 90 % | B_simple, last logged | CPU | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, res in sorted(done, key=lambda rv: (rv[0].variant, rv[0].batch, rv[0].lr, rv[0].seed)):
        s, ev = res["summary"], res["evals"]
        metrics = metrics_of(r)
        cpu = json.loads((RESULTS / r.name / "run.json").read_text()).get("cpu", "?")
        t90, t91 = steps_to(ev, TARGETS[0]), steps_to(ev, TARGETS[1])
        n90 = noise_at(metrics, t90) if t90 is not None else None
        top1 = "diverged" if s.get("diverged") else f"{100 * s['top1']:.2f}"
        fmt = lambda v, d=0: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r.batch} | {r.variant or '—'} | {r.seed} | {r.lr:g} | {warmup_epochs(r.batch):g} | {s['steps']} | {top1} | "
                     f"{fmt(t90)} | {fmt(t91)} | {fmt(n90)} | {fmt(noise_at(metrics, None))} | {cpu} | "
                     f"{s['wall_seconds']:.0f} |")
    lines += ["", "## Best LR per batch", ""]
    if base:
        b0 = base[1]["summary"]["top1"]
        fewest = fewest_steps(by_batch)
        lines += [f"Baseline: batch {SMALL}, LR {base[0].lr:g}: {100 * b0:.2f} %. Steps to 90 % are the fewest over "
                  f"the LRs tried at each batch (with that LR), as Shallue et al. tune for steps to target.", "",
                  "| global batch | ImageNet batch it maps to | best peak LR (seed 0) | test top-1 (%), seed 0 | "
                  "vs baseline (points) | mean over seeds at that LR (seeds) | mean vs baseline mean | "
                  "fewest steps to 90 % (LR) | perfect scaling from the baseline | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        t_base = fewest.get(SMALL, (None, None))[0]

        def over_seeds(run: Run) -> list[float]:
            return [res["summary"]["top1"] for q, res in done if replace(q, seed=0) == replace(run, seed=0)]
        m0 = statistics.fmean(over_seeds(base[0]))
        for b in sorted(best):
            r, res = best[b]
            t, lr_t = fewest[b]
            ideal = t_base * SMALL / b if t_base else None
            seeds = over_seeds(r)
            lines.append(f"| {b} | {round(b * IMAGENET / FMNIST):,} | {r.lr:g} | {100 * res['summary']['top1']:.2f} | "
                         f"{100 * (res['summary']['top1'] - b0):+.2f} | "
                         f"{100 * statistics.fmean(seeds):.2f} ({len(seeds)}) | "
                         f"{100 * (statistics.fmean(seeds) - m0):+.2f} | "
                         f"{f'{t} ({lr_t:g})' if t is not None else 'not reached'} | "
                         f"{f'{ideal:.0f}' if ideal else '—'} | {f'{t / ideal:.2f}' if t and ideal else '—'} |")
        lines += ["", f"## Accuracy at the {EPOCHS}-epoch budget: plain linear scaling against the best recipe tried", "",
                  f"Plain linear scaling: SGD at LR {SMALL_LR:g} x B / {SMALL} (Goyal et al.'s rule from the "
                  f"baseline's first LR), the study's warmup. Best recipe: the best seed-0 run at the batch over "
                  f"every LR and variant tried.", "",
                  "| global batch | linear rule LR | its test top-1 (%) | best recipe | its test top-1 (%) | "
                  "best vs baseline (points) |", "|---|---|---|---|---|---|"]
        for b in sorted(best):
            linear = Run(b, round(SMALL_LR * b / SMALL, 4))
            lin = results_of(linear)
            cands = [(r, res) for r, res in done if r.batch == b and r.seed == 0 and not r.variant.startswith("grow")]
            r, res = max(cands, key=lambda rv: rv[1]["summary"]["top1"])
            lin_top1 = f"{100 * lin['summary']['top1']:.2f}" if lin else "not run"
            lines.append(f"| {b} | {linear.lr:g} | {lin_top1} | "
                         f"{r.variant or 'SGD'}, LR {r.lr:g} | {100 * res['summary']['top1']:.2f} | "
                         f"{100 * (res['summary']['top1'] - b0):+.2f} |")
        knee = knee_fit(fewest)
        plot(best, by_batch, fewest, knee, doc.parent / "critical_batch.png")
        lines += ["", "![steps to target, accuracy and noise scale against the batch](critical_batch.png)"]
    else:
        knee = None
    lines += ["", "## The critical batch against the noise scale", "",
              "Per target: the fit of S(B) = S_min (1 + B_crit / B) to the fewest steps per batch (three "
              "batches needed), and B_simple as logged where the LR searches' runs first reach the target "
              "(median and range over those runs). The study's target: the median within 2x of B_crit.", "",
              "| target | batches in the fit | S_min (steps) | B_crit | B_simple at the target: median (range, runs) "
              "| B_crit / median B_simple |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        per = fewest_steps(by_batch, target)
        fit = knee_fit(per)
        noise = noise_at_target(by_batch, target)
        med = statistics.median(noise) if noise else None
        n_fit = sum(t is not None for t, _ in per.values())
        lines.append(f"| {100 * target:g} % | {n_fit} | {f'{fit[0]:.0f}' if fit else '—'} | "
                     f"{f'{fit[1]:.0f}' if fit else '—'} | "
                     f"{f'{med:.0f} ({min(noise):.0f}-{max(noise):.0f}, {len(noise)})' if noise else '—'} | "
                     f"{f'{fit[1] / med:.1f}' if fit and med else '—'} |")
    if base:
        lines += prediction_table(done, base[0])
        lines += control_table(done, base[0])
    variants = [(r, res) for r, res in done if r.variant]
    if variants:
        lines += ["", "## Recipe variants and batch-size control", "",
                  "| run | variant | first global batch | peak LR | steps | test top-1 (%) | steps to 90 % |",
                  "|---|---|---|---|---|---|---|"]
        for r, res in variants:
            t90 = steps_to(res["evals"], TARGETS[0])
            lines.append(f"| {r.name} | {r.variant} | {r.batch} | {r.lr:g} | {res['summary']['steps']} | "
                         f"{100 * res['summary']['top1']:.2f} | {t90 if t90 is not None else 'not reached'} |")
    lines += ["", "## Beside the paper and the records", "",
              "Mapped by batch / training-set size (ImageNet 1.28M images, Fashion-MNIST 60K): "
              "ImageNet 14,336 is 672 here, 32K is 1,536, 64K is 3,072.", "",
              "| run | ImageNet batch | top-1 (%) | note | our batch at the same fraction |", "|---|---|---|---|---|"]
    for what, batch, top1, note in PAPER:
        lines.append(f"| {what} | {batch:,} | {top1} | {note} | {round(batch * FMNIST / IMAGENET):,} |")
    lines += ["", "## Still to run", ""]
    lines += [f"- {r.name}" for r in missing] or ["(none)"]
    lines += ["", "READING", ""]
    reading = ROOT / "experiments/critical_batch_reading.md"
    text = "\n".join(lines).replace("READING", reading.read_text().strip() if reading.exists() else "")
    doc.write_text(text + "\n")
    print(f"wrote {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--max-runs", type=int, default=0)
    p.add_argument("--save-partial", action="store_true",
                   help="copy unfinished runs' newest checkpoints under results/partial (before a machine goes away)")
    a = p.parse_args()
    runs = plan()
    if a.save_partial:
        save_partials([r.name for r in runs if results_of(r) is None], RUNS, PARTIAL)
        return
    if a.list:
        for r in runs:
            res = results_of(r)
            print(f"{r.name:40} {'done: top-1 %.4f' % res['summary']['top1'] if res else 'missing'}")
        return
    if not a.report:
        done = 0
        while (not a.max_runs or done < a.max_runs) and not STOP.exists():
            todo = next((r for r in plan() if results_of(r) is None), None)
            if todo is None:
                break
            run_one(todo)
            done += 1
            report(plan(), ROOT / "docs/RESULTS.md")
    report(plan(), ROOT / "docs/RESULTS.md")


if __name__ == "__main__":
    main()
