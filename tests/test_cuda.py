"""The GPU path, where a CUDA GPU is present (skipped elsewhere: CI has none;
experiments/gpu_check.sh runs these with the rest of the single-process suite on a GPU
machine). On a GPU every other test's training runs there too: the device is chosen at
run time."""
import json
import traceback
import warnings

import pytest
import torch

from largebatch.cli import main as cli_main
from largebatch.config import build_config
from largebatch.recipes import load_recipe
from largebatch.train import set_determinism, setup, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

GPU = ["--recipe", "fmnist-large", "--global-batch", "256", "--micro-batch", "128",
       "--set", "train.bf16=true", "--set", "train.channels_last=true", "--set", "train.compile=false",
       "--set", "train.log_every_steps=5", "--set", "train.eval_every_epochs=0",
       "--set", "schedule.warmup_epochs=0.05", "--set", "data.eval_samples=2000"]


def test_trains_on_the_gpu_in_bf16_and_channels_last(tmp_path, fmnist_dir):
    out = tmp_path / "gpu"
    cli_main(["train", *GPU, "--steps", "40", "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["cuda"] == torch.cuda.get_device_name(0)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l and not l.get("eval")]
    assert all(abs(v) < 1e4 for v in losses) and losses[-1] < losses[0]  # finite, and learning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1"] > 0.5 and summary["noise_scale"] > 0 and summary["noise_batches"] == [128, 256]


def syncs(fn) -> list[str]:
    """The Python stack (innermost frames) of each host synchronisation torch reports
    while fn() runs."""
    stacks = []

    def record(message, *args, **kwargs):
        # torch's own words for a synchronisation (setting the mode warns too, once)
        if "called a synchronizing CUDA operation" in str(message):
            stacks.append("".join(traceback.format_stack(limit=8)[:-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return stacks


def syncs_in_steps(tmp_path, name: str, noise: bool, steps: int = 4) -> list[str]:
    """syncs() of `steps` training steps, after a first one (its set-up is not the steady state)."""
    cfg = build_config(load_recipe("fmnist-large"),
                       ["train.global_batch=256", "train.micro_batch=128", "train.compile=false",
                        f"train.noise_scale={str(noise).lower()}", "data.eval_samples=2000"])
    run = setup(cfg, tmp_path / name)
    try:
        train_step(run, run.batches, run.loss_fn)
        torch.cuda.synchronize()

        def steps_():
            for _ in range(steps):
                train_step(run, run.batches, run.loss_fn)
                run.sync.take_sq_norms()
        return syncs(steps_)
    finally:
        run.lock.release()


def test_the_noise_scale_adds_no_host_sync_per_step(tmp_path, fmnist_dir):
    """Its norms stay on the device until the log line's one all-reduce."""
    assert len(syncs(lambda: torch.ones(1, device="cuda").item())) == 1  # the count sees a real one
    measured, plain = syncs_in_steps(tmp_path, "measured", True), syncs_in_steps(tmp_path, "plain", False)
    assert len(measured) == len(plain), "\n---\n".join(["with the noise scale:", *measured, "without:", *plain])


def test_determinism_follows_the_config():
    try:
        set_determinism(False, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        set_determinism(True, torch.device("cuda"))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
