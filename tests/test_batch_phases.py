"""Batch-size control: a phase may set its own global batch. Every sample is still seen
once per epoch, the LR follows the batch (or not, with scale_lr=false), resume is
bitwise exact across the change, and the process layout does not matter."""
import json

import pytest
import torch

from largebatch import checkpoint
from largebatch.cli import main as cli_main
from largebatch.config import ConfigError, TrainConfig, build_config, to_dict
from largebatch.data.sampler import GlobalBatchSampler
from largebatch.dist import resolve_layout
from largebatch.optim.schedule import build_phases, lr_at

from conftest import run_cli

N = 256


def grow(second=64, scale_lr=True, first_epochs=1.0):
    return build_config({"train": {"global_batch": 32, "epochs": first_epochs + 1},
                         "schedule": {"peak_lr": 0.1},
                         "phases": [{"name": "small", "epochs": first_epochs, "decay": "constant"},
                                    {"name": "large", "epochs": 1, "decay": "constant",
                                     "global_batch": second, "scale_lr": scale_lr}]})


def test_phase_steps_and_lr_follow_the_batch():
    small, large = build_phases(grow(), steps_per_epoch=N // 32, num_samples=N)
    assert (small.start, small.steps, small.global_batch) == (0, 8, 32)
    assert (large.start, large.steps, large.global_batch) == (8, 4, 64)
    assert [lr_at(s, [small, large]) for s in (0, 7, 8, 11)] == pytest.approx([0.1, 0.1, 0.2, 0.2])
    small, large = build_phases(grow(scale_lr=False), steps_per_epoch=N // 32, num_samples=N)
    assert lr_at(8, [small, large]) == pytest.approx(0.1)  # Smith et al.: the batch grows, the LR stays
    sqrt = build_config({**to_dict(grow()), "schedule": {**to_dict(grow())["schedule"], "scaling": "sqrt"}})
    assert lr_at(8, build_phases(sqrt, N // 32, N)) == pytest.approx(0.1 * 2 ** 0.5)


def test_the_batch_changes_only_at_a_whole_epoch():
    with pytest.raises(ConfigError, match=r"phases\[1\].global_batch: the batch may change only at a whole epoch"):
        build_phases(grow(first_epochs=1.5), steps_per_epoch=N // 32, num_samples=N)


def test_every_sample_once_per_epoch_across_the_change():
    cfg = grow()
    phases = build_phases(cfg, N // 32, N)
    layouts = [(0, resolve_layout(TrainConfig(global_batch=32, micro_batch=16), 1, 0)),
               (8, resolve_layout(TrainConfig(global_batch=64, micro_batch=16), 1, 0))]
    sampler = GlobalBatchSampler(N, layouts, seed=3)
    specs = list(sampler.micro_batches(0, phases[-1].end))
    assert len(specs) == 8 * 2 + 4 * 4  # accumulation takes the change: 2, then 4 micro-batches of 16
    for epoch in (0, 1):
        seen = sorted(i for s in specs if s.epoch == epoch for i in s.indices)
        assert seen == list(range(N))
    assert [sampler.epoch_at(s) for s in (0, 4, 8, 10, 12)] == [0, 0.5, 1, 1.5, 2]
    assert sampler.images(0, 12) == 8 * 32 + 4 * 64 and sampler.images(6, 10) == 2 * 32 + 2 * 64
    # two processes see the same chunks between them as one process does alone
    two = [list(GlobalBatchSampler(N, [(s, resolve_layout(TrainConfig(global_batch=b, micro_batch=16), 2, r))
                                       for s, b in ((0, 32), (8, 64))], seed=3).micro_batches(0, 12))
           for r in (0, 1)]
    assert sorted(i for s in two[0] + two[1] for i in s.indices) == sorted(i for s in specs for i in s.indices)


SYNTH = ["--recipe", "fmnist-large", "--model", "resnet8", "--global-batch", "32", "--micro-batch", "16",
         "--set", "data.name=synthetic", "--set", "data.synthetic_samples=256", "--set", "data.synthetic_classes=4",
         "--set", "data.synthetic_channels=1", "--set", "data.synthetic_size=8", "--set", "model.bn_group_size=8",
         "--set", "train.bf16=false", "--set", "train.channels_last=false", "--set", "train.eval_every_epochs=0",
         "--set", "train.log_every_steps=3",
         "--set", "dist.exact_reduction=true", "--epochs", "2",
         "--set", 'phases=[{"name": "small", "epochs": 1, "decay": "constant"}, '
                  '{"name": "large", "epochs": 1, "decay": "constant", "global_batch": 64, "snapshot": false}]']


def weights(out):
    return checkpoint.load(out / "checkpoints/last.pt")["model"]


def test_resume_across_the_change_is_bitwise_and_the_run_reports_it(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    cli_main(["train", *SYNTH, "--out", str(full)])
    cli_main(["train", *SYNTH, "--out", str(split), "--set", "train.checkpoint_every_steps=5",
              "--set", "train.keep_checkpoints=5"])
    for p in checkpoint.step_files(split / "checkpoints")[1:]:  # keep step 5: resume inside the first phase
        p.unlink()
    (split / "checkpoints/last.pt").unlink()
    cli_main(["train", *SYNTH, "--out", str(split), "--set", "train.checkpoint_every_steps=5",
              "--set", "train.keep_checkpoints=5", "--resume"])
    assert json.loads((split / "run.json").read_text())["resumed_from_step"] == 5
    a, b = weights(full), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["global_batches"] == [32, 64] and summary["epochs"] == 2
    lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    logged = [(l["step"], l["global_batch"]) for l in lines if "global_batch" in l]
    assert logged == [(3, 32), (6, 32), (8, 32), (9, 64), (12, 64)]  # a window closes where the batch changes
    assert all(l["noise_batches"] == [16, l["global_batch"]] for l in lines if "noise_batches" in l)


def test_the_layout_does_not_matter(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *SYNTH, "--out", one)
    run_cli("train", *SYNTH, "--out", two, nproc=2)
    a, b = weights(one), weights(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
