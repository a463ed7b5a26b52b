"""Hardware-dependent defaults chosen by measuring this machine, not by reading its flags.

bf16 autocast: a CPU that has bf16 instructions (AVX512-BF16, AMX) is not always faster
in bf16. On some it is twice as fast for ResNet-50; on others its bf16 matrix products
run at about half its fp32 rate, and fp32 trains faster. So where the instructions exist,
a few training steps of the run's own model are timed in both precisions, once per
machine, model and shape.

channels_last: a CIFAR-style ResNet's narrow convolutions (16 to 64 channels) ran about
3x faster in channels_last on one CPU and slower on another, so the run's model, with
its BN groups, is timed in both memory formats, once per machine, model and shape.

torch.compile: what it buys depends on the machine and the model as much as bf16 does
(from +17 % for ResNet-50 on one CPU to nothing on another, docs/BENCHMARKS.md), and
measuring it costs a compile (a minute or more for ResNet-50). So a run is first timed
eagerly (cheap) to estimate its length; only a run long enough to repay a compile several
times has the compiled model timed beside the eager one, once per machine, model and shape.

Answers are cached in ~/.cache/largebatch/ (LARGEBATCH_CACHE moves it) and every later
run reads them. A timing taken while the process was suspended (SIGSTOP and SIGCONT, as
Slurm's `scontrol suspend` does) counts the pause: it is taken again, and never cached.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig

MARGIN = 0.95  # bf16 and channels_last are chosen only when at least 5 % faster
ROUNDS = 3  # timings per setting, alternated
COMPILE_MARGIN = 0.9  # compiled steps must be at least 10 % faster ...
COMPILE_PAYBACK = 3  # ... and save at least 3 times the compile time over the run
COMPILE_MIN_RUN_S = 20 * 60  # shorter runs (eager estimate) are not worth a measurement
# Part of every cache key: a change to how the timings are taken makes older answers stale.
# 2: BN scales at 1 (zero-initialised ones made the backward pass subnormal-bound), and the
# least of 3 alternated timings per setting.
TIMING_VERSION = 2


def cache_path(name: str = "bf16") -> Path:
    return Path(os.environ.get("LARGEBATCH_CACHE", "~/.cache/largebatch")).expanduser() / f"{name}.json"


def cache_key(device_name: str, *parts) -> str:
    """What a timing depends on besides the model: how it is taken, the device, torch, threads."""
    return "|".join(map(str, (TIMING_VERSION, device_name, torch.__version__, torch.get_num_threads(), *parts)))


STALL_S = 1.0  # a watcher that wakes every TICK_S and finds this much more gone: the process was stopped
TICK_S = 0.05


class _Stalls(threading.Thread):
    """Notices the process not running: a stopped process's clock runs on while none of
    its threads do, so this thread wakes to find far more time gone than it slept.
    (A SIGCONT handler would be the direct sign, but Python runs it only when the main
    thread next gets to it, which can be after the timing has been judged.)"""

    def __init__(self):
        super().__init__(daemon=True)
        self.done, self.stalled = threading.Event(), False

    def run(self) -> None:
        last, done = time.monotonic(), False
        while not done:  # the last look, after the timing ended, covers a stop just before it
            done = self.done.wait(TICK_S)
            now = time.monotonic()
            self.stalled |= now - last > TICK_S + STALL_S
            last = now


def unsuspended(measure: Callable[[], dict], tries: int = 2) -> tuple[dict, bool]:
    """(measure(), whether it ran without the process being suspended), taken again up
    to `tries` times while the process stops during it: a stopped process's clock runs
    on, and one suspension during a compile once made it look 20 minutes long."""
    for _ in range(tries):
        watch = _Stalls()
        watch.start()
        try:
            result = measure()
        finally:
            watch.done.set()
            watch.join()
        if not watch.stalled:
            return result, True
    return result, False


def cached(name: str, key: str, measure: Callable[[], dict], need: str) -> dict:
    """The cache entry `key` of cache `name`, measured (and the new fields merged in and
    written) when it lacks the field `need`. A measurement the process was suspended
    during serves this run only."""
    path = cache_path(name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if need not in cache.get(key, {}):
        result, clean = unsuspended(measure)
        entry = {**cache.get(key, {}), **result}
        if not clean:
            return entry
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable home only costs the measurement again next time
    return cache[key]


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no way to ask, stay in fp32
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _model_and_batch(model_cfg: ModelConfig, channels: int, size: int, batch: int, channels_last: bool,
                     device: torch.device):
    from .models import build_model
    g = torch.Generator().manual_seed(0)
    # BN scales at 1, as after the first steps of training: zero-initialised ones, never
    # updated here, would fill the backward pass with subnormal numbers, which some CPUs
    # process 10x slower, and the timing would measure that instead of the model
    model_cfg = dataclasses.replace(model_cfg, zero_init_gamma="none")
    model = build_model(model_cfg, channels, model_cfg.num_classes or 10).to(device)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(model_cfg.num_classes or 10, (batch,), generator=g).to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs behind the host), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(forward, x, y, bf16: bool, steps: int) -> tuple[float, float]:
    """(seconds of the first forward + backward, mean seconds of the next `steps`)."""
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        synchronize(x.device)
    t0 = time.perf_counter()
    step()
    first, t0 = time.perf_counter() - t0, time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - t0) / steps if steps else 0.0


def step_seconds(model_cfg: ModelConfig, channels: int, size: int, batch: int, channels_last: bool,
                 bf16: bool, steps: int = 2, device: torch.device = torch.device("cpu")) -> float:
    """Seconds of a forward + backward of `batch` images of `size` px, after one warm-up."""
    return _timed(*_model_and_batch(model_cfg, channels, size, batch, channels_last, device), bf16, steps)[1]


def compile_seconds(model_cfg: ModelConfig, channels: int, size: int, batch: int, channels_last: bool,
                    bf16: bool, device: torch.device, steps: int = 3) -> dict:
    """The model's steps eager and compiled, and the compiled model's first step (the compile)."""
    model, x, y = _model_and_batch(model_cfg, channels, size, batch, channels_last, device)
    fast = torch.compile(model)
    first = _timed(fast, x, y, bf16, 0)[0]
    eager, compiled = least_of_alternated(lambda c: _timed(fast if c else model, x, y, bf16, steps)[1])
    torch._dynamo.reset()  # the run compiles its own model; keep nothing of this one
    return {"eager_seconds": eager, "compiled_seconds": compiled, "compile_seconds": first}


def timing_batch(batch: int, size: int, group: int = 1) -> int:
    """The run's micro-batch, up to about 200K pixels (256 Fashion-MNIST images, 8 at 224 px):
    small convolutions need their real batch to show what a setting buys, large ones do not.
    A multiple of `group` (BN groups must divide it)."""
    b = max(1, min(batch, max(8, 256 * 28 * 28 // (size * size))))
    return max(group, b // group * group)


def least_of_alternated(seconds: Callable[[bool], float]) -> tuple[float, float]:
    """(least of seconds(False), least of seconds(True)) over ROUNDS alternated timings:
    other load on the machine only adds time, and alternating spreads it over both."""
    times = {False: [], True: []}
    for _ in range(ROUNDS):
        for setting in times:
            times[setting].append(seconds(setting))
    return min(times[False]), min(times[True])


def timed_model(model_cfg: ModelConfig, batch: int, size: int) -> tuple[ModelConfig, int]:
    """The model as a timing on one process builds it (its BN groups where they divide the
    run's batch, no SyncBN) and the timing batch (timing_batch, a multiple of the group)."""
    group = model_cfg.bn_group_size if model_cfg.bn_group_size and batch % model_cfg.bn_group_size == 0 else 0
    return dataclasses.replace(model_cfg, bn_group_size=group, sync_bn=False), timing_batch(batch, size, group or 1)


def choose_bf16(device: torch.device, model_cfg: ModelConfig, channels: int, size: int, batch: int,
                channels_last: bool) -> tuple[bool, str]:
    """(use bf16, why). GPUs that support bf16 use it; CPUs without bf16 instructions do
    not; CPUs with them are measured (cached)."""
    native = native_bf16(device)
    if device.type == "cuda" or not native:
        return native, "the device supports bf16" if native else "no native bf16 on this device"
    batch = timing_batch(batch, size)
    # BN groups must divide the timing batch; group statistics cost the same in both precisions
    model_cfg = dataclasses.replace(model_cfg, bn_group_size=0, sync_bn=False)
    key = cache_key(cpu_name(), model_cfg.name, channels, size, batch, channels_last)
    def measure() -> dict:
        fp32, bf16 = least_of_alternated(lambda b: step_seconds(model_cfg, channels, size, batch, channels_last, b))
        return {"fp32_seconds": fp32, "bf16_seconds": bf16}
    m = cached("bf16", key, measure, need="bf16_seconds")
    on = m["bf16_seconds"] < MARGIN * m["fp32_seconds"]
    why = (f"{model_cfg.name} forward + backward of {batch} images: {m['bf16_seconds']:.3f} s in bf16, "
           f"{m['fp32_seconds']:.3f} s in fp32 on this CPU (measured once, cached in {cache_path('bf16')})")
    return on, why


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def choose_channels_last(device: torch.device, model_cfg: ModelConfig, channels: int, size: int, batch: int,
                         bf16: bool) -> tuple[bool, str]:
    """(use channels_last, why): the run's model, BN groups included, timed in both memory
    formats in the precision it will train in; on where channels_last is at least 5 % faster."""
    model_cfg, batch = timed_model(model_cfg, batch, size)
    key = cache_key(device_name(device), model_cfg.name, model_cfg.bn_group_size, channels, size, batch, bf16)

    def measure() -> dict:
        contiguous, channels_last = least_of_alternated(
            lambda cl: step_seconds(model_cfg, channels, size, batch, cl, bf16, device=device))
        return {"contiguous_seconds": contiguous, "channels_last_seconds": channels_last}
    m = cached("channels_last", key, measure, need="channels_last_seconds")
    on = m["channels_last_seconds"] < MARGIN * m["contiguous_seconds"]
    why = (f"{model_cfg.name} forward + backward of {batch} images: {m['channels_last_seconds']:.3f} s "
           f"channels_last, {m['contiguous_seconds']:.3f} s contiguous on this device "
           f"(measured once, cached in {cache_path('channels_last')})")
    return on, why


def choose_compile(device: torch.device, model_cfg: ModelConfig, channels: int, size: int, batch: int,
                   channels_last: bool, bf16: bool, micro_steps: int) -> tuple[bool, str]:
    """(use torch.compile, why) for a run of `micro_steps` forward + backward passes of
    `batch` images each: on where a compiled step is measured at least 10 % faster and
    the run is long enough to save 3 times the compile time."""
    model_cfg, small = timed_model(model_cfg, batch, size)
    key = cache_key(device_name(device), model_cfg.name, model_cfg.bn_group_size, channels, size, small,
                    channels_last, bf16)
    m = cached("compile", key, lambda: {"eager_seconds": step_seconds(model_cfg, channels, size, small, channels_last,
                                                                      bf16, device=device)}, need="eager_seconds")
    run_seconds = lambda m: m["eager_seconds"] * batch / small * micro_steps  # noqa: E731
    eager_run = run_seconds(m)
    if eager_run < COMPILE_MIN_RUN_S:
        return False, (f"a run of about {eager_run / 60:.0f} min eager is too short to repay a compile "
                       f"(measured only for runs over {COMPILE_MIN_RUN_S // 60} min)")
    m = cached("compile", key, lambda: compile_seconds(model_cfg, channels, size, small, channels_last, bf16,
                                                       device), need="compiled_seconds")
    eager_run = run_seconds(m)  # again from the alternated timing: steadier than the first
    ratio = m["compiled_seconds"] / m["eager_seconds"]
    saved = eager_run * (1 - ratio)
    on = ratio <= COMPILE_MARGIN and saved >= COMPILE_PAYBACK * m["compile_seconds"]
    why = (f"{model_cfg.name}, {small} images: {m['compiled_seconds']:.3f} s compiled, {m['eager_seconds']:.3f} s "
           f"eager, {m['compile_seconds']:.0f} s to compile; about {eager_run / 60:.0f} min eager "
           f"(measured once, cached in {cache_path('compile')})")
    return on, why
