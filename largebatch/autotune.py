"""Hardware-dependent defaults chosen by measuring this machine, not by reading its flags.

bf16 autocast: a CPU that has bf16 instructions (AVX512-BF16, AMX) is not always faster
in bf16. On some it is twice as fast for ResNet-50; on others its bf16 matrix products
run at about half its fp32 rate, and fp32 trains faster. So where the instructions exist,
a few training steps of the run's own model are timed in both precisions, once per
machine, model and shape; the answer is cached in ~/.cache/largebatch/bf16.json
(LARGEBATCH_CACHE moves it) and every later run reads it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from .config import ModelConfig

MARGIN = 0.95  # bf16 is chosen only when it is at least 5 % faster


def cache_path() -> Path:
    return Path(os.environ.get("LARGEBATCH_CACHE", "~/.cache/largebatch")).expanduser() / "bf16.json"


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


def step_seconds(model_cfg: ModelConfig, channels: int, size: int, batch: int, channels_last: bool,
                 bf16: bool, steps: int = 2) -> float:
    """Seconds of a forward + backward of `batch` images of `size` px, after one warm-up."""
    from .models import build_model
    g = torch.Generator().manual_seed(0)
    model = build_model(model_cfg, channels, model_cfg.num_classes or 10)
    x = torch.randn(batch, channels, size, size, generator=g)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(model_cfg.num_classes or 10, (batch,), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def choose_bf16(device: torch.device, model_cfg: ModelConfig, channels: int, size: int, batch: int,
                channels_last: bool) -> tuple[bool, str]:
    """(use bf16, why). GPUs that support bf16 use it; CPUs without bf16 instructions do
    not; CPUs with them are measured (cached)."""
    native = native_bf16(device)
    if device.type == "cuda" or not native:
        return native, "the device supports bf16" if native else "no native bf16 on this device"
    # the run's micro-batch, up to about 200K pixels (256 Fashion-MNIST images, 8 at 224 px):
    # small convolutions need their real batch to show what bf16 buys, large ones do not
    batch = max(1, min(batch, max(8, 256 * 28 * 28 // (size * size))))
    # BN groups must divide the timing batch; group statistics cost the same in both precisions
    model_cfg = dataclasses.replace(model_cfg, bn_group_size=0, sync_bn=False)
    key = "|".join(map(str, (cpu_name(), torch.__version__, torch.get_num_threads(), model_cfg.name, channels,
                             size, batch, channels_last)))
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        fp32 = step_seconds(model_cfg, channels, size, batch, channels_last, False)
        bf16 = step_seconds(model_cfg, channels, size, batch, channels_last, True)
        cache[key] = {"fp32_seconds": fp32, "bf16_seconds": bf16}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable home only costs the measurement again next time
    m = cache[key]
    on = m["bf16_seconds"] < MARGIN * m["fp32_seconds"]
    why = (f"{model_cfg.name} forward + backward of {batch} images: {m['bf16_seconds']:.3f} s in bf16, "
           f"{m['fp32_seconds']:.3f} s in fp32 on this CPU (measured once, cached in {path})")
    return on, why
