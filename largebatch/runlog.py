"""What a run writes besides checkpoints: its environment, metrics lines, summary."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """Code version, libraries and hardware, stored with every run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torchvision
    from . import __version__
    return {
        "largebatch": __version__, "git_commit": commit, "python": sys.version.split()[0],
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class MetricsLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path | None):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, **record) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: Path, obj: dict) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def summary_table(summary: dict) -> str:
    rows = [("test top-1", f"{summary['top1'] * 100:.2f} %"), ("test top-5", f"{summary['top5'] * 100:.2f} %"),
            ("epochs", f"{summary['epochs']:.2f}"), ("steps", str(summary["steps"])),
            ("global batch", str(summary["global_batch"])),
            ("processes x accum x micro", f"{summary['processes']} x {summary['accum_steps']} x {summary['micro_batch']}"),
            ("train images/s", f"{summary['images_per_sec']:.1f}"),
            ("wall time", f"{summary['wall_seconds']:.1f} s")]
    if "ensemble_top1" in summary:
        rows.insert(2, (f"ensemble of {len(summary['snapshots'])} top-1", f"{summary['ensemble_top1'] * 100:.2f} %"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
