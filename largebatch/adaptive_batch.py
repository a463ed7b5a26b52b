"""Batch-size control from the measured gradient noise scale (config: adaptive_batch).

The rule is a pure function of the current batch and the noise scale measured since
the last decision; what was decided is kept as {epoch: batch}, so the schedule stays a
pure function of the step and that map, and a checkpoint carries the map."""
from __future__ import annotations

import math

from .config import Config


def candidates(cfg: Config) -> list[int]:
    """Every global batch the run may take: train.global_batch times powers of two up to
    adaptive_batch.max_batch (just the first when the control is off)."""
    batch, out = cfg.train.global_batch, [cfg.train.global_batch]
    while batch * 2 <= cfg.adaptive_batch.max_batch:
        batch *= 2
        out.append(batch)
    return out


def next_batch(current: int, max_batch: int, noise_scale: float | None, multiple: float = 1.0) -> int:
    """Double the batch while the doubled batch is at most max_batch and `multiple` times
    the measured noise scale; never shrink. No measurement (or a negative |G|^2
    estimate) keeps it."""
    if noise_scale is None or not math.isfinite(noise_scale) or noise_scale <= 0:
        return current
    batch = current
    while batch * 2 <= min(max_batch, multiple * noise_scale):
        batch *= 2
    return batch


def due(cfg: Config, epoch: float) -> bool:
    """Whether `epoch` epochs done is a decision point (a whole multiple of every_epochs, not the start)."""
    a = cfg.adaptive_batch
    whole = round(epoch)
    return bool(a.max_batch) and whole > 0 and abs(epoch - whole) < 1e-9 and whole % a.every_epochs == 0
