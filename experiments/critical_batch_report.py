"""The critical-batch study's report (docs/RESULTS.md and docs/critical_batch.png), read
from the committed results only: every finished run, the best LR per batch, plain linear
scaling against the best recipe, the knee fitted to the steps to each target beside the
noise scale where the runs reach it, what `largebatch plan` predicts, batch-size control
against fixed batches, and the published numbers mapped by batch / training-set size.

    python experiments/critical_batch.py --report
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from common import ROOT
from largebatch.noise_scale import NoiseScale
from critical_batch import CONTROLS, EPOCHS, LONG, RESULTS, SMALL, SMALL_LR, Run, best_run, lr_at, results_of

TARGETS = (0.90, 0.91)
ACCURACY_FLOOR = 86.0  # the accuracy plot's lower edge (%); runs below it are marked on it
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


def final_train_loss(lines: list[dict]) -> float | None:
    """Mean training loss logged over the last 5 % of the steps: how far the run fitted
    the training set, set beside its test accuracy (underfitting or overfitting)."""
    logged = [x for x in lines if "loss" in x and not x.get("eval")]
    if not logged:
        return None
    end = max(x["step"] for x in logged)
    tail = [x["loss"] for x in logged if x["step"] > 0.95 * end]
    return statistics.fmean(tail)


def over_seeds(done: list, run: Run) -> list[float]:
    """Test top-1 of every finished seed of `run`'s setting (batch, LR, variant)."""
    same = replace(run, seed=0).name  # by name: the script's plan and this module's Run are two classes
    return [res["summary"]["top1"] for q, res in done if replace(q, seed=0).name == same]


def every_recipe(done: list) -> dict[int, list]:
    """Per fixed batch, its seed-0 runs over every LR and variant tried (batch-size
    control, whose batch is not fixed, left out)."""
    out: dict[int, list] = {}
    for r, res in done:
        if r.seed == 0 and r.variant not in CONTROLS:
            out.setdefault(r.batch, []).append((r, res))
    return out


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


def late_noise(run: Run, decay: float = NoiseScale().decay) -> float | None:
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


def plot(best: dict, by_batch: dict, fewest: dict, knee, path: Path, recipes: dict, long: list) -> None:
    """Steps to target against the batch, accuracy at a fixed budget (the SGD grid, the
    linear rule, the best recipe tried; at the long budget `long`, (batch, best mean over
    seeds in %) pairs), and the noise scale through the best runs."""
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
    a2.plot(xs, [100 * best[b][1]["summary"]["top1"] for b in xs], marker="o", label="SGD, best LR of the grid")
    linear = [(b, 100 * res["summary"]["top1"]) for b in xs for r, res in by_batch[b]
              if r.lr == lr_at(b, 1.0) and not r.variant]
    if linear:
        a2.plot(*zip(*linear), marker="s", linestyle="--", label="linear rule")
    any_recipe = [(b, 100 * max(res["summary"]["top1"] for _, res in recipes[b])) for b in sorted(recipes)]
    a2.plot(*zip(*any_recipe), marker="^", linestyle="-.", label="best recipe tried (LARS, Nesterov, ...)")
    if long:
        a2.plot(*zip(*long), marker="D", label=f"{LONG} epochs: best mean over seeds")
    # The batches far past the knee fall by tens of points: drawn on the floor with their
    # value, so that the tenths that separate the others stay readable.
    floor = ACCURACY_FLOOR
    for b, top1 in any_recipe:
        if top1 < floor:
            a2.annotate(f"{top1:.1f} %", (b, floor), xytext=(0, 8), textcoords="offset points", ha="center",
                        fontsize=7, arrowprops={"arrowstyle": "->"})
    top = max(v for _, v in any_recipe + long)
    a2.set(xscale="log", xlabel="global batch", ylabel="test top-1 (%)", ylim=(floor, top + 0.5),
           title=f"accuracy at {EPOCHS} epochs (and {LONG})")
    colours = matplotlib.colormaps["viridis"]
    for i, (b, (r, res)) in enumerate(sorted(best.items())):
        ns = [(x["epoch"], x["noise_scale"]) for x in metrics_of(r) if x.get("noise_scale")]
        if ns:
            a3.plot(*zip(*ns), label=f"batch {b}", color=colours(i / max(1, len(best) - 1)), linewidth=1)
    a3.set(yscale="log", xlabel="epoch", ylabel="B_simple (negative estimates not shown)",
           title="measured gradient noise scale")
    for a in (a1, a2):
        a.set_xticks(sorted(by_batch), labels=[str(b) for b in sorted(by_batch)], minor=False, rotation=45)
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="lower left" if a is a2 else "best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prediction_table(done: list, base: Run) -> list[str]:
    """What `largebatch plan --noise-scale` would have told a user from the baseline's
    runs, against the epochs the study's runs took to each target (the fewest over every
    LR and recipe tried at the batch, seed 0)."""
    seeds = [(r, res) for r, res in done if replace(r, seed=0) == base]
    means = [res["summary"]["noise_scale"] for _, res in seeds]
    lates = [v for r, _ in seeds if (v := late_noise(r)) is not None]
    if not means or not lates:
        return []
    mean, late = statistics.fmean(means), statistics.fmean(lates)
    fewest = {target: fewest_steps(every_recipe(done), target) for target in TARGETS}
    lines = ["", "## What the tool predicts", "",
             f"`largebatch plan --noise-scale RUN` turns a run's noise scale into epochs per batch, E(B) = E_min "
             f"(1 + B / B_noise). From the baseline's runs (batch {SMALL}, LR {base.lr:g}, {len(seeds)} seeds): "
             f"B_simple over the whole run {mean:.0f}, over its second half {late:.0f} (what `plan` reads). "
             f"Epochs to the target at each batch over the baseline's, predicted and as the runs took them "
             f"(the fewest over every LR and recipe tried, seed 0).", "",
             "| global batch | predicted from the run mean | predicted from the second half | "
             + " | ".join(f"runs, to {100 * t:g} %" for t in TARGETS) + " |",
             "|---|---|---|" + "---|" * len(TARGETS)]
    for b in sorted(set(fewest[TARGETS[0]]) - {SMALL}):
        took = []
        for target in TARGETS:
            t, t0 = fewest[target][b][0], fewest[target].get(SMALL, (None,))[0]
            took.append(f"{t * b / (t0 * SMALL):.2f}" if t and t0 else "not reached")
        lines.append(f"| {b} | {predicted_ratio(b, mean):.2f} | {predicted_ratio(b, late):.2f} | " + " | ".join(took) + " |")
    return lines


def control_table(done: list, base: Run) -> list[str]:
    """Batch-size control against fixed batches at the same epochs: the first step at
    which each reaches the baseline's accuracy (its mean over seeds, less the study's 0.3
    point), for the control runs and, per fixed batch, the run that reaches it first (else
    the best-ending run), over every LR and recipe tried (seed 0), as Shallue et al. tune
    for steps to target."""
    grown = [(r, res) for r, res in done if r.variant in CONTROLS]
    if not grown:
        return []
    target = statistics.fmean(over_seeds(done, base)) - 0.003
    rank = lambda rv: (steps_to(rv[1]["evals"], target) or math.inf, -rv[1]["summary"]["top1"])  # noqa: E731
    fixed = {b: min(runs, key=rank) for b, runs in every_recipe(done).items()}
    rows = sorted(grown, key=lambda rv: (rv[0].variant, rv[0].lr)) + [fixed[b] for b in sorted(fixed)]
    lines = ["", "## Batch-size control against fixed batches", "",
             f"Same {EPOCHS} epochs. Target: the baseline's mean over seeds less 0.3 point ({100 * target:.2f} %). "
             f"Control runs: `grow3072` starts at batch 768 and doubles the batch every 4 epochs at a constant "
             f"LR, the last phase decaying to zero; `adaptive` starts at the baseline's batch and LR and doubles "
             f"the batch at each epoch while it stays within the noise scale measured over that epoch (up to "
             f"4,096), the LR following by the square-root rule and the cosine running on (`adaptive4`: within "
             f"4 times the noise scale; `b256-...-adaptive4` the same from batch 256 at the square-root rule's LR); "
             f"fixed batches: per batch, "
             f"the run that reaches the target first (else the best-ending run) over every LR and recipe tried "
             f"(seed 0).", "",
             "| run | global batches | steps | test top-1 (%) | mean over its seeds (seeds) | "
             "first step at the target | steps to 90 % |", "|---|---|---|---|---|---|---|"]
    for r, res in rows:
        t, t90 = steps_to(res["evals"], target), steps_to(res["evals"], TARGETS[0])
        seeds = over_seeds(done, r)
        batches = " → ".join(f"{b:,}" for b in res["summary"].get("global_batches", [r.batch]))
        lines.append(f"| {r.name} | {batches} | {res['summary']['steps']} | {100 * res['summary']['top1']:.2f} | "
                     f"{100 * statistics.fmean(seeds):.2f} ({len(seeds)}) | "
                     f"{t if t is not None else 'not reached'} | {t90 if t90 is not None else 'not reached'} |")
    return lines


def long_table(done: list, long: list) -> list[str]:
    """The long budget: per setting (batch, LR, variant), the mean over seeds against the
    baseline's mean at the same budget, beside the same setting's mean at 12 epochs, with
    the training loss that says how far each fitted."""
    if not long:
        return []
    settings = list(dict.fromkeys(replace(r, seed=0) for r, _ in long))
    base = best_run(SMALL, epochs=LONG)
    m_base = statistics.fmean(over_seeds(long, base)) if base else None
    lines = ["", f"## A longer budget: {LONG} epochs", "",
             f"The same recipes at {LONG} epochs, the largest budget the study allows: the baseline and, per "
             f"target batch, the best recipe of its {EPOCHS}-epoch search, the warmup in epochs as at "
             f"{EPOCHS}, cosine decay over the whole budget, evaluated every epoch. The LR searched again "
             f"from the {EPOCHS}-epoch best and the quarter below on the same grid, growing toward the better "
             f"edge; the second seed at the best LR of the first. Baseline: the best {SMALL} run at "
             f"{LONG} epochs (seed 0), its mean over seeds.", "",
             "| global batch | variant | peak LR | steps | test top-1 per seed (%) | mean (seeds) | "
             f"vs baseline mean at {LONG} epochs | mean at {EPOCHS} epochs, same setting | "
             "training loss, last 5 % of steps (per seed) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(settings, key=lambda r: r.batch):
        seeds = [(r, res) for r, res in long if replace(r, seed=0) == s]
        top1 = [res["summary"]["top1"] for _, res in seeds]
        short = over_seeds(done, replace(s, epochs=EPOCHS))
        vs = f"{100 * (statistics.fmean(top1) - m_base):+.2f}" if m_base is not None else "—"
        losses = ", ".join(f"{v:.3f}" for r, _ in seeds if (v := final_train_loss(metrics_of(r))) is not None)
        lines.append(f"| {s.batch} | {s.variant or '—'} | {s.lr:g} | {seeds[0][1]['summary']['steps']} | "
                     f"{', '.join(f'{100 * v:.2f}' for v in top1)} | {100 * statistics.fmean(top1):.2f} ({len(top1)}) | "
                     f"{vs} | {f'{100 * statistics.fmean(short):.2f} ({len(short)})' if short else '—'} | {losses} |")
    return lines


TARGET_BATCHES = (672, 1536, 3072)  # ImageNet's 14K, 32K and 64K by the fraction of the training set
WITHIN = 0.003  # the study's target: within 0.3 point of the baseline, mean of two seeds


def mean_of_best(finished: list, batch: int, epochs: float) -> tuple[Run, list[float]] | None:
    """A fixed batch's best setting at a budget: the highest mean over seeds among the
    settings run with two seeds or more, or else the best single run."""
    budget = [(r, res) for r, res in finished if r.epochs == epochs]
    settings = [(r, over_seeds(budget, r)) for r, _ in every_recipe(budget).get(batch, [])]
    pool = [s for s in settings if len(s[1]) >= 2] or settings
    return max(pool, key=lambda s: statistics.fmean(s[1])) if pool else None


def targets_table(finished: list) -> list[str]:
    """The study's accuracy targets at a glance: per target batch and budget, the best
    setting's mean over seeds against the baseline's at the same budget."""
    lines = ["", "## The targets", "",
             f"Per target batch and epoch budget: the setting with the highest mean test top-1 over two or more "
             f"seeds (the best single run where none has two), against the batch-{SMALL} baseline's best setting "
             f"at the same budget. Met: the mean over two seeds or more within {100 * WITHIN:g} point of the "
             f"baseline's, or above it.", "",
             "| global batch | ImageNet batch it maps to | epochs | setting | test top-1 per seed (%) | mean | "
             "baseline mean (its LR) | difference (points) | met |", "|---|---|---|---|---|---|---|---|---|"]
    for epochs in (EPOCHS, LONG):
        base = mean_of_best(finished, SMALL, epochs)
        if base is None:
            continue
        m0 = statistics.fmean(base[1])
        for b in TARGET_BATCHES:
            best = mean_of_best(finished, b, epochs)
            if best is None:
                lines.append(f"| {b} | {round(b * IMAGENET / FMNIST):,} | {epochs:g} | not run | | | | | |")
                continue
            r, top1 = best
            diff = statistics.fmean(top1) - m0
            met = "yes" if len(top1) >= 2 and diff >= -WITHIN else "not yet (one seed)" if diff >= -WITHIN else "no"
            lines.append(f"| {b} | {round(b * IMAGENET / FMNIST):,} | {epochs:g} | {r.variant or 'SGD'}, LR {r.lr:g} | "
                         f"{', '.join(f'{100 * v:.2f}' for v in top1)} | {100 * statistics.fmean(top1):.2f} | "
                         f"{100 * m0:.2f} ({base[0].lr:g}) | {100 * diff:+.2f} | {met} |")
    return lines


def report(runs: list[Run], doc: Path) -> None:
    finished = [(r, res) for r in runs if (res := results_of(r))]
    # Everything but the long-budget section compares runs of the study's own budget.
    done = [(r, res) for r, res in finished if r.epochs == EPOCHS]
    long = [(r, res) for r, res in finished if r.epochs != EPOCHS]
    have = {r for r, _ in finished}
    missing = [r for r in runs if r not in have]
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
             f"at every batch ({LONG} for the target batches' best recipes, in their own section), cosine "
             f"decay, warmup growing with the batch, zero-gamma off, bf16, one process "
             f"with 2 threads; the peak LR tuned per batch on a grid from the square-root to the linear rule "
             f"(see the script's docstring). Steps to target = the first evaluation (every quarter or half "
             f"epoch) at or above the target test top-1.", "",
             f"Progress: {len(finished)} of {len(runs)} planned runs finished; the study continues where it "
             f"stopped (`python experiments/critical_batch.py`).", "",
             "## In short", "", "SUMMARY", ""]
    lines += targets_table(finished)
    lines += ["", "## Every finished run", "",
             "| global batch | variant | epochs | seed | peak LR | warmup (epochs) | steps | test top-1 (%) | "
             "steps to 90 % | steps to 91 % | training loss, last 5 % of steps | B_simple at 90 % | "
             "B_simple, last logged | CPU | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, res in sorted(finished, key=lambda rv: (rv[0].variant, rv[0].epochs, rv[0].batch, rv[0].lr, rv[0].seed)):
        s, ev = res["summary"], res["evals"]
        metrics = metrics_of(r)
        cpu = json.loads((RESULTS / r.name / "run.json").read_text()).get("cpu", "?")
        t90, t91 = steps_to(ev, TARGETS[0]), steps_to(ev, TARGETS[1])
        n90 = noise_at(metrics, t90) if t90 is not None else None
        top1 = "diverged" if s.get("diverged") else f"{100 * s['top1']:.2f}"
        fmt = lambda v, d=0: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r.batch} | {r.variant or '—'} | {r.epochs:g} | {r.seed} | {r.lr:g} | {r.warmup:g} | {s['steps']} | {top1} | "
                     f"{fmt(t90)} | {fmt(t91)} | {fmt(final_train_loss(metrics), 3)} | {fmt(n90)} | "
                     f"{fmt(noise_at(metrics, None))} | {cpu} | "
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
        m0 = statistics.fmean(over_seeds(done, base[0]))
        for b in sorted(best):
            r, res = best[b]
            t, lr_t = fewest[b]
            ideal = t_base * SMALL / b if t_base else None
            seeds = over_seeds(done, r)
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
        recipes = every_recipe(done)
        for b in sorted(best):
            linear = Run(b, round(SMALL_LR * b / SMALL, 4))
            lin = results_of(linear)
            r, res = max(recipes[b], key=lambda rv: rv[1]["summary"]["top1"])
            lin_top1 = f"{100 * lin['summary']['top1']:.2f}" if lin else "not run"
            lines.append(f"| {b} | {linear.lr:g} | {lin_top1} | "
                         f"{r.variant or 'SGD'}, LR {r.lr:g} | {100 * res['summary']['top1']:.2f} | "
                         f"{100 * (res['summary']['top1'] - b0):+.2f} |")
        knee = knee_fit(fewest)
        at_long = sorted({r.batch for r, _ in long if r.variant not in CONTROLS})
        plot(best, by_batch, fewest, knee, doc.parent / "critical_batch.png", recipes,
             [(b, 100 * statistics.fmean(mean_of_best(long, b, LONG)[1])) for b in at_long])
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
    lines += long_table(done, long)
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
    # The hand-written reading: its summary for a user first, the rest after the tables.
    summary, reading = (ROOT / f"experiments/critical_batch_{part}.md" for part in ("summary", "reading"))
    text = "\n".join(lines)
    for mark, part in (("SUMMARY", summary), ("READING", reading)):
        text = text.replace(mark, part.read_text().strip() if part.exists() else "")
    doc.write_text(text + "\n")
    print(f"wrote {doc}")
