"""Helpers shared by the experiment scripts: run the public CLI, skip finished runs,
read results back, and format mean ± spread."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


DIVERGED_EXIT = 3  # largebatch's exit code for a run whose loss or weights became non-finite


class Diverged(Exception):
    """A run stopped because it diverged: a result for an LR search, not a failure."""


def largebatch(*args, threads: int = 2, nproc: int = 1, log: Path | None = None) -> None:
    """Run `largebatch ARGS`; under torchrun when nproc > 1. Output goes to `log`."""
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd += ["largebatch", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log or os.devnull, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode == DIVERGED_EXIT:
        raise Diverged((log.read_text().strip().splitlines() or ["diverged"])[-1] if log else "diverged")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}" + (f"\nsee {log}" if log else ""))


def train(out: Path, args: list[str], partial: Path | None = None, **kw) -> dict:
    """Train into `out` unless it already holds a finished run; return its summary.
    An unfinished run (killed study) is resumed from its checkpoints, or, when `out` is
    missing, from the copy `save_partial` kept in `partial` (dropped once the run ends)."""
    summary = out / "summary.json"
    if not summary.exists():
        if partial is not None and not out.exists() and partial.exists():
            shutil.copytree(partial, out)
        t0 = time.time()
        print(f"  train {out.name}: {' '.join(args)}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        largebatch("train", *args, "--out", out, "--resume", log=out.parent / f"{out.name}.log", **kw)
        print(f"    done in {time.time() - t0:.0f} s", flush=True)
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return json.loads(summary.read_text())


KEPT = ("summary.json", "metrics.jsonl", "config.yaml", "run.json")


def keep_results(out: Path, dest: Path) -> None:
    """Copy a finished run's small files (what a study commits) from `out` to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in KEPT:
        shutil.copy(out / f, dest / f)


def save_partial(out: Path, dest: Path) -> bool:
    """Keep an unfinished run's state in the repository: its small files, its newest
    checkpoint and its ensemble snapshots (each under a megabyte for ResNet-8), so that
    the next machine resumes it instead of starting over (`train(..., partial=dest)`)."""
    from largebatch import checkpoint
    newest = checkpoint.step_files(out / "checkpoints")[-1:]
    if not newest:
        return False
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "checkpoints").mkdir(parents=True)
    for f in KEPT:
        if (out / f).exists():  # no summary.json yet
            shutil.copy(out / f, dest / f)
    for f in (newest[0], newest[0].with_name(newest[0].name + checkpoint.DIGEST)):
        shutil.copy(f, dest / "checkpoints" / f.name)
    if (out / "snapshots").is_dir():
        shutil.copytree(out / "snapshots", dest / "snapshots")
    return True


def save_partials(names: list[str], runs: Path, partial: Path) -> None:
    """`save_partial` for each of a study's unfinished runs that has a checkpoint."""
    for name in names:
        if save_partial(runs / name, partial / name):
            print(f"saved {name}")


def relative(path: Path) -> str:
    """Paths under the repository as the docs show them."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def command(args: list[str], out: Path) -> str:
    return "largebatch train " + " ".join(args) + f" --out {relative(out)}"


def mean_spread(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± half-range' (the spread of 2-3 seeds is their range, not a std)."""
    values = [v * scale for v in values]
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def hardware() -> str:
    from largebatch.runlog import environment
    env = environment()
    return f"{env['cpu']}, {env['cores']} cores, Python {env['python']}, torch {env['torch']}"
