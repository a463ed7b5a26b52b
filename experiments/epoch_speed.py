"""A Fashion-MNIST training run of today's code beside the same run of an earlier commit,
side by side on this machine: rounds interleaved (old, new, old, new, ...), each run a
fresh `largebatch train` in its own process, every automatic choice left to the code
(each code keeps its own cache of measured choices, so only its first round pays for
them). Reports the training rate (images/s, evaluation and checkpoints excluded), the
wall time and the test top-1 of each run.

    python experiments/epoch_speed.py --ref 9197b73 --rounds 2 --out docs/bench/epoch_speed.json

The earlier code is taken from git (`git archive`) into a temporary directory; nothing
else of the repository changes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def export(commit: str, dest: Path) -> None:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(code: Path, cache: Path, out: Path, args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "LARGEBATCH_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "largebatch", "train", *args, "--out", str(out)],
                              cwd=code, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{code}: largebatch train failed ({proc.returncode}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    return {"images_per_sec": summary["images_per_sec"], "wall_seconds": summary["wall_seconds"],
            "top1": summary["top1"], "bf16": train.get("bf16"), "channels_last": train.get("channels_last")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="9197b73", help="the earlier commit")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("args", nargs="*", default=["--recipe", "fmnist-large", "--set", "train.compile=false"],
                   help="what to train (after --): the same for both codes")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "experiments"))
    from common import hardware
    with tempfile.TemporaryDirectory(prefix="epoch-speed-") as tmp:
        tmp = Path(tmp)
        codes = {a.ref: tmp / "ref", "current": ROOT}
        (tmp / "ref").mkdir()
        export(a.ref, tmp / "ref")
        runs: dict[str, list[dict]] = {name: [] for name in codes}
        for r in range(a.rounds):
            for i, (name, code) in enumerate(codes.items()):
                m = run(code, tmp / f"cache-{i}", tmp / f"{r}-{i}", a.args, a.threads)
                runs[name].append(m)
                print(f"round {r + 1} {name:10s} {m['images_per_sec']:7.0f} images/s  {m['wall_seconds']:6.0f} s  "
                      f"top-1 {m['top1']:.4f}  bf16 {m['bf16']}  channels_last {m['channels_last']}", flush=True)
    rate = {name: statistics.median(m["images_per_sec"] for m in ms) for name, ms in runs.items()}
    ratio = rate["current"] / rate[a.ref]
    print(f"median images/s: {a.ref} {rate[a.ref]:.0f}, current {rate['current']:.0f}: {ratio:.2f}x")
    if a.out:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        a.out.write_text(json.dumps({
            "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "ref": a.ref, "current": head.stdout.strip(),
            "command": "largebatch train " + " ".join(a.args), "threads": a.threads, "runs": runs,
            "median_images_per_sec": rate, "ratio": ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
