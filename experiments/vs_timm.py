"""End-to-end ResNet-50 training from a JPEG tree (and from shards), largebatch beside
timm's train.py on the same machine, rounds interleaved.

    python experiments/vs_timm.py --timm /path/to/pytorch-image-models --out docs/bench/vs_timm.json

timm is not a dependency: pass a checkout of its repository (with huggingface_hub and
safetensors importable, e.g. through PYTHONPATH). Both tools train ResNet-50 on the same
tree, made by make_jpeg_tree.py if missing, and report each step's wall-clock time
(timm: `--log-interval 1`; largebatch: `train.log_every_steps=1`), data waits included;
the rate is the images of the steps after the warm-up over their summed time.

Variants:
- same settings: batch 16, bf16 autocast, channels_last, 1 loader worker, no compile,
  RandomResizedCrop + flip (timm's colour jitter off, as largebatch has none);
- defaults: batch 32 in both (the only setting given besides the data and the CPU), every
  other choice each tool's own (workers, precision, memory layout, augmentation);
- largebatch from shards packed at shorter side 256, same settings, beside timm's folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, hardware
from largebatch.malloc import TUNABLES

PER_CLASS = 40  # 400 training images: 25 steps of 16, 12 of 32


def variants(tree: Path, shards: Path, timm: Path, work: Path) -> dict[str, tuple[list[str], int]]:
    """name: (command, batch)."""
    lb = [sys.executable, "-m", "largebatch", "train", "--recipe", "goyal-8k", "--set", "train.log_every_steps=1",
          "--set", "schedule.warmup_epochs=0.1",  # the recipe's 5 epochs are longer than these runs
          "--set", "train.eval_every_epochs=0"]
    same_lb = ["--global-batch", "16", "--micro-batch", "16", "--steps", "25", "--set", "train.bf16=true",
               "--set", "train.channels_last=true", "--set", "data.workers=1", "--set", "train.compile=false",
               "--set", "model.bn_group_size=0"]  # BN over the whole batch of 16, as timm
    tm = [sys.executable, str(timm / "train.py"), "--data-dir", str(tree), "--model", "resnet50", "--num-classes", "10",
          "--device", "cpu", "--epochs", "1", "--log-interval", "1", "--output", str(work / "timm")]
    return {
        "timm same": (tm + ["-b", "16", "-j", "1", "--amp", "--amp-dtype", "bfloat16", "--channels-last",
                            "--color-jitter", "0"], 16),
        "largebatch same": (lb + ["--data", str(tree), *same_lb, "--out", str(work / "lb")], 16),
        "largebatch shards same": (lb + ["--data", str(shards), "--set", "data.name=shards", *same_lb, "--out", str(work / "lbs")], 16),
        "largebatch same loading in the training process": (
            lb + ["--data", str(tree), *same_lb, "--set", "data.workers=0", "--out", str(work / "lb")], 16),
        # timm with glibc told to keep freed memory, as largebatch does by default
        # (train.keep_freed_memory): what the same allocator setting is worth to timm
        "timm same malloc kept": (tm + ["-b", "16", "-j", "1", "--amp", "--amp-dtype", "bfloat16", "--channels-last",
                                        "--color-jitter", "0"], 16),
        "largebatch same system malloc": (lb + ["--data", str(tree), *same_lb, "--set", "train.keep_freed_memory=false",
                                                "--out", str(work / "lb")], 16),
        "timm defaults": (tm + ["-b", "32"], 32),
        "largebatch defaults": (lb + ["--data", str(tree), "--global-batch", "32", "--steps", "12",
                                      "--out", str(work / "lbd")], 32),
    }


TIMM_STEP = re.compile(r"Train: \d+ \[\s*(\d+)/\d+.*?Time: ([0-9.]+)s")


def step_seconds(cmd: list[str], output: str) -> list[float]:
    """Each step's wall-clock seconds, in order."""
    if "--out" not in cmd:  # timm
        return [float(s) for _, s in TIMM_STEP.findall(output)]
    lines = (Path(cmd[cmd.index("--out") + 1]) / "metrics.jsonl").read_text().splitlines()
    return [r["step_seconds"] for r in map(json.loads, lines) if "step_seconds" in r]


ENV = {"timm same malloc kept": {"GLIBC_TUNABLES": TUNABLES}}


def run(name: str, cmd: list[str], batch: int, warmup: int, work: Path, timm: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)  # every run starts without the last one's output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(timm), os.environ.get("PYTHONPATH")])),
           **ENV.get(name, {})}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    seconds = step_seconds(cmd, proc.stdout + proc.stderr)
    timed = seconds[warmup:]
    if not timed:
        raise SystemExit(f"{name}: only {len(seconds)} step times found")
    return {"images_per_sec": batch * len(timed) / sum(timed), "steps_timed": len(timed), "wall_seconds": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm", type=Path, required=True, help="a checkout of pytorch-image-models")
    p.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "vs_timm_tree")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each rate")
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tree, shards = a.tree / "jpeg", a.tree / "shards"
    if not (tree / "train").is_dir():
        subprocess.run([sys.executable, str(ROOT / "experiments/make_jpeg_tree.py"), str(tree), "--per-class",
                        str(PER_CLASS), "--val-per-class", "2"], check=True)
    if not shards.is_dir():
        subprocess.run([sys.executable, "-m", "largebatch", "pack", str(tree), str(shards), "--resize-shorter", "256"],
                       cwd=ROOT, check=True)
    work = a.tree / "work"
    todo = {k: v for k, v in variants(tree, shards, a.timm.resolve(), work).items() if not a.only or k in a.only}
    results: dict[str, list[dict]] = {k: [] for k in todo}
    for r in range(a.rounds):
        for name, (cmd, batch) in todo.items():
            results[name].append(run(name, cmd, batch, a.warmup, work, a.timm.resolve()))
            print(f"round {r}: {name}: {results[name][-1]['images_per_sec']:.2f} images/s", flush=True)
    summary = {k: {"images_per_sec": statistics.median(x["images_per_sec"] for x in v), "runs": v,
                   "command": " ".join(todo[k][0])} for k, v in results.items()}
    for kind in ("same", "defaults"):
        base = summary.get(f"timm {kind}")
        for k, v in summary.items():
            if base and kind in k.split() and not k.startswith("timm"):
                v["vs_timm"] = v["images_per_sec"] / base["images_per_sec"]
    timm_rev = subprocess.run(["git", "-C", str(a.timm), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    doc = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "timm_commit": timm_rev.strip(),
           "warmup_steps": a.warmup, "variants": summary}
    for k, v in summary.items():
        print(f"{k:24s} {v['images_per_sec']:7.2f} images/s" + (f"  {v['vs_timm']:.2f}x timm" if "vs_timm" in v else ""))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
