"""channels_last, bf16 and torch.compile are chosen by timing the run's model on this machine, once."""
import json
import os
import signal
import subprocess
import threading

import torch

from largebatch import autotune
from largebatch.config import ModelConfig


def test_bf16_follows_the_measurement_and_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    monkeypatch.setattr(autotune, "native_bf16", lambda device: False)
    assert autotune.choose_bf16(cpu, ModelConfig(), 1, 28, 64, False) == (False, "no native bf16 on this device")
    assert not (tmp_path / "bf16.json").exists()  # nothing to measure

    monkeypatch.setattr(autotune, "native_bf16", lambda device: True)
    calls = []

    def timed(model_cfg, channels, size, batch, channels_last, bf16):
        calls.append((model_cfg.name, batch, bf16))
        return {"resnet50": {True: 1.7, False: 1.4}, "resnet8": {True: 0.8, False: 1.0}}[model_cfg.name][bf16]
    monkeypatch.setattr(autotune, "step_seconds", timed)
    on, why = autotune.choose_bf16(cpu, ModelConfig(name="resnet50"), 3, 224, 32, True)
    assert not on and "1.700 s in bf16, 1.400 s in fp32" in why   # bf16 instructions, yet slower: fp32
    assert calls == [("resnet50", 8, False), ("resnet50", 8, True)] * 3  # 224 px: 8 images; alternated
    assert autotune.choose_bf16(cpu, ModelConfig(name="resnet8"), 1, 28, 1024, False)[0]  # 20 % faster: bf16
    assert calls[-1] == ("resnet8", 256, True)
    n = len(calls)
    assert not autotune.choose_bf16(cpu, ModelConfig(name="resnet50"), 3, 224, 32, True)[0]
    assert len(calls) == n  # the cached answer, not a new measurement


def test_channels_last_follows_the_measurement_of_the_model_with_its_bn_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    cpu, calls = torch.device("cpu"), []

    def timed(model_cfg, channels, size, batch, channels_last, bf16, device):
        calls.append((model_cfg.bn_group_size, batch, channels_last, bf16))
        return {"resnet8": {True: 0.5, False: 1.0}, "resnet20": {True: 0.98, False: 1.0}}[model_cfg.name][channels_last]
    monkeypatch.setattr(autotune, "step_seconds", timed)
    on, why = autotune.choose_channels_last(cpu, ModelConfig(name="resnet8", bn_group_size=32), 1, 28, 224, True)
    assert on and "0.500 s channels_last, 1.000 s contiguous" in why
    assert calls == [(32, 224, False, True), (32, 224, True, True)] * 3  # the run's groups and precision, alternated
    assert not autotune.choose_channels_last(cpu, ModelConfig(name="resnet20"), 1, 28, 1024, True)[0]  # 2 %: no
    assert calls[-1] == (32, 256, True, True)  # at most 256 images of 28 px, a multiple of the group
    n = len(calls)
    assert autotune.choose_channels_last(cpu, ModelConfig(name="resnet8", bn_group_size=32), 1, 28, 224, True)[0]
    assert len(calls) == n  # the cached answer


def test_the_timing_runs_the_real_model():
    seconds = autotune.step_seconds(ModelConfig(name="resnet8", bn_group_size=0), 1, 28, 8, False, True, steps=1)
    assert 0 < seconds < 10


def test_compile_is_measured_only_for_runs_long_enough_and_follows_the_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    cpu, eager_calls, compile_calls = torch.device("cpu"), [], []

    def eager(model_cfg, channels, size, batch, channels_last, bf16, device):
        eager_calls.append((model_cfg.name, batch))
        return 0.1

    def compiled(model_cfg, channels, size, batch, channels_last, bf16, device):
        compile_calls.append(model_cfg.name)
        return {"eager_seconds": 0.1, "compiled_seconds": {"resnet8": 0.08, "resnet20": 0.095}[model_cfg.name],
                "compile_seconds": 60.0}
    monkeypatch.setattr(autotune, "step_seconds", eager)
    monkeypatch.setattr(autotune, "compile_seconds", compiled)
    r8 = ModelConfig(name="resnet8", bn_group_size=32)
    # 1,024-image micro-batches are timed at 256: 0.4 s each, 100 of them = 40 s: too short
    on, why = autotune.choose_compile(cpu, r8, 1, 28, 1024, False, True, 100)
    assert not on and "too short" in why and compile_calls == [] and eager_calls == [("resnet8", 256)]
    # 30,000 of them = 200 min eager: measured, 20 % faster, saves 40 min for a 1-minute compile
    on, why = autotune.choose_compile(cpu, r8, 1, 28, 1024, False, True, 30_000)
    assert on and "0.080 s compiled, 0.100 s eager, 60 s to compile" in why
    assert compile_calls == ["resnet8"] and len(eager_calls) == 1  # the eager timing was cached
    assert autotune.choose_compile(cpu, r8, 1, 28, 1024, False, True, 30_000)[0] and compile_calls == ["resnet8"]
    # 5 % faster is not enough
    assert not autotune.choose_compile(cpu, ModelConfig(name="resnet20"), 1, 28, 1024, False, True, 30_000)[0]
    # 20 % faster, but a 25-minute run saves 5 minutes, less than 3 compiles of 10 minutes
    monkeypatch.setattr(autotune, "compile_seconds", lambda *a: {"eager_seconds": 0.1, "compiled_seconds": 0.08,
                                                                 "compile_seconds": 600.0})
    assert not autotune.choose_compile(cpu, ModelConfig(name="resnet32"), 1, 28, 1024, False, True, 3_750)[0]


def test_the_compile_timing_compiles_the_real_model(monkeypatch):
    monkeypatch.setattr(autotune, "ROUNDS", 1)
    m = autotune.compile_seconds(ModelConfig(name="resnet8", bn_group_size=4), 1, 28, 8, False, False,
                                 torch.device("cpu"), steps=1)
    assert m["compile_seconds"] > m["compiled_seconds"] > 0 and m["eager_seconds"] > 0


def test_a_timing_the_process_was_suspended_during_is_taken_again_and_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    pid, timings = os.getpid(), []

    def measure(suspend: int):
        def timed() -> dict:
            if len(timings) < suspend:  # stopped for real; a child process continues us
                subprocess.run(["sh", "-c", f"kill -STOP {pid}; sleep {autotune.STALL_S + 0.5}; kill -CONT {pid}"],
                               check=True)
            timings.append(len(timings))
            return {"seconds": float(len(timings))}
        return timed

    # suspended during the first timing: the second is the answer, and it is cached
    assert autotune.cached("compile", "a", measure(suspend=1), need="seconds") == {"seconds": 2.0}
    assert json.loads((tmp_path / "compile.json").read_text()) == {"a": {"seconds": 2.0}}
    # suspended during every try: this run uses the last, the cache does not keep it
    timings.clear()
    assert autotune.cached("compile", "b", measure(suspend=2), need="seconds") == {"seconds": 2.0}
    assert "b" not in json.loads((tmp_path / "compile.json").read_text())
    assert signal.getsignal(signal.SIGCONT) == signal.SIG_DFL
    assert not any(isinstance(t, autotune._Stalls) for t in threading.enumerate())  # the watchers are gone
