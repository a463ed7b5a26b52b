"""Checkpoints you can trust: written atomically with a checksum, the newest always
reachable as `last.pt`, the oldest pruned to keep K, and checked when read back.

Layout: DIR/step-00001234.pt for each save, its checksum in step-00001234.pt.sha256
(size and SHA-256, written before the file appears), and DIR/last.pt, a hard link to
the newest. A kill at any moment leaves the old files or the new ones, never a torn one;
a failed write (a full disk) removes its partial file and leaves the previous checkpoint
as it was. Files are loaded with weights_only=True (a checkpoint cannot execute code).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import UserError, write_failure

LAST = "last.pt"
DIGEST = ".sha256"
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read back intact."""


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


class _Hashing:
    """A write-only file that hashes what passes through, so nothing is read twice."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch turns it into a vague RuntimeError

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _digest_line(size: int, hexdigest: str) -> str:
    return f"{size} {hexdigest}\n"


def atomic_save(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_digest = path.with_name(f".{path.name}{DIGEST}.tmp-{os.getpid()}")
    h = None
    try:
        with open(tmp, "wb") as f:
            h = _Hashing(f)
            torch.save(obj, h)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_digest, "w") as f:
            f.write(_digest_line(h.size, h.sha.hexdigest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_digest, path.with_name(path.name + DIGEST))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {write_failure(h.error if h and h.error else e, path.parent)}; the previous "
                              f"checkpoint is unchanged") from None
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


def remove_partial(directory: Path) -> list[Path]:
    """Temporary files of saves that were killed half-way (they only take space)."""
    partial = list(Path(directory).glob(".*.tmp-*")) if Path(directory).is_dir() else []
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def has_checkpoints(directory: Path) -> bool:
    return bool(step_files(directory)) or (Path(directory) / LAST).exists()


def save(state: dict, directory: Path, step: int, keep: int) -> Path:
    directory = Path(directory)
    path = directory / f"step-{step:08d}.pt"
    atomic_save(state, path)
    _link_last(path)
    for old in step_files(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + DIGEST).unlink(missing_ok=True)
    return path


def _digest_file(path: Path) -> Path | None:
    """last.pt is checked against the checksum of the step file it is a link to."""
    if path.name == LAST:
        for p in reversed(step_files(path.parent)):
            try:
                if os.path.samefile(p, path):
                    return p.with_name(p.name + DIGEST)
            except OSError:
                pass
        return None
    return path.with_name(path.name + DIGEST)


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        hint = path / "checkpoints" / LAST if (path / "checkpoints").is_dir() else path / LAST
        raise CheckpointError(f"{path} is a directory; give a checkpoint file, such as {hint}")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    digest = _digest_file(path)
    if digest is not None and digest.exists():
        if digest.read_text() != _digest_line(len(data), hashlib.sha256(data).hexdigest()):
            raise CheckpointError(f"checkpoint {path} is damaged: its size or checksum differs from the "
                                  f"one written with it")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for files that are not its own
        raise CheckpointError(f"{path} is not a readable checkpoint "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a largebatch checkpoint (it has no 'model' and 'config'; a bare "
                              f"state_dict?): give a file that `largebatch train` wrote")
    return state


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def newest_intact(directory: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint that reads back intact with finite weights, and a line for
    each newer one passed over. Step files are tried newest first; last.pt only when
    there are none (it is a link to the newest step file)."""
    directory = Path(directory)
    candidates = list(reversed(step_files(directory))) or [p for p in [directory / LAST] if p.exists()]
    passed = []
    for p in candidates:
        try:
            state = load(p)
        except CheckpointError as e:
            passed.append(str(e))
            continue
        if not finite(state):
            passed.append(f"{p} holds non-finite weights")
            continue
        return p, state, passed
    return None, None, passed
