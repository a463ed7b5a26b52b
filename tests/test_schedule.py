import math

import pytest

from largebatch.config import ConfigError, build_config
from largebatch.optim.schedule import Phase, build_phases, lr_at, peak_lr


def phase(**kw):
    base = dict(start=0, steps=100, peak=1.0, warmup_steps=0, warmup_start=0.0, decay="constant",
                power=1.0, horizon=100, final=0.0, milestones=(), gamma=0.1, weight_decay=0.0)
    return [Phase(**{**base, **kw})]


def test_warmup_then_constant():
    p = phase(warmup_steps=4, warmup_start=0.2, peak=1.0)
    assert [lr_at(s, p) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_poly_power_1_and_2():
    assert [lr_at(s, phase(decay="poly", power=1.0, horizon=4)) for s in range(6)] == \
        pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert [lr_at(s, phase(decay="poly", power=2.0, horizon=4)) for s in range(5)] == \
        pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])


def test_poly_horizon_counts_from_phase_start_through_warmup():
    # Caffe's poly: after a 2-step warmup the LR is where the poly curve already is.
    p = phase(decay="poly", power=1.0, horizon=10, warmup_steps=2, warmup_start=0.0, peak=1.0)
    assert [lr_at(s, p) for s in range(4)] == pytest.approx([0.0, 0.5, 0.8, 0.7])


def test_cosine_with_floor():
    p = phase(decay="cosine", horizon=4, peak=1.0, final=0.1)
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    assert [lr_at(s, p) for s in range(5)] == pytest.approx(want)
    assert want[2] == pytest.approx(0.55)


def test_step_decay():
    p = phase(decay="step", milestones=(2, 4), gamma=0.1)
    assert [lr_at(s, p) for s in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_linear_scaling_rule_and_explicit_peak():
    cfg = build_config({"train": {"global_batch": 4096}, "schedule": {"base_lr": 0.1}})
    assert peak_lr(cfg) == pytest.approx(1.6)
    cfg = build_config({"train": {"global_batch": 14336}, "schedule": {"peak_lr": 4.8}})
    assert peak_lr(cfg) == pytest.approx(4.8)


def test_epochs_are_converted_to_steps_once():
    cfg = build_config({"train": {"global_batch": 256, "epochs": 10},
                        "schedule": {"warmup_epochs": 2, "decay": "step", "milestones": [5, 8],
                                     "horizon_epochs": 6}})
    (p,) = build_phases(cfg, steps_per_epoch=50, total_steps=500)
    assert (p.warmup_steps, p.milestones, p.horizon) == (100, (250, 400), 300)


def test_sc18_run_a_schedule():
    # PAPER.md run A: 14,336 batch, 4.8 peak, 5-epoch warmup from 0.1, poly power 1 over 90 epochs
    from largebatch.recipes import load_recipe
    cfg = build_config(load_recipe("sc18-run-a"))
    spe = 1281167 // 14336  # 89 steps per epoch
    phases = build_phases(cfg, spe, 90 * spe)
    assert lr_at(0, phases) == pytest.approx(0.1)
    assert lr_at(5 * spe - 1, phases) == pytest.approx(0.1 + 4.7 * (5 * spe - 1) / (5 * spe))
    assert lr_at(45 * spe, phases) == pytest.approx(2.4)
    assert lr_at(90 * spe - 1, phases) == pytest.approx(4.8 / (90 * spe))


def test_warmup_longer_than_run_is_rejected():
    cfg = build_config({"train": {"epochs": 10}, "schedule": {"warmup_epochs": 2}})
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_phases(cfg, steps_per_epoch=50, total_steps=60)
