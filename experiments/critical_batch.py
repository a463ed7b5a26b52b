"""The critical-batch study on Fashion-MNIST, after Shallue et al. (2019): for each global
batch, the LR is tuned on a small grid; every run trains a fixed epoch budget and is
evaluated every quarter or half epoch, so one run gives both the accuracy at the budget and the
first step at which test top-1 reaches a target (steps to target).

Runs go through the public CLI (one process, 2 threads) into runs/critical_batch/NAME.
A finished run's summary.json and metrics.jsonl are copied to
experiments/results/critical_batch/NAME/, which is committed: a run whose results are
there is never trained again, so the study continues across machines.

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
p in {0.75, 1} (a batch started later: at the best p of the nearest of the first
searches, and the quarter below) and growing by quarters toward the better edge, p
from 0 to 1.75 (at batch 128, each quarter doubles the LR from 0.1 at p = 0.75). A run that
diverges is kept as a result (0 %, with the reason) and the search moves away from it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace

from common import ROOT, Diverged, keep_results, save_partials, train

RESULTS = ROOT / "experiments/results/critical_batch"
RUNS = ROOT / "runs/critical_batch"
EPOCHS = 12
LONG = 30  # the study's largest budget, for the batches that underfit in 12 epochs
SMALL, SMALL_LR = 128, 0.1


def eval_every(batch: int, epochs: float = EPOCHS) -> float:
    """In epochs: every half epoch (234 steps) at the small batches, every quarter from
    1,024 up, where an epoch is a few dozen steps and steps to target needs the resolution;
    every epoch at the long budget, whose runs are read for their final accuracy only."""
    if epochs != EPOCHS:
        return 1.0
    return 0.5 if batch < 1024 else 0.25


def warmup_epochs(batch: int) -> float:
    """Grows with log2(batch / 128): none at 128, 2.4 epochs (a fifth of the 12-epoch budget)
    at 16,384; the same epochs at the long budget (warmup is for the first steps' instability,
    not a share of the run)."""
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

    @property
    def warmup(self) -> float:
        return warmup_epochs(self.batch) * WARMUP_SCALE.get(self.variant, 1)

    def cli(self) -> list[str]:
        # Bounded memory, and at least two micro-batches so that every run measures the
        # gradient noise scale: the largest multiple of 32 up to min(batch / 2, 1,024) that
        # divides the batch (BN groups of 32 samples make the training the same for any
        # micro-batch).
        micro = max(m for m in range(32, min(self.batch // 2, 1024) + 1, 32) if self.batch % m == 0)
        args = ["--recipe", "fmnist-baseline", "--global-batch", str(self.batch), "--micro-batch", str(micro),
                "--epochs", f"{self.epochs:g}",
                "--set", f"schedule.peak_lr={self.lr:.6g}",
                "--set", f"schedule.warmup_epochs={self.warmup:g}",
                "--set", "schedule.warmup_start=0.0",
                "--set", "schedule.decay=cosine",
                "--set", "model.zero_init_gamma=none",
                "--set", f"train.seed={self.seed}",
                "--set", f"train.eval_every_epochs={eval_every(self.batch, self.epochs)}",
                "--set", "train.eval_batch=2000",
                "--set", "train.log_every_steps=5"]
        return args + VARIANTS[self.variant]


LARS = ["--set", "optim.name=lars", "--set", "optim.lars_trust=0.02"]
VARIANTS = {
    "": [],
    "zerogamma": ["--set", "model.zero_init_gamma=all"],
    "lars": LARS,
    "lamb": ["--set", "optim.name=lamb"],
    "ls": ["--set", "optim.label_smoothing=0.1"],
    "nesterov": ["--set", "optim.nesterov=true"],
    # Twice the recipe's weight decay: at 1,536 and its best LR, 12 epochs give the weights
    # half the baseline's total decay (lr * wd * steps: 2.23 * 468 against 0.4 * 5,616),
    # and with BN the decay sets the weights' norm, hence the effective step size.
    "wd2x": ["--set", "optim.weight_decay=0.001"],
    "wdhalf": ["--set", "optim.weight_decay=0.00025"],  # and half, since twice cost a point
    # Linear decay to zero in place of cosine: more of a short budget at a high LR
    "linear": ["--set", "schedule.decay=linear"],
    "warm2x": [],  # twice the study's warmup (WARMUP_SCALE), for an LR above the linear rule's
    "lars-warm2x": LARS,  # and twice the warmup (WARMUP_SCALE)
    # Batch-size control (Smith et al. 2018): from 768, the batch doubles every 4 epochs at a
    # constant LR, the doubling standing in for the decay; the last phase decays to zero.
    "grow3072": ["--set", "phases=[{name: b768, epochs: 4, decay: constant, warmup_epochs: 0.93, snapshot: false}, "
                          "{name: b1536, epochs: 4, decay: constant, global_batch: 1536, scale_lr: false, "
                          "snapshot: false}, {name: b3072, epochs: 4, decay: cosine, global_batch: 3072, "
                          "scale_lr: false, snapshot: false}]"],
    # Adaptive batch-size control: from the batch named, the batch doubles at each epoch
    # while it stays within the noise scale measured over the epoch, up to 4,096; the LR
    # follows by the recipe's square-root rule, the cosine runs on over epochs.
    "adaptive": ["--set", "adaptive_batch.max_batch=4096"],
    # the same, growing while the doubled batch is at most 4 x the noise scale: fewer steps
    "adaptive4": ["--set", "adaptive_batch.max_batch=4096", "--set", "adaptive_batch.noise_multiple=4"],
}
CONTROLS = ("grow3072", "adaptive", "adaptive4")  # variants whose batch changes during the run


# LAMB's LR is the fraction of its weights a layer moves per step, as LARS's LR times its
# trust coefficient is: its grid is LARS's times 0.02, so both search the same steps.
LR_SCALE = {"lamb": 0.02}
WARMUP_SCALE = {"warm2x": 2, "lars-warm2x": 2}  # variants whose warmup is a multiple of the study's


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


# The ceiling was 1.5 until the 30-epoch baseline did best there (LR 0.8): one quarter more
# brackets it, and 256's and 512's 12-epoch searches, which also ended at 1.5. The floor
# was 0.25 until 16,384 (44 steps) did best there: p = 0 is LR 0.1 at any batch. 672 at
# 30 epochs did best at 1.75 (LR 1.82, two seeds): one quarter more, 2.0, brackets it.
P_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


# The searches that started at p = 0.75 and 1, before first_points: their best lay one or
# two quarters higher, costing a run or two each to walk there.
FIRST_SEARCHES = {"": (SMALL, 672, 1536, 3072), "lars": (3072,), "grow3072": (768,)}


# Searches started by hand where the others' best steps said where to look: LAMB at
# 1,536 from LARS's best p there (1) and SGD's (1.25); Nesterov from SGD's.
STARTS = {(1536, "lamb"): (1.0, 1.25), (1536, "nesterov"): (1.25,)}


def p_of(run: Run) -> float:
    return next(p for p in P_GRID if lr_at(run.batch, p, run.variant) == run.lr)


def first_points(batch: int, variant: str, epochs: float = EPOCHS) -> list[float]:
    """Where a batch's search starts: the first searches at p = 0.75 and 1; every later
    one at the best p of the nearest of those (in log2, other than the baseline, whose p
    counts doublings) and the quarter below it (larger batches want smaller exponents).
    Read only from the first searches, which are finished, so a search's start never moves.
    At the long budget: the same batch's best p at 12 epochs and the quarter below (a
    longer run wants a lower LR, if any)."""
    if epochs != EPOCHS:
        best = best_run(batch, variant)
    elif (batch, variant) in STARTS:
        return list(STARTS[batch, variant])
    else:
        firsts = [b for b in FIRST_SEARCHES.get(variant, ()) if b != SMALL]
        if batch in FIRST_SEARCHES.get(variant, ()) or not firsts:
            return [0.75, 1.0]
        best = best_run(min(firsts, key=lambda b: (abs(math.log2(b / batch)), b)), variant)
    if best is None:
        return [0.75, 1.0]
    p = p_of(best)
    return [q for q in (p - 0.25, p) if q >= P_GRID[0]]


def tuned(batch: int, seed: int = 0, variant: str = "", epochs: float = EPOCHS) -> list[Run]:
    """The LR search for one batch (and variant), grown from what has finished: two first
    points (first_points), then one more quarter in the better direction while the best
    is at an edge of what has been tried (p within P_GRID). Seeds other than 0 rerun
    the best LR of seed 0."""
    if seed:
        best = best_run(batch, variant, epochs)
        return [replace(best, seed=seed)] if best else []
    run_at = lambda p: Run(batch, lr_at(batch, p, variant), variant=variant, epochs=epochs)  # noqa: E731
    ps = first_points(batch, variant, epochs) + [p for p in P_GRID if results_of(run_at(p))]
    while True:
        ps = sorted(set(ps))
        top1 = {p: res["summary"]["top1"] for p in ps if (res := results_of(run_at(p)))}
        if len(top1) < len(ps):
            break  # a run of the grid is still to do
        best = max(top1, key=top1.get)
        step = -0.25 if best == ps[0] else 0.25 if best == ps[-1] else 0
        if not step or not P_GRID[0] <= best + step <= P_GRID[-1]:
            break
        ps.append(best + step)
    return [run_at(p) for p in sorted(set(ps))]


def best_run(batch: int, variant: str = "", epochs: float = EPOCHS) -> Run | None:
    """The best finished seed-0 run of a batch's LR search."""
    done = [(r, res) for r in tuned(batch, variant=variant, epochs=epochs) if (res := results_of(r))]
    return max(done, key=lambda rv: rv[1]["summary"]["top1"])[0] if done else None


def plan() -> list[Run]:
    """In priority order, re-read after every run (the LR searches grow from the results):
    the baseline, the batches that map to the paper's and the records' batches (14K, 32K,
    64K on ImageNet = 672, 1,536, 3,072 here), the baseline's own LR search, LARS at 3,072,
    the second seeds the targets need, batch-size control (a target of its own), 1,024
    (the fmnist-large recipe's batch), LARS at 1,536, the adaptive batch control and
    1,024's second seed, the powers of two that test the knee's fits, the adaptive
    control's second seed and its start from 256, the other powers of two, LARS's second
    seed, then the other recipe variants."""
    runs = [Run(SMALL, SMALL_LR)]
    for b in (3072, 1536, 672, SMALL):
        runs += tuned(b)
    runs += tuned(3072, variant="lars")
    for b in (SMALL, 672, 1536):
        runs += tuned(b, seed=1)
    runs += tuned(768, variant="grow3072")  # searched like a batch of its own, from its first batch
    runs += tuned(768, seed=1, variant="grow3072")  # it came within 0.1 point of the baseline
    runs += tuned(1024)
    # SGD is 0.68 point short at 1,536 over two seeds; the 32K records used LARS, which at
    # 3,072 gained 2.6 points over SGD's best
    runs += tuned(1536, variant="lars")
    # The adaptive control from the baseline's batch and LR: does the batch the noise
    # scale asks for keep the baseline's accuracy in fewer steps than a fixed schedule?
    runs += [Run(SMALL, 0.4, variant="adaptive")]
    # It kept the accuracy in 0.38x the baseline's steps, but spent 5 of its 12 epochs at
    # 128-512 (B_simple is 100-700 there): 4 x B_simple trades samples for steps
    runs += [Run(SMALL, 0.4, variant="adaptive4")]
    runs += tuned(1024, seed=1)  # 0.16 below the baseline on one seed: within a point, so two seeds
    for b in (2048, 4096):
        runs += tuned(b)
    # At 4 x the noise scale the control kept the accuracy on one seed, 0.27 short: a second
    # seed; and half of its steps were its first epoch at 128, before the first measurement,
    # so the same control from 256 (the square-root rule's LR for it)
    runs += [Run(SMALL, 0.4, seed=1, variant="adaptive4"), Run(256, 0.5657, variant="adaptive4")]
    # The 32K-equivalent target is 0.68 short over two seeds with SGD and LARS alike, and
    # 1,536 ends with a training loss 1.5x the baseline's (0.15 against 0.10): its 468 steps
    # underfit. The recipe's other knobs at 1,536, one at a time, before the knee batches,
    # whose fits already stand: weight decay at SGD's best LR (seed 0: 92.67 %; twice the
    # decay cost a point, so half of it next); LAMB,
    # whose per-weight preconditioning is what lifts the critical batch above SGD's in
    # Zhang et al. 2019, from LARS's best step (p = 1) and SGD's (1.25); then Nesterov,
    # linear decay, a longer warmup and label smoothing at SGD's best LR.
    runs += [Run(1536, lr_at(1536, 1.25), variant="wd2x")]
    runs += [Run(1536, lr_at(1536, 1.0, "lamb"), variant="lamb")]
    runs += [Run(1536, lr_at(1536, 1.25), variant="wdhalf")]
    runs += tuned(1536, variant="lamb")  # grown past p = 1.25 while its best is at the edge
    runs += [Run(1536, lr_at(1536, 1.25), variant=v) for v in ("nesterov", "linear")]
    # Nesterov gained 0.13 point on seed 0 (92.80 %) with a lower training loss: its second
    # seed (SGD's seed 1 ended 0.36 below seed 0), the other knobs, then its LR search
    runs += [Run(1536, lr_at(1536, 1.25), seed=1, variant="nesterov")]
    runs += [Run(1536, lr_at(1536, 1.25), variant=v) for v in ("warm2x", "ls")]
    runs += tuned(1536, variant="nesterov")
    # From 1,536 up every knob tried still underfits: 12 epochs give 1,536 468 steps, where
    # the 32K ImageNet records took about 3,500 (90 epochs). The targets again at the
    # largest budget the study allows, 30 epochs, each LR searched again from its 12-epoch
    # best: the baseline first, as every comparison needs it, then LARS at 3,072 and 1,536,
    # their second seeds, Nesterov at 1,536 (the best 12-epoch recipe there, but at 30
    # epochs it overfits at LR 1.2, 92.31 %, and is unstable at 2.23, 92.39 %), 672 last
    # (met at 12).
    long = [(SMALL, ""), (3072, "lars"), (1536, "lars")]
    runs += [r for b, v in long for r in tuned(b, variant=v, epochs=LONG)]
    runs += [r for b, v in long for r in tuned(b, seed=1, variant=v, epochs=LONG)]
    # LARS kept the accuracy at 1,536 (+0.13) and came to 0.50 point of it at 3,072, whose
    # linear-rule LR 2.4 lost 0.3 point to its instability after warmup (1.08 did best):
    # 3,072 again with twice the warmup (3.3 epochs), searched from 2.4 and the quarter
    # below (2.4 and its second seed ran first: 92.91 and 93.00 %), grown as every other
    # search is, and a second seed wherever its best moves.
    runs += tuned(3072, variant="lars-warm2x", epochs=LONG)
    runs += tuned(3072, seed=1, variant="lars-warm2x", epochs=LONG)
    # Second seeds where one seed sits within a point of the baseline: 512 (0.36 above it),
    # 256 and 2,048 (0.79 below); short runs, ahead of the 30-epoch searches the targets
    # no longer wait on. 512's and 256's searches ended at the old ceiling: the quarter
    # above it first, so the second seed reruns the bracketed best.
    for b in (512, 256, 2048):
        runs += tuned(b) + tuned(b, seed=1)
    # The top of the study's range (128 ... 16,384): 8,192 and 16,384, 88 and 44 steps at
    # 12 epochs, where the knee's fit to 91 % says no LR reaches the targets
    for b in (8192, 16384):
        runs += tuned(b)
    runs += tuned(1536, variant="nesterov", epochs=LONG) + tuned(1536, seed=1, variant="nesterov", epochs=LONG)
    runs += tuned(672, epochs=LONG) + tuned(672, seed=1, epochs=LONG)
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
PARTIAL = RESULTS / "partial"  # an unfinished run's newest checkpoint, committed before the machine goes away


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--max-runs", type=int, default=0)
    p.add_argument("--save-partial", action="store_true",
                   help="copy unfinished runs' newest checkpoints under results/partial (before a machine goes away)")
    a = p.parse_args()
    from critical_batch_report import report  # it reads this module's plan and results
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
