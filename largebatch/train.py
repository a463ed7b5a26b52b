"""The training loop: set up, resume, then step / log / evaluate / checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import adaptive_batch, autotune, checkpoint, dist, ensemble, grad_sync, malloc, noise_scale, runlog
from .config import Config, ConfigError, TrainConfig, dump_yaml, to_dict
from .errors import Diverged, UserError
from .rundir import RunLock, open_run_dir
from .data import build_dataset, data_channels, data_image_size, default_workers, make_loader, model_input, shards
from .data.sampler import GlobalBatchSampler
from .dist import Layout, resolve_layout
from .evaluate import evaluate
from .log_window import LogWindow
from .noise_scale import NoiseScale
from .preempt import StopRequest
from .models import TORCHVISION, build_model, group_bn, model_channels
from .optim import apply_schedule, build_optimizer
from .optim.schedule import build_phases, lr_at, phase_at
from .runlog import MetricsLog, environment, summary_table, write_json, write_text


def pick_device(info: dist.DistInfo) -> torch.device:
    """One GPU per process where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        if info.local_world_size > torch.cuda.device_count():
            # NCCL refuses two ranks on one GPU, and only after every rank has started.
            raise UserError(f"{info.local_world_size} processes on this host but {torch.cuda.device_count()} "
                            f"GPU(s): start one process per GPU (torchrun --nproc_per_node "
                            f"{torch.cuda.device_count()}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
                            f"train on the CPU")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bn_groups_hint(device: torch.device, group: int, sync: bool, micro_batch: int) -> str | None:
    """A line for GPU runs whose micro-batch is normalised in several BN groups: what the
    groups cost there, and the setting that trades their layout independence for speed."""
    if device.type != "cuda" or sync or not group or micro_batch <= group:
        return None
    return (f"largebatch: BN over groups of {group} samples keeps training independent of the process "
            f"layout, and on a GPU runs at about a third of the step rate of plain BN (docs/BENCHMARKS.md, GPU); "
            f"--set model.bn_group_size=0 normalises each micro-batch of {micro_batch} instead")


def prepare_process(t: TrainConfig, info: dist.DistInfo) -> None:
    """This process's threads (train.threads, else OMP_NUM_THREADS, else its share of the
    node's cores) and allocator (train.keep_freed_memory)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(t.threads or (omp.isdigit() and int(omp)) or
                          max(1, dist.usable_cores() // info.local_world_size))
    if t.keep_freed_memory:
        malloc.keep_freed_memory()


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """train.deterministic, on a GPU (CPU kernels are deterministic)."""
    if device.type != "cuda":
        return
    if deterministic:  # cuBLAS reduces in a fixed order only with a fixed workspace; read at its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@dataclass
class Run:
    """Everything the loop needs, built once by setup()."""
    cfg: Config
    out: Path
    device: torch.device
    info: dist.DistInfo
    layout: Layout              # of the current step: phases may change the global batch
    model: torch.nn.Module      # the bare model (checkpoints, eval)
    optimizer: torch.optim.Optimizer
    sampler: GlobalBatchSampler
    train_set: object
    val_set: object
    phases: list
    total_steps: int
    workers: int
    lock: RunLock
    layouts: dict               # every global batch the run may take -> its layout
    sync: grad_sync.Bucketed | grad_sync.Exact | None = None  # built on the loaded weights
    loss_fn: torch.nn.Module | None = None
    batches: object = None      # this process's micro-batches from `start` on
    start: int = 0              # the first step (after a resume, the checkpoint's)
    wall_before: float = 0.0    # wall seconds the run had spent before `start`
    noise: NoiseScale | None = None
    window_state: dict | None = None  # the log window a checkpoint fell inside
    skipped: set = field(default_factory=set)  # unreadable training files met by this process
    decided: dict = field(default_factory=dict)  # adaptive_batch: {whole epoch: global batch from there on}


def _announce(what: str, on: bool, why: str) -> bool:
    """Say on the main process what an automatic choice chose and why; returns the choice."""
    if dist.info().is_main:
        print(f"largebatch: {what} {'on' if on else 'off'}: {why}", flush=True)
    return on


def resolve_auto(cfg: Config, device: torch.device) -> Config:
    """Turn the hardware-dependent defaults (None) into values; config.yaml records them.
    channels_last (for CIFAR-style models) and bf16 (on CPUs that have it) are measured
    (autotune.py), once per machine, on the main process; the memory format first, since
    what bf16 buys depends on it."""
    t = cfg.train
    shape = data_channels(cfg.data), data_image_size(cfg.data), t.micro_batch or t.global_batch
    channels_last = t.channels_last
    if channels_last is None and cfg.model.name in TORCHVISION:
        channels_last = True
    elif channels_last is None:  # timed in the precision the run will most likely take
        likely_bf16 = autotune.native_bf16(device) if t.bf16 is None else t.bf16
        channels_last = _announce("channels_last", *dist.on_main(lambda: autotune.choose_channels_last(
            device, cfg.model, *shape, likely_bf16)))
    bf16 = t.bf16
    if bf16 is None:
        bf16 = _announce("bf16 autocast", *dist.on_main(lambda: autotune.choose_bf16(
            device, cfg.model, *shape, channels_last)))
    return dataclasses.replace(cfg, train=dataclasses.replace(t, bf16=bf16, channels_last=channels_last))


def resolve_compile(cfg: Config, device: torch.device, changes: list, end: int) -> Config:
    """train.compile None: measured for runs long enough to repay it (autotune.py), on the
    main process; `changes` are the (first step, layout) of each batch size, `end` the last step."""
    if cfg.train.compile is not None:
        return cfg
    micro_steps = sum((stop - start) * layout.accum_steps
                      for (start, layout), stop in zip(changes, [c[0] for c in changes[1:]] + [end]))
    on = _announce("torch.compile", *dist.on_main(lambda: autotune.choose_compile(
        device, cfg.model, data_channels(cfg.data), data_image_size(cfg.data), changes[0][1].micro_batch,
        cfg.train.channels_last, cfg.train.bf16, micro_steps)))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=on))


def setup(cfg: Config, out: Path, resume: bool = False, allow_config_change: bool = False) -> Run:
    """A run ready for its first step: the process group joined, data and model built,
    the run directory locked, the newest intact checkpoint loaded on --resume, the
    gradient sync built on the loaded weights, the run recorded in OUT."""
    run = build(cfg, out)
    try:
        start_run(run, resume, allow_config_change)
        run.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=run.cfg.optim.label_smoothing)
        start_batches(run, run.start)
    except BaseException:
        run.lock.release()
        raise
    return run


def start_batches(run: Run, step: int) -> None:
    """This process's micro-batches from `step` to the end of the run as now planned."""
    augment_at = lambda s: phase_at(s, run.phases).augment  # noqa: E731
    run.batches = iter(make_loader(run.train_set, run.sampler.micro_batches(step, run.total_steps, augment_at),
                                   run.workers, run.device))


def plan_steps(cfg: Config, num_samples: int, layouts: dict, decided: dict | None = None):
    """(phases in steps, the sampler that follows their global batches), for the batches
    the adaptive control has `decided` so far."""
    sampler = GlobalBatchSampler(num_samples, layouts[cfg.train.global_batch], cfg.train.seed)
    phases = build_phases(cfg, sampler.steps_per_epoch, num_samples, decided)
    changes = [(p.start, layouts[p.global_batch]) for i, p in enumerate(phases)
               if i == 0 or p.global_batch != phases[i - 1].global_batch]
    if len(changes) > 1:  # batch-size control: the sampler follows the phases' batches
        sampler = GlobalBatchSampler(num_samples, changes, cfg.train.seed)
    return phases, sampler


def replan(run: Run) -> None:
    run.phases, run.sampler = plan_steps(run.cfg, len(run.train_set), run.layouts, run.decided)
    run.total_steps = run.phases[-1].end


def build(cfg: Config, out: Path) -> Run:
    """Device, process group, data, model, optimizer and schedule; nothing read or
    written in the run directory yet."""
    info = dist.from_env()
    device = pick_device(info)
    set_determinism(cfg.train.deterministic, device)
    dist.init(device, info, cfg.dist.interface, cfg.dist.connect_timeout_s)
    prepare_process(cfg.train, info)
    cfg = resolve_auto(cfg, device)
    t = cfg.train
    if cfg.adaptive_batch.max_batch and t.micro_batch is None and t.global_batch % info.world_size == 0:
        # as the batch grows, accumulation takes the growth and the micro-batch (memory) stays
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch=t.global_batch // info.world_size))
    # Everything the config alone can reject is rejected before any data is read.
    layout = resolve_layout(cfg.train, info.world_size, info.rank, cfg.model.bn_group_size)
    batches = {*adaptive_batch.candidates(cfg), *(p.global_batch for p in cfg.phases if p.global_batch)}
    layouts = {b: resolve_layout(dataclasses.replace(cfg.train, global_batch=b), info.world_size, info.rank,
                                 cfg.model.bn_group_size) for b in batches}
    if cfg.adaptive_batch.max_batch and noise_scale.batches(layout.world_size, layout.accum_steps,
                                                            layout.micro_batch) is None:
        raise ConfigError("adaptive_batch needs the noise scale, which one process without accumulation "
                          "cannot measure: set train.micro_batch below train.global_batch")
    model_channels(cfg.model, data_channels(cfg.data))
    data = cfg.data
    if data.stage_to:  # one copy per node, by its first process
        if info.local_rank == 0:
            shards.stage(data.path, data.stage_to)
        dist.barrier()
        data = dataclasses.replace(data, path=data.stage_to)
    train_set = build_dataset(data, "train", cfg.train.seed)
    val_set = build_dataset(data, "val", cfg.train.seed)
    phases, sampler = plan_steps(cfg, len(train_set), layouts)
    cfg = resolve_compile(cfg, device, [(s.start, s.layout) for s in sampler.segments], phases[-1].end)
    if cfg.model.num_classes is not None and cfg.model.num_classes < train_set.num_classes:
        raise ConfigError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the data's "
                          f"{train_set.num_classes} classes")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, train_set.channels, train_set.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    hint = bn_groups_hint(device, cfg.model.bn_group_size, cfg.model.sync_bn, layout.micro_batch)
    if hint and info.is_main:
        print(hint, flush=True)
    return Run(cfg=cfg, out=out, device=device, info=info, layout=layout, model=model,
               optimizer=optimizer, sampler=sampler, train_set=train_set, val_set=val_set,
               phases=phases, total_steps=phases[-1].end,
               workers=default_workers(cfg.data, info.local_world_size, device), lock=RunLock(out), layouts=layouts)


class StepPartTimer:
    """Seconds per part of the step (`largebatch bench`); training uses NO_TIMER."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        autotune.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        autotune.synchronize(self.device)
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0


NO_TIMER = lambda part: contextlib.nullcontext()  # noqa: E731


def train_step(run: Run, batches, loss_fn, timer=NO_TIMER) -> torch.Tensor:
    """One optimizer step over accum_steps micro-batches; returns this process's mean loss."""
    lay = run.layout
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=run.device)
    for a in range(lay.accum_steps):
        with timer("data"):
            x, y, skipped = next(batches)
            run.skipped.update(skipped)
            x = model_input(x, run.device, run.cfg.train.channels_last)
            y = y.to(run.device, non_blocking=True)
        with timer("forward"), run.sync.micro_step(a), \
                torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg.train.bf16):
            loss = loss_fn(run.sync.module(x).float(), y)
        with timer("backward"):  # includes the wait for the last gradient buckets
            run.sync.backward(loss)
        total += loss.detach() / lay.accum_steps
    with timer("backward"):
        run.sync.finish()
    with timer("optimizer"):
        run.optimizer.step()
        group_bn.commit_running_stats(run.model)
    return total


def state_dict(run: Run, step: int, extra: dict) -> dict:
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step,
            "epoch": run.sampler.epoch_at(step), "config": to_dict(run.cfg),
            "class_names": list(run.train_set.class_names), **extra}


def save_checkpoint(run: Run, step: int, extra: dict) -> None:
    # the skipped files seen so far travel with the checkpoint, so a resumed run reports them all
    extra = {**extra, "skipped_files": dist.gather_union(run.skipped)}
    dist.on_main(lambda: checkpoint.save(state_dict(run, step, extra), run.out / "checkpoints", step,
                                         run.cfg.train.keep_checkpoints))


def check_finite(run: Run, step: int, loss: float = 0.0) -> None:
    """Stop a diverged run before it evaluates, checkpoints or trains on: a non-finite
    loss, or non-finite weights (which a loss that went bad between logs leaves behind).
    Called where the loop synchronises anyway (logging, evaluation, checkpoints)."""
    tensors = [t for t in (*run.model.parameters(), *run.model.buffers()) if t.is_floating_point()]
    weights = torch.stack([torch.isfinite(t).all() for t in tensors]).all()  # BN statistics too
    if math.isfinite(loss) and bool(weights):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the weights became non-finite"
    good = checkpoint.step_files(run.out / "checkpoints")
    raise Diverged(f"training diverged at step {step} (epoch {run.sampler.epoch_at(step):.2f}): {what}. "
                   f"Nothing was saved from it; the newest checkpoint is "
                   f"{good[-1] if good else 'none'}. Try a lower peak LR (schedule.peak_lr or schedule.base_lr), "
                   f"a longer warmup (schedule.warmup_epochs), or LARS (optim.name=lars)")


def take_snapshot(run: Run, phase, members: ensemble.RunningEnsemble, extra: dict) -> dict:
    """Save the phase's end point as snapshot NN, then evaluate it alone and with the
    earlier snapshots. After a resume the earlier ones are re-read from their files."""
    meta = {"name": phase.name, "snapshot": phase.snapshot, "start": phase.start, "end": phase.end}
    dist.on_main(lambda: checkpoint.atomic_save(state_dict(run, phase.end, {**extra, "phase": meta}),
                                                ensemble.snapshot_path(run.out, phase.snapshot)))
    if members.count < phase.snapshot - 1:
        scratch = build_model(run.cfg.model, run.train_set.channels, run.train_set.num_classes).to(run.device)
        for index in range(members.count + 1, phase.snapshot):
            scratch.load_state_dict(checkpoint.load(ensemble.snapshot_path(run.out, index))["model"])
            members.add(scratch)
    return members.add(run.model)


def train(cfg: Config, out: Path, resume: bool = False, allow_config_change: bool = False) -> dict:
    stop = StopRequest()  # from the start: a signal during set-up stops the run after its first step
    run = None
    try:
        run = setup(cfg, Path(out), resume, allow_config_change)
        loop = Loop(run, stop)
        step = run.start
        while step < run.total_steps:  # the adaptive control may re-plan the steps left
            phase = phase_at(step, run.phases)
            if step == phase.start and phase.reset_momentum:
                run.optimizer.state.clear()  # a cycle restarts from the weights alone
            lr = lr_at(step, run.phases)
            apply_schedule(run.optimizer, lr, phase.weight_decay)
            run.layout = run.sampler.segment_at(step).layout  # phases may change the global batch
            run.sync.accum_steps = run.layout.accum_steps
            loop.window.add(train_step(run, run.batches, run.loss_fn), run.sync.take_sq_norms(),
                            run.sync.take_seconds())
            step += 1
            loop.after_step(phase, step, lr)
        return loop.finish()
    finally:
        stop.restore()
        if run is not None:
            run.lock.release()


def start_run(run: Run, resume: bool, allow_config_change: bool) -> None:
    """Lock the run directory, resume from the newest intact checkpoint when asked, build
    the gradient sync on the loaded weights, and record the run."""
    t, info = run.cfg.train, run.info
    start, wall_before, state = 0, 0.0, {}
    last, changes = dist.on_main(lambda: open_run_dir(run.out, run.cfg, run.lock, resume, allow_config_change))
    if last is not None:
        state = checkpoint.load(last)
        try:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"--resume: {last} holds another model or optimizer than this config builds "
                              f"({str(e).splitlines()[0]})") from None
        start, wall_before = state["step"], state.get("wall_seconds", 0.0)
        run.skipped.update(state.get("skipped_files", []))
        run.decided = {int(epoch): batch for epoch, batch in (state.get("batch_decisions") or {}).items()}
        if run.decided:
            replan(run)
    noise = NoiseScale() if t.noise_scale else None
    if noise and state.get("noise_scale"):
        noise.load_state_dict(state["noise_scale"])
    # DDP starts from rank 0's parameters, so the sync is built on the loaded weights
    run.sync = grad_sync.build(run.model, run.device, run.layout.accum_steps, run.cfg.dist,
                               measure=noise is not None)
    if t.compile:  # the step calls run.sync.module; checkpoints keep using the bare run.model
        run.sync.module = torch.compile(run.sync.module)
    if info.is_main:
        write_text(run.out / "config.yaml", dump_yaml(run.cfg))
        write_json(run.out / "run.json", {
            **environment(), "processes": info.world_size, "accum_steps": run.layout.accum_steps,
            "micro_batch": run.layout.micro_batch, "steps_per_epoch": run.sampler.steps_per_epoch,
            "total_steps": run.total_steps,
            "global_batch_from_step": {s.start: s.layout.global_batch for s in run.sampler.segments},
            "network": dist.network(), "resumed_from_step": start, "resumed_from": str(last) if last else None,
            "config_changes": changes})
        val_skipped = getattr(run.val_set, "skipped_files", [])
        if val_skipped:
            print(f"largebatch: {len(val_skipped)} unreadable validation files are left out of evaluation:\n  " +
                  "\n  ".join(val_skipped[:20]), flush=True)
    run.start, run.wall_before, run.noise = start, wall_before, noise
    run.window_state = state.get("log_window")


class Loop:
    """What the loop carries from step to step, and what it does after each: a log line
    every train.log_every_steps, then the pause points (evaluation, snapshot, checkpoint,
    a stop signal), whose time is kept out of images/s."""

    def __init__(self, run: Run, stop: StopRequest):
        t, start = run.cfg.train, run.start
        self.run, self.stop, self.start, self.noise = run, stop, start, run.noise
        self.log = MetricsLog(run.out / "metrics.jsonl" if run.info.is_main else None,
                              run.out / "tensorboard" if runlog.tensorboard_wanted(t.tensorboard) else None, start)
        self.log.truncate_after(start)  # lines past the checkpoint will be written again
        self.window = LogWindow(run.device, run.noise)
        if run.window_state:
            self.window.load_state_dict(run.window_state)
        self.members = ensemble.RunningEnsemble(run.val_set, t.eval_batch, run.device, run.workers,
                                                bf16=t.bf16, channels_last=t.channels_last)
        self.bar = tqdm(total=run.total_steps, initial=start, disable=None if run.info.is_main else True,
                        unit="step", dynamic_ncols=True)
        self.t0, self.wall_before, self.result = time.perf_counter(), run.wall_before, None

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def extra(self) -> dict:
        """What a checkpoint carries besides weights, optimizer and step (the log window
        costs an all-reduce: only where a checkpoint is written)."""
        return {"wall_seconds": self.wall_seconds(),
                "noise_scale": self.noise.state_dict() if self.noise else None,
                "log_window": self.window.state_dict(), "batch_decisions": dict(self.run.decided)}

    def evaluate(self) -> dict:
        t = self.run.cfg.train
        return evaluate(self.run.model, self.run.val_set, t.eval_batch, self.run.device, self.run.workers,
                        bf16=t.bf16, channels_last=t.channels_last)

    def eval_due(self, done: int) -> bool:
        """Every train.eval_every_epochs, counted in the steps of the current batch size."""
        every_epochs = self.run.cfg.train.eval_every_epochs
        seg = self.run.sampler.segment_at(done - 1)
        every = max(1, int(round(every_epochs * seg.steps_per_epoch)))
        return every_epochs > 0 and (done - seg.start) % every == 0

    def after_step(self, phase, done: int, lr: float) -> None:
        run, t = self.run, self.run.cfg.train
        epoch = run.sampler.epoch_at(done)
        batch_ends = run.sampler.segment_at(done).layout is not run.layout
        decide = adaptive_batch.due(run.cfg, epoch) and done < run.total_steps
        if done % t.log_every_steps == 0 or done == run.total_steps or batch_ends or decide:
            self.log_line(done, epoch, lr)
        if decide:
            self.adapt_batch(done, epoch)
        self.bar.update(1)
        pause_t0 = time.perf_counter()
        is_snapshot = phase.snapshot and done == phase.end
        is_eval = self.eval_due(done) or done == run.total_steps or is_snapshot
        is_ckpt = is_eval or (t.checkpoint_every_steps and done % t.checkpoint_every_steps == 0)
        signum = self.stop.agreed(run.device)
        if is_eval or is_ckpt or signum:
            check_finite(run, done)  # the weights are the same on every process: all agree
        if is_eval:
            self.eval_line(phase if is_snapshot else None, done, epoch, lr)
        if is_ckpt or signum:
            save_checkpoint(run, done, self.extra())
        if signum:
            self.bar.close()
            self.log.write(step=done, epoch=epoch, stopped_by_signal=signum)
            self.log.close()
            if run.info.is_main:
                print(f"largebatch: signal {signum}: checkpoint at step {done} written to "
                      f"{run.out / 'checkpoints'}; continue with --resume", flush=True)
            raise SystemExit(128 + signum)
        self.window.pause(time.perf_counter() - pause_t0)

    def adapt_batch(self, done: int, epoch: float) -> None:
        """adaptive_batch: the global batch from this epoch on, from the noise scale
        measured since the last decision; the steps left are re-planned when it grows."""
        run = self.run
        current = run.sampler.segment_at(done).layout.global_batch
        measured = self.noise.interval_mean()  # validate() requires the noise scale with the control
        a = run.cfg.adaptive_batch
        new = adaptive_batch.next_batch(current, a.max_batch, measured, a.noise_multiple)
        self.noise.start_interval()
        self.log.write(step=done, epoch=epoch, adaptive_batch=new, noise_scale_interval=measured)
        if new == current:
            return
        run.decided[round(epoch)] = new
        replan(run)
        start_batches(run, done)
        self.bar.total = run.total_steps
        if run.info.is_main:
            self.bar.write(f"step {done} epoch {epoch:.0f}: B_simple {measured:.0f} since the last decision: "
                           f"global batch {current} -> {new}")

    def log_line(self, done: int, epoch: float, lr: float) -> None:
        record = self.window.close(self.run.layout, late=2 * done > self.run.total_steps)
        if not math.isfinite(record["loss"]):
            self.log.write(step=done, epoch=epoch, lr=lr, diverged=f"loss {record['loss']}")
            check_finite(self.run, done, record["loss"])
        self.log.write(step=done, epoch=epoch, lr=lr, **record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{record['images_per_sec']:.0f}",
                             **({"B_noise": f"{record['noise_scale']:.0f}"} if record.get("noise_scale") else {}))

    def eval_line(self, snapshot_phase, done: int, epoch: float, lr: float) -> None:
        """Evaluate; at a phase end with a snapshot, save it and evaluate the ensemble too."""
        if snapshot_phase is not None:
            self.result = take_snapshot(self.run, snapshot_phase, self.members, self.extra())
            self.result.update(snapshot=snapshot_phase.snapshot, phase=snapshot_phase.name)
        else:
            self.result = self.evaluate()
        r = self.result
        self.log.write(step=done, epoch=epoch, lr=lr, eval=True, **r)
        if self.run.info.is_main:
            ens = (f"; snapshot {r['snapshot']} ({r['phase']}), ensemble of {r['ensemble_members']}: "
                   f"top-1 {r['ensemble_top1']:.4f}" if snapshot_phase is not None else "")
            self.bar.write(f"step {done} epoch {epoch:.2f}: top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}{ens}")

    def finish(self) -> dict:
        run, info, sampler = self.run, self.run.info, self.run.sampler
        self.bar.close()
        self.log.close()
        result = self.result or self.evaluate()  # resumed at the end: evaluate the final weights
        final = sampler.segments[-1].layout
        train_seconds = max(time.perf_counter() - self.t0 - self.window.paused, 1e-9)
        summary = {"top1": result["top1"], "top5": result["top5"], "epochs": sampler.epoch_at(run.total_steps),
                   "steps": run.total_steps, "global_batch": final.global_batch,
                   "global_batches": [s.layout.global_batch for s in sampler.segments],
                   **({"batch_decisions": {str(e): b for e, b in sorted(run.decided.items())}}
                      if run.cfg.adaptive_batch.max_batch else {}),
                   "processes": info.world_size, "accum_steps": final.accum_steps, "micro_batch": final.micro_batch,
                   "images_per_sec": sampler.images(self.start, run.total_steps) / train_seconds,
                   "wall_seconds": self.wall_seconds(), "skipped_files": dist.gather_union(run.skipped),
                   "val_skipped_files": getattr(run.val_set, "skipped_files", []), **noise_scale.summary(self.noise)}
        snapshots = [line for line in self.log.read() if "snapshot" in line]
        if snapshots:
            summary["snapshots"] = [{k: line[k] for k in ("snapshot", "phase", "step", "top1", "top5",
                                                         "ensemble_top1", "ensemble_top5")} for line in snapshots]
            summary["ensemble_top1"] = snapshots[-1]["ensemble_top1"]
            summary["ensemble_top5"] = snapshots[-1]["ensemble_top5"]
        if info.is_main:
            write_json(run.out / "summary.json", summary)
            print(f"\nlargebatch: {run.out}\n{summary_table(summary)}", flush=True)
            if summary["skipped_files"]:
                print(f"largebatch: {len(summary['skipped_files'])} unreadable training files were skipped "
                      f"(each replaced by the next readable sample; listed in summary.json):\n  " +
                      "\n  ".join(summary["skipped_files"][:20]), flush=True)
        dist.barrier()
        return summary
