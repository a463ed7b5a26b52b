import math

import pytest

from largebatch.config import ConfigError, build_config, to_dict
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
    cfg = build_config({"train": {"global_batch": 4096}, "schedule": {"base_lr": 0.1, "scaling": "sqrt"}})
    assert peak_lr(cfg) == pytest.approx(0.4)  # 0.1 x sqrt(4096 / 256)


def test_epochs_are_converted_to_steps_once():
    cfg = build_config({"train": {"global_batch": 256, "epochs": 10},
                        "schedule": {"warmup_epochs": 2, "decay": "step", "milestones": [5, 8],
                                     "horizon_epochs": 6}})
    (p,) = build_phases(cfg, steps_per_epoch=50)
    assert (p.warmup_steps, p.milestones, p.horizon) == (100, (250, 400), 300)


def test_sc18_run_a_schedule():
    # docs/SC18.md run A: 14,336 batch, 4.8 peak, 5-epoch warmup from 0.1, poly power 1 over 90 epochs
    from largebatch.recipes import load_recipe
    cfg = build_config(load_recipe("sc18-run-a"))
    spe = 1281167 // 14336  # 89 steps per epoch
    phases = build_phases(cfg, spe)
    assert phases[-1].end == 90 * spe
    assert lr_at(0, phases) == pytest.approx(0.1)
    assert lr_at(5 * spe - 1, phases) == pytest.approx(0.1 + 4.7 * (5 * spe - 1) / (5 * spe))
    assert lr_at(45 * spe, phases) == pytest.approx(2.4)
    assert lr_at(90 * spe - 1, phases) == pytest.approx(4.8 / (90 * spe))


def test_warmup_longer_than_run_is_rejected():
    cfg = build_config({"train": {"steps": 60}, "schedule": {"warmup_epochs": 2}})
    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        build_phases(cfg, steps_per_epoch=50)


def test_sc18_run_b_matches_the_table_in_paper_md():
    from largebatch.recipes import load_recipe
    cfg = build_config(load_recipe("sc18-run-b"))
    spe = 1281167 // 4096  # 312 steps per epoch
    phases = build_phases(cfg, spe)
    assert [p.name for p in phases] == ["main", "cycle1", "cycle2", "cycle3", "collapse"]
    assert [p.start / spe for p in phases] == [0, 25, 37, 52, 67] and phases[-1].end == 72 * spe
    assert [p.snapshot for p in phases] == [0, 1, 2, 3, 4]
    ep = lambda e: int(e * spe)
    lr = lambda step: lr_at(step, phases)
    assert lr(0) == pytest.approx(0.1) and lr(ep(5)) == pytest.approx(1.6 * (1 - 5 / 60))
    assert lr(ep(25) - 1) == pytest.approx(0.933, abs=2e-3)           # main cut at ~0.93
    assert lr(ep(25)) == pytest.approx(1.02)                          # cycle 1 peak
    assert lr(ep(37) - 1) == pytest.approx(0.255, abs=1e-3)           # cycle 1 end
    assert lr(ep(37)) == pytest.approx(0.255)                         # cycle 2 re-warmup start
    assert lr(ep(40)) == pytest.approx(0.764 * (1 - 3 / 30) ** 2)     # after the 3-epoch re-warmup
    assert lr(ep(52) - 1) == pytest.approx(0.191, abs=1e-3)
    assert lr(ep(52)) == pytest.approx(0.19)
    assert lr(ep(67) - 1) == pytest.approx(0.143, abs=1e-3)
    assert lr(ep(67)) == pytest.approx(0.143)                         # collapse
    assert lr(ep(72) - 1) == pytest.approx(0.143 / (5 * spe) ** 2)    # poly 2 to zero
    assert [p.weight_decay for p in phases] == [5e-5] * 4 + [2e-4]
    assert [p.augment for p in phases] == [True] * 4 + [False]
    assert [p.reset_momentum for p in phases] == [False] + [True] * 4


def test_ensemble_generator_splits_the_budget_into_main_cycles_and_collapse():
    cfg = build_config({"train": {"global_batch": 1024, "epochs": 12}, "optim": {"weight_decay": 5e-4},
                        "schedule": {"base_lr": 0.2, "decay": "cosine", "warmup_epochs": 2, "warmup_start": 0.125},
                        "ensemble": {"cycles": 3}})
    spe = 58
    phases = build_phases(cfg, spe)
    plain = build_phases(build_config({**to_dict(cfg), "ensemble": {"cycles": 0}}), spe)
    assert [p.name for p in phases] == ["main", "cycle1", "cycle2", "cycle3", "collapse"]
    assert [p.snapshot for p in phases] == [0, 1, 2, 3, 4]
    assert phases[-1].end == plain[-1].end == 12 * spe                # the same budget as one ordinary run
    assert [p.steps for p in phases] == [348, 93, 93, 92, 70]         # 6 + 3 x 1.6 + 1.2 epochs
    # the main phase is the ordinary run's schedule, cut at epoch 6
    assert all(lr_at(s, phases) == lr_at(s, plain) for s in range(348))
    cut = lr_at(348, plain)
    assert lr_at(348, phases) == pytest.approx(1.1 * cut)             # cycle 1 peak
    c2, c3 = phases[2], phases[3]
    assert lr_at(c2.start, phases) == pytest.approx(lr_at(c2.start - 1, phases), rel=0.05)  # re-warmup from the end
    assert c2.peak == pytest.approx(0.75 * phases[1].peak) and c3.peak == pytest.approx(0.75 * c2.peak)
    assert lr_at(phases[-1].end - 1, phases) < 1e-3 and phases[-1].weight_decay == pytest.approx(2e-3)
    assert phases[-1].augment is False and all(p.reset_momentum for p in phases[1:])


@pytest.mark.parametrize("shape", ["cosine", "fge"])
def test_ensemble_cycle_shapes_step_by_step(shape):
    """Four cycles of 10 steps after a 20-step main phase, no collapse: cosine cycles anneal
    from their peak to zero (Huang et al.), fge cycles fall in a straight line to 1 % of it
    (Garipov et al.); each ends where its snapshot is taken."""
    cfg = build_config({"train": {"global_batch": 100, "epochs": 6}, "schedule": {"peak_lr": 1.0, "decay": "poly"},
                        "ensemble": {"cycles": 4, "main_fraction": 1 / 3, "collapse_fraction": 0.0,
                                     "first_peak": 1.0, "peak_decay": 0.5, "cycle_shape": shape}})
    phases = build_phases(cfg, 10)
    assert [(p.name, p.start, p.steps, p.snapshot) for p in phases] == \
        [("main", 0, 20, 0), ("cycle1", 20, 10, 1), ("cycle2", 30, 10, 2), ("cycle3", 40, 10, 3), ("cycle4", 50, 10, 4)]
    cut = 1 - 20 / 60  # the main phase: poly 1 over the 60-step run, cut at step 20
    peaks = [cut * 0.5 ** k for k in range(4)]
    for k, peak in enumerate(peaks):
        got = [lr_at(20 + 10 * k + t, phases) for t in range(10)]
        if shape == "cosine":
            want = [peak * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
        else:
            want = [peak * (1 - 0.99 * t / 10) for t in range(10)]  # reaching 0.01 peak at the snapshot
        assert got == pytest.approx(want), k
    assert all(not p.reset_momentum for p in phases)


def test_phases_must_add_up_to_the_epochs():
    with pytest.raises(ConfigError, match="phases last 3 epochs but train.epochs is 10"):
        build_config({"train": {"epochs": 10}, "phases": [{"epochs": 1}, {"epochs": 2}]})
    with pytest.raises(ConfigError, match=r"unknown key phases\[0\].peek"):
        build_config({"train": {"epochs": 1}, "phases": [{"epochs": 1, "peek": 2}]})
