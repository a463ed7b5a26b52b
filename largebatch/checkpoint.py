"""Checkpoints: written atomically, the newest always reachable as `last.pt`, the
oldest pruned to keep K, and loaded with weights_only=True (a checkpoint file cannot
execute code).

Layout: DIR/step-00001234.pt for each save, and DIR/last.pt, a hard link to the
newest. Each file is written to a temporary name, flushed to disk, then renamed, so a
kill at any moment leaves either the old or the new `last.pt`, never a torn one.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

LAST = "last.pt"
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _link_last(target: Path) -> None:
    tmp = target.with_name(f".{LAST}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(target, tmp)
    os.replace(tmp, target.with_name(LAST))
    _fsync_dir(target.parent)


def step_files(directory: Path) -> list[Path]:
    files = [p for p in Path(directory).glob("step-*.pt") if _STEP_FILE.search(p.name)]
    return sorted(files, key=lambda p: int(_STEP_FILE.search(p.name).group(1)))


def save(state: dict, directory: Path, step: int, keep: int) -> Path:
    directory = Path(directory)
    path = directory / f"step-{step:08d}.pt"
    atomic_save(state, path)
    _link_last(path)
    for old in step_files(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); earlier checkpoints: "
                           f"{[p.name for p in step_files(path.parent)]}") from e


def latest(directory: Path) -> Path | None:
    last = Path(directory) / LAST
    return last if last.exists() else None
