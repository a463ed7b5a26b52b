"""Watching runs: TensorBoard scalars (read back with tensorboard's own reader) and
`largebatch compare` (a table and a PNG of several runs' curves)."""
import json

import pytest

from PIL import Image

from largebatch.cli import main as cli_main

from conftest import run_cli
from test_train import TINY as TRAIN_TINY

TINY = [*TRAIN_TINY, "--set", "data.eval_samples=500"]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_every_metric_and_survives_a_resume(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    cli_main(["train", *TINY, "--steps", "4", "--out", str(out)])
    cli_main(["train", *TINY, "--steps", "6", "--out", str(out), "--resume"])
    tags = scalars(out)
    for tag in ("train/loss", "train/lr", "train/images_per_sec", "train/comm_exposed_share",
                "train/noise_scale", "eval/top1", "eval/top5"):
        assert tag in tags, (tag, sorted(tags))
    assert [s for s, _ in tags["train/loss"]] == [2, 4, 6]
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last = [l for l in logged if "loss" in l and not l.get("eval")][-1]
    assert tags["train/loss"][-1][1] == pytest.approx(last["loss"], rel=1e-6)
    off = tmp_path / "off"
    cli_main(["train", *TINY, "--steps", "2", "--out", str(off), "--set", "train.tensorboard=false"])
    assert not (off / "tensorboard").exists()


def test_compare_prints_a_table_and_plots_the_curves(tmp_path, fmnist_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    cli_main(["train", *TINY, "--steps", "4", "--out", str(a), "--set", "train.eval_every_epochs=0.002"])
    cli_main(["train", *TINY, "--steps", "4", "--out", str(b), "--set", "schedule.peak_lr=0.01",
              "--set", "train.eval_every_epochs=0.002"])
    png = tmp_path / "cmp.png"
    proc = run_cli("compare", a, b, "--plot", png)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "state", "epochs"]
    rows = [l for l in lines if l.startswith(str(tmp_path))]
    assert len(rows) == 2 and all("finished" in r for r in rows)
    top1 = json.loads((a / "summary.json").read_text())["top1"]
    assert f"{100 * top1:.2f}" in rows[0]
    with Image.open(png) as img:
        assert img.size[0] > 800 and img.size[1] > 500
    proc = run_cli("compare", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr and "Traceback" not in proc.stderr
