"""What a run writes besides checkpoints: its environment, metrics lines, summary."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import UserError, write_failure


@contextlib.contextmanager
def writing(path: Path):
    """A failed write (a full disk, a read-only directory) is one line naming the file."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_failure(e, Path(path).parent)}") from None


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
    """Appends one JSON object per line; only the main process writes. With a
    TensorBoard directory, every numeric field is also a scalar there (train/... and
    eval/...), so `tensorboard --logdir runs/` follows every run live."""

    def __init__(self, path: Path | None, tensorboard: Path | None = None, start: int = 0):
        self.path = path
        self.board = None
        if path is not None and tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: the events a killed run wrote after its checkpoint are dropped on resume
            self.board = SummaryWriter(str(tensorboard), purge_step=start + 1 if start else None)

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in lines))

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, **record) -> None:
        if self.path is None:
            return
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            group = "eval" if record.get("eval") else "train"
            for key, value in record.items():
                if key not in ("step", "eval") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"{group}/{key}", value, record["step"])
            if "comm_exposed_seconds" in record and record.get("step_seconds"):
                self.board.add_scalar("train/comm_exposed_share", record["comm_exposed_seconds"] /
                                      record["step_seconds"], record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def write_text(path: Path, text: str) -> None:
    """Atomically: the old file or the new one, and no temporary left behind on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def summary_table(summary: dict) -> str:
    rows = [("test top-1", f"{summary['top1'] * 100:.2f} %"), ("test top-5", f"{summary['top5'] * 100:.2f} %"),
            ("epochs", f"{summary['epochs']:.2f}"), ("steps", str(summary["steps"])),
            ("global batch", " -> ".join(map(str, summary.get("global_batches") or [summary["global_batch"]]))),
            ("processes x accum x micro", f"{summary['processes']} x {summary['accum_steps']} x {summary['micro_batch']}"),
            ("train images/s", f"{summary['images_per_sec']:.1f}"),
            ("wall time", f"{summary['wall_seconds']:.1f} s")]
    if summary.get("noise_scale") is not None:
        # B_simple: far above it, a larger batch buys few fewer steps (docs/RESULTS.md).
        late, final = summary.get("noise_scale_late"), summary.get("noise_scale_final")
        rows.append(("gradient noise scale", f"{summary['noise_scale']:.0f} (run mean)"
                     + (f", {late:.0f} over the second half" if late is not None else "")
                     + (f", {final:.0f} at the end" if final is not None else "")))
    if "ensemble_top1" in summary:
        rows.insert(2, (f"ensemble of {len(summary['snapshots'])} top-1", f"{summary['ensemble_top1'] * 100:.2f} %"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def tensorboard_wanted(setting: bool | None) -> bool:
    """train.tensorboard: None = when the tensorboard package is installed."""
    if setting is not None:
        return setting
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None
