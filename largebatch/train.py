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

from . import checkpoint, dist, ensemble, grad_sync
from .config import Config, ConfigError, dump_yaml, to_dict
from .errors import Diverged
from .rundir import RunLock, config_changes, diff_lines
from .data import build_dataset, data_channels, default_workers, make_loader, model_input, shards
from .data.sampler import GlobalBatchSampler
from .dist import Layout, resolve_layout
from .evaluate import evaluate
from .log_window import LogWindow
from .noise_scale import NoiseScale
from .preempt import StopRequest
from .models import TORCHVISION, build_model, group_bn, model_channels
from .optim import apply_schedule, build_optimizer
from .optim.schedule import build_phases, phase_at, phase_lr
from .runlog import MetricsLog, environment, summary_table, write_json, write_text


def pick_device(info: dist.DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_threads(requested: int, info: dist.DistInfo) -> int:
    """train.threads, else OMP_NUM_THREADS, else this process's share of its cores."""
    cores = dist.usable_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = requested or (omp.isdigit() and int(omp)) or max(1, cores // info.local_world_size)
    torch.set_num_threads(threads)
    return threads


@dataclass
class Run:
    """Everything the loop needs, built once."""
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
    sync: grad_sync.Bucketed | grad_sync.Exact | None = None  # set once the weights are loaded
    skipped: set = field(default_factory=set)  # unreadable training files met by this process


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no way to ask, stay in fp32
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_auto(cfg: Config, device: torch.device) -> Config:
    """Turn the hardware-dependent defaults (None) into values; config.yaml records them."""
    t = cfg.train
    bf16 = native_bf16(device) if t.bf16 is None else t.bf16
    channels_last = cfg.model.name in TORCHVISION if t.channels_last is None else t.channels_last
    return dataclasses.replace(cfg, train=dataclasses.replace(t, bf16=bf16, channels_last=channels_last))


def setup(cfg: Config, out: Path) -> Run:
    info = dist.from_env()
    device = pick_device(info)
    cfg = resolve_auto(cfg, device)
    dist.init(device, info)
    set_threads(cfg.train.threads, info)
    # Everything the config alone can reject is rejected before any data is read.
    layout = resolve_layout(cfg.train, info.world_size, info.rank, cfg.model.bn_group_size)
    layouts = {b: resolve_layout(dataclasses.replace(cfg.train, global_batch=b), info.world_size, info.rank,
                                 cfg.model.bn_group_size)
               for b in {layout.global_batch, *(p.global_batch for p in cfg.phases if p.global_batch)}}
    model_channels(cfg.model, data_channels(cfg.data))
    data = cfg.data
    if data.stage_to:  # one copy per node, by its first process
        if info.local_rank == 0:
            shards.stage(data.path, data.stage_to)
        dist.barrier()
        data = dataclasses.replace(data, path=data.stage_to)
    train_set = build_dataset(data, "train", cfg.train.seed)
    val_set = build_dataset(data, "val", cfg.train.seed)
    sampler = GlobalBatchSampler(len(train_set), layout, cfg.train.seed)
    phases = build_phases(cfg, sampler.steps_per_epoch, len(train_set))
    changes = [(p.start, layouts[p.global_batch]) for i, p in enumerate(phases)
               if i == 0 or p.global_batch != phases[i - 1].global_batch]
    if len(changes) > 1:  # batch-size control: the sampler follows the phases' batches
        sampler = GlobalBatchSampler(len(train_set), changes, cfg.train.seed)
    if cfg.model.num_classes is not None and cfg.model.num_classes < train_set.num_classes:
        raise ConfigError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the data's "
                          f"{train_set.num_classes} classes")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, train_set.channels, train_set.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    return Run(cfg=cfg, out=out, device=device, info=info, layout=layout, model=model,
               optimizer=optimizer, sampler=sampler, train_set=train_set, val_set=val_set,
               phases=phases, total_steps=phases[-1].end,
               workers=default_workers(cfg.data, info.local_world_size))


class PhaseTimer:
    """Seconds per part of the step (`largebatch bench`); training uses NO_TIMER."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
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


def tensorboard_wanted(setting: bool | None) -> bool:
    if setting is not None:
        return setting
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def noise_summary(noise: NoiseScale | None) -> dict:
    last = noise.current() if noise is not None else {}
    if not last:
        return {"noise_scale": None, "noise_scale_note": "not measured: one process without accumulation has one "
                "batch size only (set train.micro_batch below the global batch to measure it)"}
    return {"noise_scale": noise.run_mean(), "noise_scale_final": last["noise_scale"],
            "grad_sq": last["grad_sq"], "trace_cov": last["trace_cov"], "noise_batches": last["noise_batches"]}


def open_run_dir(run: Run, lock: RunLock, resume: bool, allow_change: bool) -> tuple[Path | None, dict]:
    """Main process only: lock OUT, clear the debris of killed saves, and on --resume
    choose the newest intact checkpoint and hold the config to the run's own.
    Returns (checkpoint to resume from or None, config changes accepted)."""
    say = lambda msg: print(f"largebatch: {msg}", flush=True)  # noqa: E731
    taken_over = lock.acquire()
    if taken_over:
        say(f"{run.out}: {taken_over}")
    ckpt_dir = run.out / "checkpoints"
    for p in checkpoint.remove_partial(ckpt_dir) + checkpoint.remove_partial(run.out / "snapshots"):
        say(f"removed {p.name}, the partial file of a save that did not finish")
    if not resume:
        return None, {}
    path, _, passed = checkpoint.newest_intact(ckpt_dir)
    for line in passed:
        say(f"--resume: passing over {line}")
    if path is None:
        if passed:
            raise checkpoint.CheckpointError(
                f"--resume: no intact checkpoint in {ckpt_dir} ({len(passed)} damaged); not starting from step 0 "
                f"over them: move them away to start afresh, or choose another --out")
        return None, {}
    saved = run.out / "config.yaml"
    allowed, refused = config_changes(saved.read_text(), to_dict(run.cfg)) if saved.exists() else ({}, {})
    if refused and not allow_change:
        raise ConfigError(f"--resume: the config differs from {saved} in keys that change what is trained: "
                          f"{diff_lines(refused)}. Start a new run with another --out, or pass "
                          f"--allow-config-change to continue anyway (it is recorded in run.json)")
    if allowed or refused:
        say(f"--resume: config changes: {diff_lines({**allowed, **refused})}")
    return path, {k: list(v) for k, v in {**allowed, **refused}.items()}


def take_snapshot(run: Run, phase, members: ensemble.RunningEnsemble, extra: dict) -> dict:
    """Save the phase's end point as snapshot NN, then evaluate it alone and with the
    earlier snapshots. After a resume the earlier ones are re-read from their files."""
    meta = {"name": phase.name, "snapshot": phase.snapshot, "start": phase.start, "end": phase.end}
    dist.on_main(lambda: checkpoint.atomic_save(state_dict(run, phase.end, {**extra, "phase": meta}),
                                                ensemble.snapshot_path(run.out, phase.snapshot)))
    if members.members < phase.snapshot - 1:
        scratch = build_model(run.cfg.model, run.train_set.channels, run.train_set.num_classes).to(run.device)
        for index in range(members.members + 1, phase.snapshot):
            scratch.load_state_dict(checkpoint.load(ensemble.snapshot_path(run.out, index))["model"])
            members.add(scratch)
    return members.add(run.model)


def train(cfg: Config, out: Path, resume: bool = False, allow_config_change: bool = False) -> dict:
    out = Path(out)
    run = setup(cfg, out)
    lock, stop = RunLock(out), StopRequest()
    try:
        return _train(run, lock, stop, resume, allow_config_change)
    finally:
        stop.restore()
        lock.release()


def _train(run: Run, lock: RunLock, stop: StopRequest, resume: bool, allow_config_change: bool) -> dict:
    cfg, out = run.cfg, run.out  # with the hardware-dependent defaults resolved
    t, info, sampler = cfg.train, run.info, run.sampler
    start, wall_before = 0, 0.0
    last, changes = dist.on_main(lambda: open_run_dir(run, lock, resume, allow_config_change))
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
    noise = NoiseScale() if t.noise_scale else None
    if noise and last is not None and state.get("noise_scale"):
        noise.load_state_dict(state["noise_scale"])
    run.sync = grad_sync.build(run.model, run.device, run.layout.accum_steps, cfg.dist, measure=noise is not None)
    if t.compile:  # the step calls run.sync.module; checkpoints keep using the bare run.model
        run.sync.module = torch.compile(run.sync.module)
    if info.is_main:
        write_text(out / "config.yaml", dump_yaml(cfg))
        write_json(out / "run.json", {**environment(), "processes": info.world_size,
                                      "accum_steps": run.layout.accum_steps,
                                      "micro_batch": run.layout.micro_batch,
                                      "steps_per_epoch": sampler.steps_per_epoch, "total_steps": run.total_steps,
                                      "global_batch_from_step": {s.start: s.layout.global_batch
                                                                 for s in sampler.segments},
                                      "resumed_from_step": start,
                                      "resumed_from": str(last) if last else None,
                                      "config_changes": changes})
        val_skipped = getattr(run.val_set, "skipped_files", [])
        if val_skipped:
            print(f"largebatch: {len(val_skipped)} unreadable validation files are left out of evaluation:\n  " +
                  "\n  ".join(val_skipped[:20]), flush=True)
    log = MetricsLog(out / "metrics.jsonl" if info.is_main else None,
                     out / "tensorboard" if tensorboard_wanted(t.tensorboard) else None, start)
    log.truncate_after(start)  # lines past the checkpoint will be written again
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    augment_at = lambda step: phase_at(step, run.phases).augment
    batches = iter(make_loader(run.train_set, run.sampler.micro_batches(start, run.total_steps, augment_at),
                               run.workers, run.device))
    members = ensemble.RunningEnsemble(run.val_set, t.eval_batch, run.device, run.workers, t.bf16,
                                       t.channels_last)
    def eval_due(done: int) -> bool:  # every eval_every_epochs, counted in the batch segment's steps
        seg = sampler.segment_at(done - 1)
        every = max(1, int(round(t.eval_every_epochs * seg.steps_per_epoch)))
        return t.eval_every_epochs > 0 and (done - seg.start) % every == 0

    evaluate_now = lambda: evaluate(run.model, run.val_set, t.eval_batch, run.device, run.workers,
                                    t.bf16, t.channels_last)
    bar = tqdm(total=run.total_steps, initial=start, disable=None if info.is_main else True,
               unit="step", dynamic_ncols=True)
    t0, result = time.perf_counter(), None
    window = LogWindow(run.device, noise)
    extra = lambda: {"wall_seconds": wall_before + time.perf_counter() - t0,  # noqa: E731
                     "noise_scale": noise.state_dict() if noise else None}

    for step in range(start, run.total_steps):
        phase = phase_at(step, run.phases)
        if step == phase.start and phase.reset_momentum:
            run.optimizer.state.clear()  # a cycle restarts from the weights alone
        lr = phase_lr(step - phase.start, phase)
        apply_schedule(run.optimizer, lr, phase.weight_decay)
        run.layout = sampler.segment_at(step).layout  # phases may change the global batch
        run.sync.accum_steps = run.layout.accum_steps
        window.add(train_step(run, batches, loss_fn), run.sync.take_sq_norms(), run.sync.take_seconds())
        done, epoch = step + 1, sampler.epoch_at(step + 1)
        batch_ends = sampler.segment_at(done).layout is not run.layout
        if done % t.log_every_steps == 0 or done == run.total_steps or batch_ends:
            record = window.close(run.layout)
            if not math.isfinite(record["loss"]):
                log.write(step=done, epoch=epoch, lr=lr, diverged=f"loss {record['loss']}")
                check_finite(run, done, record["loss"])
            log.write(step=done, epoch=epoch, lr=lr, **record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{record['images_per_sec']:.0f}",
                            **({"B_noise": f"{record['noise_scale']:.0f}"} if record.get("noise_scale") else {}))
        bar.update(1)
        is_snapshot = phase.snapshot and done == phase.end
        is_eval = eval_due(done) or done == run.total_steps or is_snapshot
        is_ckpt = is_eval or (t.checkpoint_every_steps and done % t.checkpoint_every_steps == 0)
        pause_t0 = time.perf_counter()
        signum = stop.agreed(run.device)
        if is_eval or is_ckpt or signum:
            check_finite(run, done)  # the weights are the same on every process: all agree
        if is_eval:
            if is_snapshot:
                result = take_snapshot(run, phase, members, extra())
                result.update(snapshot=phase.snapshot, phase=phase.name)
            else:
                result = evaluate_now()
            log.write(step=done, epoch=epoch, lr=lr, eval=True, **result)
            if info.is_main:
                ens = (f"; snapshot {phase.snapshot} ({phase.name}), ensemble of {result['ensemble_members']}: "
                       f"top-1 {result['ensemble_top1']:.4f}" if is_snapshot else "")
                bar.write(f"step {done} epoch {epoch:.2f}: top-1 {result['top1']:.4f} "
                          f"top-5 {result['top5']:.4f}{ens}")
        if is_ckpt or signum:
            save_checkpoint(run, done, extra())
        if signum:
            bar.close()
            log.write(step=done, epoch=epoch, stopped_by_signal=signum)
            log.close()
            if info.is_main:
                print(f"largebatch: signal {signum}: checkpoint at step {done} written to "
                      f"{out / 'checkpoints'}; continue with --resume", flush=True)
            raise SystemExit(128 + signum)
        window.pause(time.perf_counter() - pause_t0)
    bar.close()
    log.close()

    if result is None:  # resumed at the end: evaluate the final weights
        result = evaluate_now()
    wall = wall_before + time.perf_counter() - t0
    final = sampler.segments[-1].layout
    summary = {"top1": result["top1"], "top5": result["top5"], "epochs": sampler.epoch_at(run.total_steps),
               "steps": run.total_steps, "global_batch": final.global_batch,
               "global_batches": [s.layout.global_batch for s in sampler.segments],
               "processes": info.world_size, "accum_steps": final.accum_steps, "micro_batch": final.micro_batch,
               "images_per_sec": sampler.images(start, run.total_steps) / max(time.perf_counter() - t0 - window.paused, 1e-9),
               "wall_seconds": wall, "skipped_files": dist.gather_union(run.skipped),
               "val_skipped_files": getattr(run.val_set, "skipped_files", []),
               **noise_summary(noise)}
    snapshots = [line for line in log.read() if "snapshot" in line]
    if snapshots:
        summary["snapshots"] = [{k: line[k] for k in ("snapshot", "phase", "step", "top1", "top5", "ensemble_top1",
                                                     "ensemble_top5")} for line in snapshots]
        summary["ensemble_top1"], summary["ensemble_top5"] = snapshots[-1]["ensemble_top1"], snapshots[-1]["ensemble_top5"]
    if info.is_main:
        write_json(out / "summary.json", summary)
        print(f"\nlargebatch: {out}\n{summary_table(summary)}", flush=True)
        if summary["skipped_files"]:
            print(f"largebatch: {len(summary['skipped_files'])} unreadable training files were skipped "
                  f"(each replaced by the next readable sample; listed in summary.json):\n  " +
                  "\n  ".join(summary["skipped_files"][:20]), flush=True)
    dist.barrier()
    return summary
