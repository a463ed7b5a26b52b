"""Learning-rate schedules as pure functions of the optimizer step.

Durations arrive in epochs and are converted to steps once, here. A run is a list of
phases; the LR at a step is a function of that step and the phase list only, so a
checkpoint needs to store the step and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config, ConfigError


@dataclass(frozen=True, slots=True)
class Phase:
    start: int            # first global step of the phase
    steps: int            # length in steps
    peak: float
    warmup_steps: int
    warmup_start: float
    decay: str            # poly | cosine | step | constant
    power: float
    horizon: int          # poly/cosine end, in steps from the phase start
    final: float          # cosine floor
    milestones: tuple[int, ...]  # step decay points, in steps from the phase start
    gamma: float
    weight_decay: float


def phase_lr(t: int, p: Phase) -> float:
    """LR at step t counted from the start of phase p.

    Decay is measured from the phase start, as in Caffe's `poly` policy that the SC18
    authors used (their run B reaches 0.93 at epoch 25 of a 60-epoch horizon); linear
    warmup replaces the first warmup_steps.
    """
    if t < p.warmup_steps:
        return p.warmup_start + (p.peak - p.warmup_start) * t / p.warmup_steps
    frac = min(t / p.horizon, 1.0)
    if p.decay == "poly":
        return p.peak * (1.0 - frac) ** p.power
    if p.decay == "cosine":
        return p.final + (p.peak - p.final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if p.decay == "step":
        return p.peak * p.gamma ** sum(1 for m in p.milestones if t >= m)
    return p.peak


def phase_at(step: int, phases: list[Phase]) -> Phase:
    current = phases[0]
    for p in phases:
        if p.start <= step:
            current = p
    return current


def lr_at(step: int, phases: list[Phase]) -> float:
    p = phase_at(step, phases)
    return phase_lr(step - p.start, p)


def peak_lr(cfg: Config) -> float:
    """The linear scaling rule, unless the recipe names its peak."""
    s = cfg.schedule
    if s.peak_lr is not None:
        return s.peak_lr
    return s.base_lr * cfg.train.global_batch / s.reference_batch


def build_phases(cfg: Config, steps_per_epoch: int, total_steps: int) -> list[Phase]:
    s = cfg.schedule

    def steps(epochs: float) -> int:
        return int(round(epochs * steps_per_epoch))

    warmup = steps(s.warmup_epochs)
    if warmup > total_steps:
        raise ConfigError(f"schedule.warmup_epochs ({s.warmup_epochs} epochs = {warmup} steps) is "
                          f"longer than training ({total_steps} steps)")
    horizon = steps(s.horizon_epochs) if s.horizon_epochs is not None else total_steps
    return [Phase(start=0, steps=total_steps, peak=peak_lr(cfg), warmup_steps=warmup,
                  warmup_start=s.warmup_start_lr, decay=s.decay, power=s.poly_power,
                  horizon=max(horizon, 1), final=s.final_lr,
                  milestones=tuple(steps(m) for m in s.milestones), gamma=s.gamma,
                  weight_decay=cfg.optim.weight_decay)]
