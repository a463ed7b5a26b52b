"""bf16 is chosen by timing the run's model on this machine, once, where the CPU has it."""
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
    assert calls == [("resnet50", 8, False), ("resnet50", 8, True)]  # a 224 px batch is cut to 8 images
    assert autotune.choose_bf16(cpu, ModelConfig(name="resnet8"), 1, 28, 1024, False)[0]  # 20 % faster: bf16
    assert calls[-1] == ("resnet8", 256, True)
    n = len(calls)
    assert not autotune.choose_bf16(cpu, ModelConfig(name="resnet50"), 3, 224, 32, True)[0]
    assert len(calls) == n  # the cached answer, not a new measurement


def test_the_timing_runs_the_real_model():
    seconds = autotune.step_seconds(ModelConfig(name="resnet8", bn_group_size=0), 1, 28, 8, False, True, steps=1)
    assert 0 < seconds < 10
