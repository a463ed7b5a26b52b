"""One seeded order over the global batch.

Every epoch is a permutation drawn from (seed, epoch). Step s of the run takes global
batch s of that order; the global batch is cut into world_size * accum_steps chunks of
micro_batch consecutive positions, and chunk a * world_size + rank is micro-step a of
process `rank`. Any layout with the same micro_batch therefore sees the same chunks,
and resuming at step s needs nothing but s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import ConfigError
from ..dist import Layout


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """What to load: dataset indices, the epoch (for per-sample augmentation) and whether
    to augment (a phase of the schedule may turn augmentation off)."""
    indices: tuple[int, ...]
    epoch: int
    augment: bool = False


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5A3D))
    return torch.randperm(num_samples, generator=g)


@dataclass(frozen=True, slots=True)
class Segment:
    """Steps with one global batch: from `start` (a step), beginning at whole epoch `epoch`."""
    start: int
    epoch: int
    layout: Layout
    steps_per_epoch: int


class GlobalBatchSampler:
    """Yields this process's micro-batches, in order, for steps [start, stop).

    `layouts` is one Layout, or (first step, Layout) pairs when the global batch changes
    during the run (batch-size control); a change falls on a whole epoch, so each epoch
    is one permutation cut into batches of one size."""

    def __init__(self, num_samples: int, layouts: Layout | list[tuple[int, Layout]], seed: int):
        self.num_samples, self.seed = num_samples, seed
        pairs = [(0, layouts)] if isinstance(layouts, Layout) else list(layouts)
        self.segments: list[Segment] = []
        for start, lay in pairs:
            spe = num_samples // lay.global_batch
            if spe == 0:
                raise ConfigError(f"train.global_batch ({lay.global_batch}) is larger than the "
                                  f"training set ({num_samples} samples)")
            epoch = 0
            if self.segments:
                prev = self.segments[-1]
                epoch = prev.epoch + (start - prev.start) // prev.steps_per_epoch
            self.segments.append(Segment(start, epoch, lay, spe))
        self.layout = self.segments[0].layout
        self.steps_per_epoch = self.segments[0].steps_per_epoch

    def segment_at(self, step: int) -> Segment:
        current = self.segments[0]
        for seg in self.segments:
            if seg.start <= step:
                current = seg
        return current

    def epoch_at(self, step: int) -> float:
        """Epochs done after `step` steps."""
        seg = self.segment_at(step)
        return seg.epoch + (step - seg.start) / seg.steps_per_epoch

    def images(self, start: int, stop: int) -> int:
        """Samples in steps [start, stop)."""
        return sum(max(0, min(stop, nxt) - max(start, seg.start)) * seg.layout.global_batch
                   for seg, nxt in zip(self.segments, [s.start for s in self.segments[1:]] + [stop]))

    def micro_batches(self, start: int, stop: int,
                      augment: Callable[[int], bool] = lambda step: True) -> Iterator[BatchSpec]:
        """`augment(step)` says whether the samples of that step are augmented."""
        epoch, perm = -1, None
        for step in range(start, stop):
            seg = self.segment_at(step)
            lay = seg.layout
            k, s = divmod(step - seg.start, seg.steps_per_epoch)
            e = seg.epoch + k
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.num_samples, self.seed, e)
            base = s * lay.global_batch
            for a in range(lay.accum_steps):
                lo = base + (a * lay.world_size + lay.rank) * lay.micro_batch
                yield BatchSpec(tuple(perm[lo:lo + lay.micro_batch].tolist()), e, augment(step))


def eval_batches(num_samples: int, batch: int, rank: int, world_size: int) -> list[BatchSpec]:
    """A contiguous shard per process, no padding: every sample is counted once."""
    lo, hi = rank * num_samples // world_size, (rank + 1) * num_samples // world_size
    return [BatchSpec(tuple(range(i, min(i + batch, hi))), 0) for i in range(lo, hi, batch)]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices, count: int) -> np.ndarray:
    """`count` uniforms in [0, 1) per sample, a pure function of (seed, epoch, index).

    Augmentation draws from here, never from a worker's or process's RNG, so a sample
    is transformed identically whatever process, worker or micro-step loads it.
    """
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.array([seed & (2**64 - 1)], np.uint64)) ^ np.uint64(epoch))
        x = _splitmix64(key ^ _splitmix64(idx))
        z = _splitmix64(x + np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
