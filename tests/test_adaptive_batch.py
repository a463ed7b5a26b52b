"""Adaptive batch-size control: the global batch doubles toward the measured noise scale
at whole epochs, the LR shape carries on across the change, and the run stays
resumable bitwise (decisions and the open log window travel with the checkpoint) and
independent of the process layout."""
import json

import pytest
import torch

from largebatch import checkpoint
from largebatch.adaptive_batch import candidates, due, next_batch
from largebatch.cli import main as cli_main
from largebatch.config import ConfigError, build_config
from largebatch.dist import resolve_layout
from largebatch.noise_scale import batches
from largebatch.optim.schedule import build_phases, lr_at
from largebatch.recipes import load_recipe

from conftest import run_cli

N = 256


def test_the_batch_doubles_up_to_the_noise_scale_and_max_batch_and_never_shrinks():
    assert next_batch(32, 256, 100.0) == 64
    assert next_batch(32, 256, 128.0) == 128  # at B_simple itself: still grown
    assert next_batch(32, 64, 1e9) == 64
    assert next_batch(128, 256, 10.0) == 128
    assert next_batch(32, 4096, 100.0, multiple=4) == 256  # up to 4 x B_simple: fewer steps, more samples
    assert next_batch(32, 256, None) == next_batch(32, 256, -50.0) == next_batch(32, 256, float("nan")) == 32
    cfg = build_config({"train": {"global_batch": 32, "epochs": 4}, "adaptive_batch": {"max_batch": 256,
                                                                                      "every_epochs": 2}})
    assert candidates(cfg) == [32, 64, 128, 256]
    assert [due(cfg, e) for e in (0, 1, 2, 2.5, 4)] == [False, False, True, False, True]


def test_a_decision_cuts_the_schedule_and_the_lr_shape_carries_on_in_epochs():
    cfg = build_config({"train": {"global_batch": 32, "epochs": 4}, "adaptive_batch": {"max_batch": 128},
                        "schedule": {"peak_lr": 0.1, "warmup_epochs": 1, "decay": "cosine"}})
    plain = build_phases(cfg, N // 32, N)
    cut = build_phases(cfg, N // 32, N, decided={2: 64, 3: 128})
    assert [(p.start, p.steps, p.global_batch) for p in cut] == [(0, 16, 32), (16, 4, 64), (20, 2, 128)]
    # at each decision the LR is the unchanged run's LR at that epoch, scaled by the rule (linear here)
    assert lr_at(16, cut) == pytest.approx(2 * lr_at(16, plain))
    assert lr_at(20, cut) == pytest.approx(4 * lr_at(24, plain))
    assert [lr_at(s, cut) for s in range(16)] == [lr_at(s, plain) for s in range(16)]  # warmup and all, uncut
    assert lr_at(4, cut) == pytest.approx(0.05)
    assert cut[-1].end == 22


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"adaptive_batch.max_batch \(100\) must be train.global_batch \(32\) "
                                          r"times a power of two"):
        build_config({"train": {"global_batch": 32}, "adaptive_batch": {"max_batch": 100}})
    with pytest.raises(ConfigError, match="needs train.noise_scale=true"):
        build_config({"train": {"global_batch": 32, "noise_scale": False}, "adaptive_batch": {"max_batch": 64}})


SYNTH = ["--recipe", "fmnist-large", "--model", "resnet8", "--global-batch", "32", "--micro-batch", "16",
         "--set", "data.name=synthetic", "--set", "data.synthetic_samples=256", "--set", "data.synthetic_classes=4",
         "--set", "data.synthetic_channels=1", "--set", "data.synthetic_size=8", "--set", "model.bn_group_size=8",
         "--set", "train.bf16=false", "--set", "train.channels_last=false", "--set", "train.eval_every_epochs=0",
         "--set", "train.log_every_steps=3", "--set", "dist.exact_reduction=true", "--epochs", "4", "--set", "schedule.warmup_epochs=0.5",
         "--set", "adaptive_batch.max_batch=64", "--set", "train.checkpoint_every_steps=5",
         "--set", "train.keep_checkpoints=9"]


def lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_run_grows_its_batch_and_resumes_bitwise_on_either_side_of_the_decision(tmp_path):
    full = tmp_path / "full"
    cli_main(["train", *SYNTH, "--out", str(full)])
    summary = json.loads((full / "summary.json").read_text())
    # epoch 1 measures B_simple over 64: the batch doubles there; 8 + 3 x 4 steps
    assert summary["global_batches"] == [32, 64] and summary["batch_decisions"] == {"1": 64}
    assert summary["steps"] == 20 and summary["epochs"] == 4
    decisions = [l for l in lines(full) if "adaptive_batch" in l]
    assert [(l["step"], l["adaptive_batch"]) for l in decisions] == [(8, 64), (12, 64), (16, 64)]
    assert decisions[0]["noise_scale_interval"] >= 64
    for keep in (5, 10):  # inside a log window before the decision; after it
        split = tmp_path / f"from{keep}"
        cli_main(["train", *SYNTH, "--out", str(split)])
        for p in checkpoint.step_files(split / "checkpoints"):
            if p.name > f"step-{keep:08d}.pt":
                p.unlink()
        (split / "checkpoints/last.pt").unlink()
        cli_main(["train", *SYNTH, "--out", str(split), "--resume"])
        a, b = checkpoint.load(full / "checkpoints/last.pt")["model"], checkpoint.load(split / "checkpoints/last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        # the noise scale and the decisions are the uninterrupted run's, to the bit
        measured = lambda out: [(l["step"], l.get("noise_scale"), l.get("adaptive_batch"), l.get("loss"))  # noqa: E731
                                for l in lines(out)]
        assert measured(split) == measured(full)


def test_the_layout_does_not_matter(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *SYNTH, "--out", one)
    no_micro = [a for i, a in enumerate(SYNTH) if "--micro-batch" not in SYNTH[max(i - 1, 0):i + 1]]
    run_cli("train", *no_micro, "--out", two, nproc=2)  # the micro-batch stays the first batch's share: 16
    summary = json.loads((two / "summary.json").read_text())
    assert summary["batch_decisions"] == {"1": 64} and (summary["micro_batch"], summary["accum_steps"]) == (16, 2)
    a, b = checkpoint.load(one / "checkpoints/last.pt")["model"], checkpoint.load(two / "checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_without_accumulation_is_told_what_to_set(tmp_path):
    proc = run_cli("train", *SYNTH, "--micro-batch", "32", "--out", tmp_path / "r", check=False)
    assert proc.returncode != 0 and "adaptive_batch needs the noise scale" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_adaptive_recipe_measures_the_noise_scale_in_one_process_or_several(world_size):
    cfg = build_config(load_recipe("fmnist-adaptive"))
    lay = resolve_layout(cfg.train, world_size, 0, cfg.model.bn_group_size)
    assert batches(world_size, lay.accum_steps, lay.micro_batch) is not None
    assert candidates(cfg) == [128, 256, 512, 1024, 2048, 4096]
