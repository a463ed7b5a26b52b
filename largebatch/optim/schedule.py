"""Learning-rate schedules as pure functions of the optimizer step.

Durations arrive in epochs and are converted to steps once, here. A run is a list of
phases; the LR at a step is a function of that step and the phase list only, so a
checkpoint needs to store the step and nothing else.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import SHAPE_KEYS, Config, ConfigError, EnsembleConfig, PhaseConfig


@dataclass(frozen=True, slots=True)
class Phase:
    start: int            # first global step of the phase
    steps: int            # length in steps
    peak: float
    warmup_steps: int
    warmup_start: float
    decay: str            # poly | cosine | linear | step | constant
    power: float
    horizon: int          # poly/cosine end, in steps from the phase start
    final: float          # where cosine and linear end
    milestones: tuple[int, ...]  # step decay points, in steps from the phase start
    gamma: float
    weight_decay: float
    name: str = "main"
    augment: bool = True
    reset_momentum: bool = False
    snapshot: int = 0     # snapshot number taken at the phase end; 0 = none
    global_batch: int = 0  # this phase's global batch; 0 = train.global_batch
    offset: int = 0       # steps of its shape already run: a phase cut where the batch changes

    @property
    def end(self) -> int:
        return self.start + self.steps


def phase_lr(t: int, p: Phase) -> float:
    """LR at step t counted from the start of phase p.

    Decay is measured from the phase start, as in Caffe's `poly` policy that the SC18
    authors used (their run B reaches 0.93 at epoch 25 of a 60-epoch horizon); linear
    warmup replaces the first warmup_steps.
    """
    t += p.offset
    if t < p.warmup_steps:
        return p.warmup_start + (p.peak - p.warmup_start) * t / p.warmup_steps
    frac = min(t / p.horizon, 1.0)
    if p.decay == "poly":
        return p.peak * (1.0 - frac) ** p.power
    if p.decay == "cosine":
        return p.final + (p.peak - p.final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if p.decay == "linear":
        return p.peak + (p.final - p.peak) * frac
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


def lr_scale(cfg: Config, batch: int, reference: int) -> float:
    """The scaling rule's factor from `reference` to `batch`."""
    return (batch / reference) ** (0.5 if cfg.schedule.scaling == "sqrt" else 1.0)


def peak_lr(cfg: Config) -> float:
    """The scaling rule at train.global_batch, unless the recipe names its peak."""
    s = cfg.schedule
    if s.peak_lr is not None:
        return s.peak_lr
    return s.base_lr * lr_scale(cfg, cfg.train.global_batch, s.reference_batch)


def phase_configs(cfg: Config, total_epochs: float) -> list[PhaseConfig]:
    """The run's phases in epochs: the recipe's `phases`, else its `schedule` as one
    main phase, split into a Collapsed Ensemble when ensemble.cycles > 0."""
    if cfg.phases:
        return list(cfg.phases)
    shape = {key: getattr(cfg.schedule, key) for key in SHAPE_KEYS}
    main = PhaseConfig(name="main", epochs=total_epochs, snapshot=False, **shape)
    if cfg.ensemble.cycles:
        return collapsed_ensemble(main, cfg.ensemble, total_epochs, cfg.optim.weight_decay)
    return [main]


def collapsed_ensemble(main: PhaseConfig, e: EnsembleConfig, total_epochs: float,
                       weight_decay: float) -> list[PhaseConfig]:
    """Split a budget into the recipe's schedule cut short, e.cycles LR cycles and a
    collapse. The first cycle starts a little above the LR where the main phase was cut
    and each next peak is peak_decay times the previous. In the SC18 authors' run B
    pattern (cycle_shape sc18) a cycle re-warms up from where the previous one ended and
    decays as poly power 2 over twice its length; cosine cycles anneal to zero, fge
    cycles fall in a straight line to fge_low of their peak. The collapse decays from the
    last cycle's end to zero with more weight decay and no augmentation. LRs are
    multiples of the peak."""
    main_epochs = e.main_fraction * total_epochs
    collapse = e.collapse_fraction * total_epochs
    length = (total_epochs - main_epochs - collapse) / e.cycles
    main = dataclasses.replace(main, epochs=main_epochs, horizon_epochs=main.horizon_epochs or total_epochs)
    end = phase_lr(main_epochs, _phase(main, 0, 1.0, weight_decay, lambda ep: ep))
    phases, peak = [main], e.first_peak * end
    for k in range(e.cycles):
        name = f"cycle{k + 1}"
        if e.cycle_shape == "cosine":
            cycle = PhaseConfig(name=name, epochs=length, peak=peak, decay="cosine")
        elif e.cycle_shape == "fge":
            cycle = PhaseConfig(name=name, epochs=length, peak=peak, decay="linear", final=e.fge_low * peak)
        else:
            cycle = PhaseConfig(name=name, epochs=length, peak=peak,
                                warmup_epochs=e.rewarmup_fraction * length if k else 0.0, warmup_start=end,
                                decay="poly", poly_power=e.cycle_power, horizon_epochs=2 * length,
                                reset_momentum=True)
        phases.append(cycle)
        end = phase_lr(length, _phase(cycle, 0, 1.0, weight_decay, lambda ep: ep))
        peak *= e.peak_decay
    if collapse > 0:
        phases.append(PhaseConfig(name="collapse", epochs=collapse, peak=end, decay="poly",
                                  poly_power=e.cycle_power, weight_decay=e.collapse_weight_decay * weight_decay,
                                  augment=e.collapse_augment, reset_momentum=True))
    return phases


def _phase(pc: PhaseConfig, start: int, peak: float, weight_decay: float, steps, length: int | None = None,
           augment: bool = True, snapshot: int = 0, offset: int | None = None) -> Phase:
    """`offset`: where a piece of a phase cut at a batch change begins in the phase's shape,
    in the piece's steps (the whole phase's warmup and horizon are counted in them too)."""
    length = steps(pc.epochs) if length is None else length
    whole = length if offset is None else steps(pc.epochs)
    horizon = steps(pc.horizon_epochs) if pc.horizon_epochs is not None else whole
    return Phase(start=start, steps=length, peak=pc.peak * peak, warmup_steps=steps(pc.warmup_epochs),
                 warmup_start=pc.warmup_start * peak, decay=pc.decay, power=pc.poly_power,
                 horizon=max(horizon, 1), final=pc.final * peak,
                 milestones=tuple(steps(m) for m in pc.milestones), gamma=pc.gamma,
                 weight_decay=weight_decay if pc.weight_decay is None else pc.weight_decay,
                 name=pc.name, augment=augment if pc.augment is None else pc.augment,
                 reset_momentum=pc.reset_momentum and not offset, snapshot=snapshot, offset=offset or 0)


def build_phases(cfg: Config, steps_per_epoch: int, num_samples: int | None = None,
                 decided: dict[int, int] | None = None) -> list[Phase]:
    """Phases in steps. Boundaries are rounded from cumulative epochs, so rounding never
    drifts; the run lasts until the last phase ends. A phase with its own global batch
    counts its steps with its own steps per epoch (num_samples // batch); the batch may
    change only at a whole epoch. `decided` maps whole epochs to the global batch the
    adaptive control chose from there on; a phase it changes the batch in is cut into
    pieces that continue one LR shape, each piece in the steps of its batch."""
    t, decided = cfg.train, decided or {}
    num_samples = num_samples or steps_per_epoch * t.global_batch
    total_epochs = t.steps / steps_per_epoch if t.steps is not None else t.epochs
    configs = phase_configs(cfg, total_epochs)
    phases, elapsed, snapshots = [], 0.0, 0
    seg_step, seg_epoch, batch = 0, 0.0, t.global_batch  # where the current batch began
    for i, pc in enumerate(configs):
        begin, finish = elapsed, elapsed + pc.epochs
        cuts = sorted(e for e in decided if begin + 1e-6 < e < finish - 1e-6)
        snapshots += pc.snapshot
        for a, b in zip([begin, *cuts], [*cuts, finish]):
            chosen = [e for e in decided if e <= a + 1e-6]
            want = decided[max(chosen)] if chosen else pc.global_batch or t.global_batch
            if want != batch:
                if abs(a - round(a)) > 1e-6:
                    raise ConfigError(f"phases[{i}].global_batch: the batch may change only at a whole epoch, "
                                      f"and phase {i} starts at epoch {a:g}")
                seg_step, seg_epoch, batch = phases[-1].end if phases else 0, a, want
            spe = num_samples // batch
            if spe == 0:
                raise ConfigError(f"phases[{i}].global_batch ({batch}) is larger than the training set "
                                  f"({num_samples} samples)")
            steps = lambda ep, spe=spe: int(round(ep * spe))  # noqa: E731
            start = seg_step + steps(a - seg_epoch)
            stop = max(seg_step + steps(b - seg_epoch), start + 1)
            scale = lr_scale(cfg, batch, t.global_batch) if pc.scale_lr else 1.0
            last = b == finish
            phase = _phase(pc, start, peak_lr(cfg) * scale, cfg.optim.weight_decay, steps, stop - start,
                           cfg.data.augment, snapshots if pc.snapshot and last else 0,
                           offset=steps(a - begin) if cuts else None)
            phase = dataclasses.replace(phase, global_batch=batch)
            if last and phase.warmup_steps > phase.offset + phase.steps:
                key = f"phases[{i}].warmup_epochs" if cfg.phases else "schedule.warmup_epochs"
                raise ConfigError(f"{key} ({pc.warmup_epochs} epochs = {phase.warmup_steps} steps) is longer "
                                  f"than its phase ({phase.offset + phase.steps} steps)")
            phases.append(phase)
        elapsed = finish
    return phases
