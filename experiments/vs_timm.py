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
- defaults: batch 32 in both (the only setting given besides the data and the device),
  every other choice each tool's own (workers, precision, memory layout, augmentation);
- largebatch from shards packed at shorter side 256, same settings, beside timm's folder;
- largebatch loading in the training process instead of one worker;
- largebatch on synthetic batches already in memory: the same step with no input cost.
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
LARGEBATCH = [sys.executable, "-m", "largebatch", "train", "--recipe", "goyal-8k", "--set", "train.log_every_steps=1",
              "--set", "schedule.warmup_epochs=0.1",  # the recipe's 5 epochs are longer than these runs
              "--set", "train.eval_every_epochs=0"]


def largebatch_same(data: list[str], out: Path, extra: tuple[str, ...] = (), device: str = "cpu", batch: int = 16,
                    workers: int = 1, steps: int = 25) -> list[str]:
    """largebatch's command with timm's same settings (`data`: where the images come from;
    `extra`: settings that override them)."""
    same = ["--global-batch", str(batch), "--micro-batch", str(batch), "--steps", str(steps),
            "--set", "train.bf16=true", "--set", "train.channels_last=true", "--set", f"data.workers={workers}",
            "--set", "train.compile=false",
            "--set", "model.bn_group_size=0"]  # BN over the whole batch, as timm
    if device == "cuda":  # timm lets cuDNN pick its fastest algorithms (cudnn.benchmark)
        same += ["--set", "train.deterministic=false"]
    return [*LARGEBATCH, *data, *same, *extra, "--out", str(out)]


SYNTHETIC = ["--set", "data.name=synthetic", "--set", "data.synthetic_size=224", "--set", "data.synthetic_classes=10"]


def variants(tree: Path, shards: Path, timm: Path, work: Path, device: str = "cpu", batch: int = 16,
             workers: int = 1, steps: int = 25, defaults_batch: int = 32,
             images: int = 10 * PER_CLASS) -> dict[str, tuple[list[str], int]]:
    """name: (command, batch). `images`: the tree's training images, which set the epochs
    that timm (which counts in epochs) needs for `steps` steps."""
    def epochs(b: int, n: int) -> str:
        return str(-(-n * b // images))

    def same(data: list[str], out: str, *extra: str) -> tuple[list[str], int]:
        return largebatch_same(data, work / out, extra, device, batch, workers, steps), batch
    folder, packed = ["--data", str(tree)], ["--data", str(shards), "--set", "data.name=shards"]
    tm = [sys.executable, str(timm / "train.py"), "--data-dir", str(tree), "--model", "resnet50", "--num-classes", "10",
          "--device", device, "--log-interval", "1", "--output", str(work / "timm")]
    same_tm = ["-b", str(batch), "-j", str(workers), "--epochs", epochs(batch, steps), "--amp", "--amp-dtype",
               "bfloat16", "--channels-last", "--color-jitter", "0"]
    defaults_steps = max(1, steps * batch // defaults_batch)
    return {
        "timm same": (tm + same_tm, batch),
        "largebatch same": same(folder, "lb"),
        "largebatch shards same": same(packed, "lbs"),
        "largebatch same loading in the training process": same(folder, "lb", "--set", "data.workers=0"),
        "largebatch shards same loading in the training process": same(packed, "lbs", "--set", "data.workers=0"),
        # no input at all: batches already in memory, the rate any input path could reach
        "largebatch same synthetic input": same(SYNTHETIC, "lbsyn", "--set", "data.workers=0"),
        # timm with glibc told to keep freed memory, as largebatch does by default
        # (train.keep_freed_memory): what the same allocator setting is worth to timm
        "timm same malloc kept": (tm + same_tm, batch),
        "largebatch same system malloc": same(folder, "lb", "--set", "train.keep_freed_memory=false"),
        "largebatch same OpenMP passive wait": same(folder, "lb"),  # threads sleep while they wait (ENV)
        "timm defaults": (tm + ["-b", str(defaults_batch), "--epochs", epochs(defaults_batch, defaults_steps)],
                          defaults_batch),
        # the batch in one forward pass, as timm's -b (the recipe's micro-batch is 32)
        "largebatch defaults": (LARGEBATCH + [*folder, "--global-batch", str(defaults_batch),
                                              "--micro-batch", str(defaults_batch), "--steps", str(defaults_steps),
                                              "--out", str(work / "lbd")], defaults_batch),
    }


TIMM_STEP = re.compile(r"Train: \d+ \[\s*(\d+)/\d+.*?Time: ([0-9.]+)s")


def step_seconds(cmd: list[str], output: str) -> list[float]:
    """Each step's wall-clock seconds, in order."""
    if "--out" not in cmd:  # timm
        return [float(s) for _, s in TIMM_STEP.findall(output)]
    lines = (Path(cmd[cmd.index("--out") + 1]) / "metrics.jsonl").read_text().splitlines()
    return [r["step_seconds"] for r in map(json.loads, lines) if "step_seconds" in r]


ENV = {"timm same malloc kept": {"GLIBC_TUNABLES": TUNABLES},
       "largebatch same OpenMP passive wait": {"OMP_WAIT_POLICY": "PASSIVE"}}


def run(name: str, cmd: list[str], batch: int, warmup: int, work: Path, timm: Path | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)  # every run starts without the last one's output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [timm and str(timm), os.environ.get("PYTHONPATH")])),
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
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="rounds run first and left out (the first timm run of a series has been much slower)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each rate")
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to compare on a GPU")
    p.add_argument("--batch", type=int, default=16, help="the same-settings variants' batch")
    p.add_argument("--workers", type=int, default=1, help="the same-settings variants' loader workers")
    p.add_argument("--steps", type=int, default=25, help="the same-settings variants' steps")
    p.add_argument("--defaults-batch", type=int, default=32, help="the defaults variants' batch")
    p.add_argument("--per-class", type=int, default=PER_CLASS, help="training images per class of a new tree")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tree, shards = a.tree / "jpeg", a.tree / "shards"
    if not (tree / "train").is_dir():
        subprocess.run([sys.executable, str(ROOT / "experiments/make_jpeg_tree.py"), str(tree), "--per-class",
                        str(a.per_class), "--val-per-class", "2"], check=True)
    if not shards.is_dir():
        subprocess.run([sys.executable, "-m", "largebatch", "pack", str(tree), str(shards), "--resize-shorter", "256"],
                       cwd=ROOT, check=True)
    work = a.tree / "work"
    images = sum(1 for f in (tree / "train").rglob("*") if f.is_file())
    todo = {k: v for k, v in variants(tree, shards, a.timm.resolve(), work, a.device, a.batch, a.workers, a.steps,
                                      a.defaults_batch, images).items() if not a.only or k in a.only}
    results: dict[str, list[dict]] = {k: [] for k in todo}
    left_out: dict[str, list[dict]] = {k: [] for k in todo}
    for r in range(a.warmup_rounds + a.rounds):
        warm = r < a.warmup_rounds
        for name, (cmd, batch) in todo.items():
            rate = run(name, cmd, batch, a.warmup, work, a.timm.resolve())
            (left_out if warm else results)[name].append(rate)
            print(f"round {r}: {name}: {rate['images_per_sec']:.2f} images/s"
                  + (" (warm-up round, left out)" if warm else ""), flush=True)
    summary = {k: {"images_per_sec": statistics.median(x["images_per_sec"] for x in v), "runs": v,
                   "warmup_runs": left_out[k], "command": " ".join(todo[k][0])} for k, v in results.items()}
    for kind in ("same", "defaults"):
        base = summary.get(f"timm {kind}")
        for k, v in summary.items():
            if base and kind in k.split() and not k.startswith("timm"):
                v["vs_timm"] = v["images_per_sec"] / base["images_per_sec"]
                v["vs_timm_per_round"] = [x["images_per_sec"] / t["images_per_sec"]
                                          for x, t in zip(v["runs"], base["runs"])]
    timm_rev = subprocess.run(["git", "-C", str(a.timm), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    doc = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "timm_commit": timm_rev.strip(),
           "device": a.device, "batch": a.batch, "workers": a.workers, "steps": a.steps,
           "defaults_batch": a.defaults_batch, "warmup_steps": a.warmup, "warmup_rounds": a.warmup_rounds,
           "variants": summary}
    if a.device == "cuda":
        import torch
        doc["gpu"] = torch.cuda.get_device_name(0)
    for k, v in summary.items():
        print(f"{k:24s} {v['images_per_sec']:7.2f} images/s" + (f"  {v['vs_timm']:.2f}x timm" if "vs_timm" in v else ""))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
