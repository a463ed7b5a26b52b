"""Typed configuration, one dataclass per concern.

A recipe is YAML whose keys mirror these dataclasses; `--set a.b=v` overrides one
field. Every key is declared here: unknown keys and values of the wrong type are
rejected with the full key path, before anything trains.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A bad recipe, override or combination of values; the message names the key."""


# YAML 1.1 (PyYAML) reads 1e-3 and 5e-4 as strings: they need a dot to be floats there.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "resnet8"
    """torchvision ResNet (resnet18/34/50/101/152) or CIFAR-style resnet8/20/32/56."""
    in_channels: int | None = None
    """Input channels; None takes the data's. torchvision ResNets take 3."""
    num_classes: int | None = None
    """None takes the data's class count."""
    zero_init_gamma: Literal["none", "all", "last_per_stage"] = "all"
    """Zero the last BN gamma of every residual block (Goyal et al.), or only in the
    last block of each stage (the SC18 authors' released nets)."""
    bn_momentum: float = 0.1
    """PyTorch convention: weight of the new statistic. The authors' Caffe 0.95
    ('fraction kept') is 0.05 here."""
    bn_group_size: int = 32
    """BatchNorm statistics over fixed groups of this many samples, taken by position
    in the global batch, so every process layout computes the same thing.
    0 = the whole micro-batch."""
    sync_bn: bool = False
    """SyncBN: statistics over the micro-batches of all processes together (needs
    bn_group_size=0). The result then depends on the process layout."""
    fuse_bn_relu: bool = True
    """Each batch norm that a ReLU follows, and the ReLU, as one kernel pair where one
    applies (CPU training in bf16 and channels_last; models/bn_relu.py). false: always
    torch's separate kernels."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    name: Literal["fmnist", "folder", "shards", "synthetic"] = "fmnist"
    path: str | None = None
    """Dataset directory; None = the dataset's default (see docs/usage.md). For shards,
    the output of `largebatch pack`."""
    stage_to: str | None = None
    """Shards only: copy them to this node-local directory first (once per node)."""
    strict: bool = False
    """Stop at the first unreadable image, naming it, instead of skipping and reporting it."""
    download: bool = False
    """Fashion-MNIST only: fetch the IDX files when missing (needs internet)."""
    augment: bool = True
    """Train-time augmentation (random-area crop + flip; pad-crop + flip for 28 px)."""
    image_size: int = 224
    """Train crop size for folder data."""
    eval_resize: int = 256
    eval_samples: int = 0
    """Evaluate on the first this many validation samples only; 0 = all."""
    eval_crop: int = 224
    min_area: float = 0.08
    max_area: float = 1.0
    min_aspect: float = 0.75
    max_aspect: float = 1.3333333333333333
    workers: int = -1
    """DataLoader worker processes per training process; -1 = choose by dataset."""
    synthetic_samples: int = 1024
    synthetic_classes: int = 1000
    synthetic_channels: int = 3
    synthetic_size: int = 224


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Literal["sgd", "lars", "lamb"] = "sgd"
    """sgd (with momentum), lars (You et al. 2017) or lamb (You et al. 2019: Adam's update
    with the trust ratio; `momentum` and `nesterov` do not apply, lamb_beta1/2 do)."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    exclude_bn_bias_from_wd: bool = False
    """No weight decay on BatchNorm parameters and biases (chosen by module type)."""
    lars_trust: float = 0.001
    lars_eps: float = 1e-9
    lamb_beta1: float = 0.9
    lamb_beta2: float = 0.999
    lamb_eps: float = 1e-6
    label_smoothing: float = 0.0


@dataclass(kw_only=True, slots=True)
class ShapeConfig:
    """The LR's shape over a stretch of training: the whole run (`schedule`) or one of
    its `phases`. LR values are multiples of the peak LR, so a shape keeps its form when
    the global batch, and with it the peak, changes."""
    warmup_epochs: float = 0.0
    """Linear warmup from warmup_start to the peak over the first epochs."""
    warmup_start: float = 0.0
    """LR at the start of warmup, as a multiple of the peak (Goyal et al. start at the
    small-batch LR: 0.1 of a peak of 3.2 is 0.03125)."""
    decay: Literal["poly", "cosine", "linear", "step", "constant"] = "poly"
    poly_power: float = 1.0
    horizon_epochs: float | None = None
    """Where poly/cosine reach their end, counted from the start of the stretch; None =
    its length."""
    final: float = 0.0
    """Where cosine and linear decay end, as a multiple of the peak."""
    milestones: list[float] = field(default_factory=list)
    """Step decay: epochs from the start of the stretch at which the LR is multiplied by gamma."""
    gamma: float = 0.1


SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(ShapeConfig))


@dataclass(kw_only=True, slots=True)
class ScheduleConfig(ShapeConfig):
    """The LR rule (what the peak LR is) and, when the recipe has no `phases`, the shape
    of the whole run: a single schedule is one phase."""
    base_lr: float = 0.1
    """LR at reference_batch; the peak LR is base_lr * (global_batch / reference_batch),
    to the power 1 (linear rule) or 1/2 (square-root rule)."""
    reference_batch: int = 256
    scaling: Literal["linear", "sqrt"] = "linear"
    """How the peak LR follows the batch: linear (Goyal et al.) or square root (keeps the
    update's noise constant; often better past the critical batch, docs/RESULTS.md)."""
    peak_lr: float | None = None
    """Explicit peak LR instead of the rule (the SC18 authors used 4.8 at 14,336); batch
    phases scale it by the rule relative to train.global_batch."""


@dataclass(kw_only=True, slots=True)
class PhaseConfig(ShapeConfig):
    """One phase of a phased schedule (main, cycle, collapse), with the shape keys of
    `schedule` and the same meaning, counted from the phase start."""
    name: str = "phase"
    epochs: float = 1.0
    peak: float = 1.0
    """This phase's peak as a multiple of the recipe's peak LR."""
    weight_decay: float | None = None
    """None = optim.weight_decay."""
    augment: bool | None = None
    """Train augmentation in this phase; None = data.augment."""
    reset_momentum: bool = False
    """Start the phase with empty momentum buffers (the authors restarted each cycle)."""
    snapshot: bool = True
    """Save OUT/snapshots/NN.pt at the phase end and add it to the ensemble."""
    global_batch: int | None = None
    """This phase's global batch (batch-size control); None = train.global_batch. The
    batch may change only where a whole epoch ends, so every sample is still seen once
    per epoch; train.micro_batch, when set, stays, and accumulation takes the change."""
    scale_lr: bool = True
    """Scale this phase's LR with its batch (the recipe's rule, relative to
    train.global_batch); false keeps the LR of train.global_batch, so a larger batch
    stands in for a smaller LR (Smith et al. 2018)."""


@dataclass(kw_only=True, slots=True)
class EnsembleConfig:
    """Generator of a Collapsed Ensemble schedule from any recipe: the epoch budget is
    split into a main phase (the recipe's own schedule, cut short), `cycles` LR cycles
    and a collapse, following the pattern of the SC18 authors' run B."""
    cycles: int = 0
    """0 = off (the recipe's `phases`, or its single schedule)."""
    main_fraction: float = 0.5
    collapse_fraction: float = 0.1
    """0 = no collapse phase."""
    first_peak: float = 1.1
    """Cycle 1 peak, as a multiple of the LR where the main phase was cut (run B: 1.02 / 0.93)."""
    peak_decay: float = 0.75
    """Each cycle's peak is this times the previous one."""
    rewarmup_fraction: float = 0.2
    """Cycles after the first re-warm up over this fraction of their length, from where the
    previous cycle ended."""
    cycle_shape: Literal["sc18", "cosine", "fge"] = "sc18"
    """sc18: the authors' run B (poly over twice the cycle, re-warmup, momentum reset);
    cosine: every cycle anneals from its peak to near zero (Huang et al. 2017, snapshot
    ensembles); fge: short cycles, each a straight line from its peak down to
    fge_low times the peak (Garipov et al. 2018, fast geometric ensembling)."""
    cycle_power: float = 2.0
    """sc18 cycles decay as poly with this power over twice their length (ending at peak/4)."""
    fge_low: float = 0.01
    """fge: where each cycle ends, as a fraction of its peak (Garipov et al.: 5e-4 / 5e-2)."""
    collapse_weight_decay: float = 4.0
    """Collapse weight decay as a multiple of optim.weight_decay (run B: 2e-4 / 5e-5)."""
    collapse_augment: bool = False


@dataclass(kw_only=True, slots=True)
class AdaptiveBatchConfig:
    """Batch-size control from the measured gradient noise scale, as AdaptDL grows its
    batch, with a simpler rule: every `every_epochs` epochs the global batch doubles while
    the doubled batch stays within max_batch and at or below B_simple measured since the
    last decision. At B = B_simple a step does about half the work of one with the true
    gradient (McCandlish et al. 2018), so each doubling still cuts the steps by at least
    a third. The batch never shrinks; the LR follows it by schedule.scaling, and the
    schedule's shape runs over epochs as without the control."""
    max_batch: int = 0
    """The largest global batch the run may grow to (train.global_batch times a power of
    two); 0 = off."""
    every_epochs: int = 1
    """Whole epochs between decisions."""
    noise_multiple: float = 1.0
    """Grow while the doubled batch is at most this times B_simple. 1 spends the fewest
    samples per unit of progress; larger values trade samples for fewer steps, which a
    fixed epoch budget rewards (docs/RESULTS.md, batch-size control)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    global_batch: int = 1024
    micro_batch: int | None = None
    """Per-process batch per forward; None = global_batch / processes (no accumulation)."""
    epochs: float = 10.0
    steps: int | None = None
    """Run length in optimizer steps; overrides epochs when set."""
    seed: int = 0
    bf16: bool | None = None
    """bf16 autocast. None = on for GPUs that support it, and on CPUs with bf16
    instructions (AVX512-BF16, AMX) where a timing of the run's model in both precisions
    says bf16 is faster (autotune.py; once per machine, cached): some such CPUs run bf16
    matrix products at half their fp32 rate (docs/BENCHMARKS.md)."""
    channels_last: bool | None = None
    """NHWC memory format. None = on for torchvision's ResNets, whose wide convolutions
    gain from it; for the CIFAR-style ones measured (autotune.py; once per machine,
    cached): their narrow convolutions gain about 3x on some CPUs and lose on others
    (docs/BENCHMARKS.md)."""
    compile: bool | None = None
    """torch.compile the model. None = measured: a run estimated at over 20 minutes eager
    has the compiled model timed beside the eager one (once per machine, model and shape,
    cached; autotune.py) and compiles when that is at least 10 % faster and saves 3 times
    the compile time; shorter runs stay eager. What it buys differs by machine and model
    (docs/BENCHMARKS.md)."""
    threads: int = 0
    """torch threads per process; 0 = OMP_NUM_THREADS if set, else the cores this process
    may use / processes on this node."""
    keep_freed_memory: bool = True
    """Keep freed memory in the process rather than returning it to the kernel after
    every step (glibc's malloc; largebatch/malloc.py). False = the C library's default."""
    deterministic: bool = True
    """On a GPU: cuDNN's deterministic algorithms and torch's deterministic kernels (a
    warning names any operation that has none), so that a resumed run, or the same run
    twice, matches to the bit, as on CPUs, whose kernels are deterministic anyway.
    False = cuDNN times its algorithms per shape and takes the fastest (benchmark mode),
    whose results differ from run to run (docs/BENCHMARKS.md, "GPU")."""
    eval_every_epochs: float = 1.0
    eval_batch: int = 500
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    """0 = at each eval and at the end only."""
    keep_checkpoints: int = 2
    tensorboard: bool | None = None
    """Also write the metrics as TensorBoard scalars to OUT/tensorboard. None = when the
    tensorboard package is installed (pip install 'largebatch[tensorboard]')."""
    noise_scale: bool = True
    """Measure the gradient noise scale (noise_scale.py) where the layout has two batch
    sizes: several processes, or one process with accumulation."""


@dataclass(kw_only=True, slots=True)
class DistConfig:
    allreduce_bf16: bool = False
    """All-reduce gradients in bf16 (half the bytes; the sum is rounded to bf16)."""
    bucket_mb: float = 25.0
    """DDP gradient bucket size: buckets are all-reduced while backward goes on."""
    interface: str = "auto"
    """Network interface for the collectives (gloo, NCCL sockets): "auto" = the one
    that reaches the rendezvous host (MASTER_ADDR); or a name such as eth0. An exported
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME wins over both."""
    connect_timeout_s: float = 120.0
    """How long a process tries to reach the rendezvous host before it gives up with a
    message naming it."""
    powersgd_rank: int = 0
    """Compress the all-reduce with PowerSGD (Vogels et al. 2019; torch's DDP hook) at this
    rank: each gradient matrix is sent as two thin factors, with error feedback. 0 = off.
    For slow links. The compressed gradients depend on the process layout, and each
    process's error feedback (the size of the gradients) is not checkpointed, so a resumed
    run continues from the checkpoint but is not bitwise the uninterrupted one; the
    gradient noise scale then reads the compressed mean."""
    powersgd_start_steps: int = 100
    """Optimizer steps of plain all-reduce before PowerSGD starts (again after a resume)."""
    exact_reduction: bool = False
    """Sum micro-batch gradients in fp64 across micro-steps and processes, so that every
    process layout computes the same weights to the last bit (fp32 sums round in an
    order that depends on the layout, and training amplifies that). Costs twice the
    gradient bytes and gives up overlapping communication with backward."""


@dataclass(kw_only=True, slots=True)
class Config:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    """A phased schedule (main, cycles, collapse); empty = the single `schedule`."""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    adaptive_batch: AdaptiveBatchConfig = field(default_factory=AdaptiveBatchConfig)


# --- building from dicts, with type checks ------------------------------------------

def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


# Keys of earlier versions, with what replaces them.
RENAMED = {
    "schedule.warmup_start_lr": "schedule.warmup_start, now a multiple of the peak LR like the "
                                "phases' warmup_start (a start of 0.1 at a peak of 0.4 is 0.25)",
    "schedule.final_lr": "schedule.final, now a multiple of the peak LR like the phases' final",
}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if prefix + key in RENAMED:
            raise ConfigError(f"{prefix}{key} is no longer a key: use {RENAMED[prefix + key]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict:
    """'a.b=v' -> {'a': {'b': v}}; v is read as YAML so numbers, bools and lists work."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot read the value {raw!r} ({getattr(e, 'problem', None) or e})") from None
    out: dict = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"--set: bad key {key!r}")
        out = {part: out}
    return out


def build_config(recipe: dict, overrides: list[str] = ()) -> Config:
    data = recipe
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    cfg = from_dict(Config, data)
    validate(cfg)
    unused = unused_shape(cfg)
    if unused:
        print(f"largebatch: note: the phases define the LR's shape, each with its own keys; not used and "
              f"reset: {', '.join(unused)}", file=sys.stderr, flush=True)
    return cfg


def unused_shape(cfg: Config) -> list[str]:
    """With phases, the schedule's own shape keys (often inherited from a base recipe)
    have no effect: reset them, so that config.yaml shows what the run uses."""
    if not cfg.phases:
        return []
    default, unused = ShapeConfig(), []
    for key in SHAPE_KEYS:
        if getattr(cfg.schedule, key) != getattr(default, key):
            unused.append(f"schedule.{key}={getattr(cfg.schedule, key)}")
            setattr(cfg.schedule, key, getattr(default, key))
    return unused


def validate(cfg: Config) -> None:
    """Checks that need no knowledge of the process layout or the data."""
    t, s, o, m, d = cfg.train, cfg.schedule, cfg.optim, cfg.model, cfg.data

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(t.global_batch > 0, f"train.global_batch must be positive, got {t.global_batch}")
    need(t.micro_batch is None or t.micro_batch > 0, f"train.micro_batch must be positive, got {t.micro_batch}")
    need(t.epochs > 0, f"train.epochs must be positive, got {t.epochs}")
    need(t.steps is None or t.steps > 0, f"train.steps must be positive, got {t.steps}")
    need(t.eval_every_epochs >= 0, "train.eval_every_epochs must be >= 0")
    need(t.log_every_steps > 0, "train.log_every_steps must be positive")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    need(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0")
    need(t.eval_batch > 0, "train.eval_batch must be positive")
    need(s.base_lr >= 0, f"schedule.base_lr must be >= 0, got {s.base_lr}")
    need(s.peak_lr is None or s.peak_lr >= 0, f"schedule.peak_lr must be >= 0, got {s.peak_lr}")
    need(s.warmup_start >= 0, f"schedule.warmup_start must be >= 0, got {s.warmup_start}")
    need(s.final >= 0, f"schedule.final must be >= 0, got {s.final}")
    need(s.reference_batch > 0, "schedule.reference_batch must be positive")
    need(s.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0")
    need(s.horizon_epochs is None or s.horizon_epochs > 0, "schedule.horizon_epochs must be positive")
    need(s.poly_power > 0, "schedule.poly_power must be positive")
    need(list(s.milestones) == sorted(s.milestones), "schedule.milestones must be increasing")
    need(s.decay != "step" or bool(s.milestones), "schedule.milestones: step decay needs at least one milestone")
    need(o.momentum >= 0 and o.weight_decay >= 0, "optim.momentum and optim.weight_decay must be >= 0")
    need(0 <= o.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)")
    need(o.lars_trust > 0, "optim.lars_trust must be positive")
    need(not (cfg.phases and cfg.ensemble.cycles), "phases and ensemble.cycles both define the schedule; "
         "keep one of them")
    if cfg.phases:
        total = sum(p.epochs for p in cfg.phases)
        need(t.steps is None, "train.steps cannot be combined with phases: the phases give the length in epochs")
        need(abs(total - t.epochs) < 1e-6, f"phases last {total:g} epochs but train.epochs is {t.epochs:g}; "
             f"make them agree")
    for i, p in enumerate(cfg.phases):
        need(p.epochs > 0, f"phases[{i}].epochs must be positive")
        need(0 <= p.warmup_epochs <= p.epochs, f"phases[{i}].warmup_epochs must be within the phase")
        need(p.peak >= 0 and p.warmup_start >= 0, f"phases[{i}]: peak and warmup_start must be >= 0")
        need(p.global_batch is None or p.global_batch > 0, f"phases[{i}].global_batch must be positive")
    a = cfg.adaptive_batch
    if a.max_batch:
        need(a.max_batch > t.global_batch and a.max_batch % t.global_batch == 0
             and (a.max_batch // t.global_batch) & (a.max_batch // t.global_batch - 1) == 0,
             f"adaptive_batch.max_batch ({a.max_batch}) must be train.global_batch ({t.global_batch}) "
             f"times a power of two; 0 turns the control off")
        need(a.every_epochs >= 1, "adaptive_batch.every_epochs must be at least 1")
        need(a.noise_multiple > 0, f"adaptive_batch.noise_multiple must be positive, got {a.noise_multiple}")
        need(t.noise_scale, "adaptive_batch follows the measured noise scale; it needs train.noise_scale=true")
        need(t.steps is None, "adaptive_batch: give the run's length in train.epochs (its steps depend on the "
             "batches it chooses)")
        need(not any(p.global_batch for p in cfg.phases), "adaptive_batch chooses the global batch; "
             "remove global_batch from the phases, or set adaptive_batch.max_batch=0")
    e = cfg.ensemble
    need(e.cycles >= 0, "ensemble.cycles must be >= 0")
    need(0 < e.main_fraction and 0 <= e.collapse_fraction and e.main_fraction + e.collapse_fraction < 1,
         "ensemble.main_fraction and collapse_fraction must leave room for the cycles (sum < 1)")
    need(d.eval_samples >= 0, "data.eval_samples must be >= 0")
    need(d.workers >= -1, f"data.workers must be >= 0, or -1 to choose by dataset; got {d.workers}")
    need(d.image_size > 0 and d.eval_resize > 0 and d.eval_crop > 0,
         "data.image_size, data.eval_resize and data.eval_crop must be positive")
    need(t.threads >= 0, f"train.threads must be >= 0 (0 = this process's share of the cores), got {t.threads}")
    need(not d.stage_to or d.name == "shards", "data.stage_to copies packed shards; it needs data.name=shards")
    need(m.bn_group_size >= 0, "model.bn_group_size must be >= 0")
    need(not m.sync_bn or m.bn_group_size == 0,
         "model.sync_bn normalises over all processes' micro-batches; set model.bn_group_size=0 with it")
    need(0 <= m.bn_momentum <= 1, "model.bn_momentum must be in [0, 1]")
    dc = cfg.dist
    need(dc.powersgd_rank >= 0 and dc.powersgd_start_steps >= 2,
         "dist.powersgd_rank must be >= 0 and dist.powersgd_start_steps >= 2")
    need(not dc.powersgd_rank or not (dc.exact_reduction or dc.allreduce_bf16),
         "dist.powersgd_rank compresses the bucketed all-reduce; it cannot be combined with "
         "dist.exact_reduction or dist.allreduce_bf16")
    need(0 < d.min_area <= d.max_area <= 1, "data.min_area/max_area must satisfy 0 < min <= max <= 1")
    need(0 < d.min_aspect <= d.max_aspect, "data.min_aspect/max_aspect must satisfy 0 < min <= max")
    if t.steps is None and s.warmup_epochs > t.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({s.warmup_epochs}) is longer than training "
                          f"(train.epochs = {t.epochs})")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
