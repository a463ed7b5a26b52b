"""Real (short) training runs on Fashion-MNIST through the public entry points."""
import json

import pytest
import torch

from largebatch import checkpoint
from largebatch.cli import main as cli_main

from conftest import run_cli

TINY = ["--recipe", "fmnist-large", "--global-batch", "64", "--micro-batch", "32",
        "--set", "train.bf16=false", "--set", "train.channels_last=false", "--set", "schedule.warmup_epochs=0",
        "--set", "schedule.decay=poly", "--set", "schedule.horizon_epochs=0.02",
        "--set", "train.log_every_steps=2", "--set", "train.eval_every_epochs=0",
        "--set", "train.eval_batch=1000", "--set", "model.bn_group_size=16"]


def weights(path):
    return checkpoint.load(path)["model"]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])  # BN groups run per group in both
def test_resume_is_bitwise_exact(tmp_path, fmnist_dir, layout):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*TINY, "--set", f"train.channels_last={str(layout == 'channels_last').lower()}"]
    cli_main(["train", *args, "--steps", "6", "--out", str(full)])
    cli_main(["train", *args, "--steps", "3", "--out", str(split)])
    cli_main(["train", *args, "--steps", "6", "--out", str(split), "--resume"])
    assert_bitwise_equal(weights(full / "checkpoints/last.pt"), weights(split / "checkpoints/last.pt"))
    a, b = (checkpoint.load(p / "checkpoints/last.pt")["optimizer"] for p in (full, split))
    for sa, sb in zip(a["state"].values(), b["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the resumed run's metrics continue where the first part stopped
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps] == [2, 3, 3, 4, 6, 6]


def test_run_directory_contents(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    cli_main(["train", *TINY, "--steps", "4", "--out", str(out), "--set", "train.keep_checkpoints=1",
              "--set", "train.checkpoint_every_steps=2"])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("top1", "top5", "epochs", "global_batch", "images_per_sec", "wall_seconds"):
        assert key in summary
    assert summary["global_batch"] == 64 and summary["steps"] == 4 and 0 <= summary["top1"] <= summary["top5"] <= 1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if not l.get("eval")]
    assert [l["step"] for l in train_lines] == [2, 4]
    assert all({"step", "epoch", "lr", "loss", "images_per_sec"} <= l.keys() for l in train_lines)
    assert lines[-1]["eval"] and lines[-1]["top1"] == summary["top1"]
    assert "global_batch: 64" in (out / "config.yaml").read_text()
    assert [p.name for p in checkpoint.step_files(out / "checkpoints")] == ["step-00000004.pt"]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["step"] == 4 and "conv1.weight" in state["model"]
    run = json.loads((out / "run.json").read_text())
    assert run["torch"] == torch.__version__ and run["processes"] == 1

    # eval CLI reproduces the run's final evaluation
    proc = run_cli("eval", "--checkpoint", out / "checkpoints/last.pt")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["top1"]) and result["samples"] == 10000

    # an existing run is never overwritten without --resume
    proc = run_cli("train", *TINY, "--steps", "4", "--out", out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_resume_without_checkpoint_starts_fresh(tmp_path, fmnist_dir):
    out = tmp_path / "fresh"
    cli_main(["train", *TINY, "--steps", "2", "--out", str(out), "--resume"])
    assert checkpoint.load(out / "checkpoints/last.pt")["step"] == 2


def test_learns_fashion_mnist(tmp_path, fmnist_dir):
    """One epoch at batch 256 with bf16: a real accuracy, far above chance (10 %)."""
    out = tmp_path / "learn"
    cli_main(["train", "--recipe", "fmnist-large", "--global-batch", "256", "--steps", "234",
              "--out", str(out), "--set", "schedule.warmup_epochs=0.2", "--set", "train.eval_every_epochs=0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1"] >= 0.80, summary


def test_determinism_settings_leave_a_cpu_run_alone():
    """train.deterministic acts on GPUs; CPU kernels are deterministic already."""
    from largebatch.train import set_determinism
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    set_determinism(True, torch.device("cpu"))
    set_determinism(False, torch.device("cpu"))
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_a_gpu_run_with_several_bn_groups_per_micro_batch_is_told_what_they_cost():
    from largebatch.train import bn_groups_hint
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    hint = bn_groups_hint(gpu, 32, False, 256)
    assert "groups of 32" in hint and "model.bn_group_size=0" in hint and "256" in hint
    # nothing to say: a CPU (where the groups cost little), one group per micro-batch,
    # no groups, or SyncBN
    assert [bn_groups_hint(*a) for a in ((cpu, 32, False, 256), (gpu, 32, False, 32), (gpu, 0, False, 256),
                                         (gpu, 0, True, 256))] == [None] * 4
