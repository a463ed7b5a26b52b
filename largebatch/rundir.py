"""The run directory as one run's property: a lock so that two runs never write into the
same directory, and the rules for what may change when a run is resumed."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import yaml

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Config, ConfigError, to_dict
from .errors import UserError

LOCK = ".lock"

# Keys a resumed run may change: how long, how often to log, evaluate and checkpoint,
# and how the work is laid out and computed. Everything else changes what is trained.
MAY_CHANGE = ("description", "train.epochs", "train.steps", "train.eval_every_epochs", "train.eval_batch",
              "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
              "train.threads", "train.micro_batch", "train.compile", "train.bf16", "train.channels_last",
              "train.noise_scale", "train.tensorboard",
              "data.path", "data.stage_to", "data.workers", "data.strict", "data.download", "dist.")


class RunDirError(UserError):
    pass


class RunLock:
    """An advisory lock on OUT/.lock (flock, released by the kernel when the holder dies),
    holding the holder's host, pid and start time for the message another run prints."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a line when a dead run's lock was taken over."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"--out: cannot use {self.path.parent} as the run directory ({e.strerror}); "
                              f"choose another --out") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(f"--out: {self.path.parent} is in use by another run ({_holder(previous)}); "
                              f"wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        self.fd = fd
        return f"took over the lock of a run that ended without releasing it ({_holder(previous)})" \
            if previous else None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved_yaml: str, new: dict) -> tuple[dict, dict]:
    """(allowed, refused): key -> (saved value, new value) for every key that differs."""
    old, now = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(new)
    defaults = _flatten(to_dict(Config()))
    allowed, refused = {}, {}
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key, "(absent)"), now.get(key, "(absent)")
        if key not in old and key in defaults and b == defaults[key]:
            continue  # a key added since the run started, at its default: what the run did
        if a != b:
            ok = any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)
            (allowed if ok else refused)[key] = (a, b)
    return allowed, refused


def diff_lines(changes: dict) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def open_run_dir(out: Path, cfg, lock: RunLock, resume: bool, allow_change: bool) -> tuple[Path | None, dict]:
    """Main process only: lock OUT, clear the debris of killed saves, and on --resume
    choose the newest intact checkpoint and hold the config to the run's own.
    Returns (checkpoint to resume from or None, config changes accepted)."""
    say = lambda msg: print(f"largebatch: {msg}", flush=True)  # noqa: E731
    taken_over = lock.acquire()
    if taken_over:
        say(f"{out}: {taken_over}")
    ckpt_dir = out / "checkpoints"
    for p in checkpoint.remove_partial(ckpt_dir) + checkpoint.remove_partial(out / "snapshots"):
        say(f"removed {p.name}, the partial file of a save that did not finish")
    if not resume:
        return None, {}
    path, _, passed = checkpoint.newest_intact(ckpt_dir)
    for line in passed:
        say(f"--resume: passing over {line}")
    if path is None:
        if passed:
            raise CheckpointError(
                f"--resume: no intact checkpoint in {ckpt_dir} ({len(passed)} damaged); not starting from step 0 "
                f"over them: move them away to start afresh, or choose another --out")
        return None, {}
    saved = out / "config.yaml"
    allowed, refused = config_changes(saved.read_text(), to_dict(cfg)) if saved.exists() else ({}, {})
    if refused and not allow_change:
        raise ConfigError(f"--resume: the config differs from {saved} in keys that change what is trained: "
                          f"{diff_lines(refused)}. Start a new run with another --out, or pass "
                          f"--allow-config-change to continue anyway (it is recorded in run.json)")
    if allowed or refused:
        say(f"--resume: config changes: {diff_lines({**allowed, **refused})}")
    return path, {k: list(v) for k, v in {**allowed, **refused}.items()}
