"""The Collapsed Ensemble: probability averaging, snapshots, the ensemble command, resume."""
import json
import os
import shutil

import torch
from torch import nn

from largebatch import checkpoint
from largebatch.ensemble import RunningEnsemble, snapshot_files

from conftest import run_cli
from test_train import TINY, assert_bitwise_equal


class Table:
    """Six samples whose input is their index; labels fixed."""
    channels, num_classes = 1, 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def __len__(self):
        return 6

    def __getitem__(self, spec):
        idx = torch.tensor(spec.indices)
        return idx.float().view(-1, 1), self.labels[idx], []


class Lookup(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.view(-1).long()]


def test_ensemble_is_the_mean_of_softmax_probabilities_by_hand():
    a = torch.tensor([[2., 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 1], [2, 1, 0], [0, 0, 5]])
    b = torch.tensor([[0., 0, 1], [0, 2, 0], [0, 0, 4], [2, 0, 0], [0, 0, 3], [1, 0, 0]])
    ens = RunningEnsemble(Table(), batch=4, device=torch.device("cpu"))  # two batches: 4 + 2 samples
    first = ens.add(Lookup(a))
    second = ens.add(Lookup(b))
    want = (a.softmax(1) + b.softmax(1)) / 2
    torch.testing.assert_close(ens.probabilities(), want)
    # by hand: a is right on samples 0, 1, 5 and b on 1, 2, 3; the mean probabilities are right on
    # 0, 1, 2, 3 and 5. Sample 2: a puts 0.909 on class 1, b 0.965 on class 2: mean 0.47 vs 0.53.
    assert first["top1"] == 3 / 6 and second["top1"] == 3 / 6
    assert (want.argmax(1) == Table.labels).tolist() == [True, True, True, True, False, True]
    assert second["ensemble_top1"] == 5 / 6 and first["ensemble_top1"] == first["top1"]
    assert second["ensemble_members"] == 2 and second["samples"] == 6


CE = [*TINY, "--steps", "60", "--set", "ensemble.cycles=3", "--set", "data.eval_samples=2000",
      "--set", "train.checkpoint_every_steps=3", "--set", "train.keep_checkpoints=30"]
# 60 steps: main 0-30, cycles 30-38, 38-46, 46-54, collapse 54-60; snapshots at 38, 46, 54, 60


def test_collapsed_ensemble_run_snapshots_ensemble_command_and_mid_cycle_resume(tmp_path, fmnist_dir):
    full = tmp_path / "full"
    run_cli("train", *CE, "--out", full)
    snaps = snapshot_files(full)
    assert [p.name for p in snaps] == ["01.pt", "02.pt", "03.pt", "04.pt"]
    states = [checkpoint.load(p) for p in snaps]
    assert [s["step"] for s in states] == [38, 46, 54, 60]
    assert [s["phase"]["name"] for s in states] == ["cycle1", "cycle2", "cycle3", "collapse"]
    logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    at_snapshots = [line for line in logged if "snapshot" in line]
    assert [line["ensemble_members"] for line in at_snapshots] == [1, 2, 3, 4]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["ensemble_top1"] == at_snapshots[-1]["ensemble_top1"] and len(summary["snapshots"]) == 4

    # the command: members alone, and the last k for k = 1..4, equal to what training logged
    report = tmp_path / "ensemble.json"
    out = json.loads(run_cli("ensemble", *snaps, "--out", report).stdout)
    assert out == json.loads(report.read_text())
    assert [m["top1"] for m in out["members"]] == [line["top1"] for line in at_snapshots]
    assert [e["k"] for e in out["ensembles"]] == [1, 2, 3, 4]
    assert out["ensembles"][0]["top1"] == out["members"][-1]["top1"]
    assert out["ensembles"][-1]["top1"] == at_snapshots[-1]["ensemble_top1"]
    # two processes, each sample counted once: the same numbers
    two = json.loads(run_cli("ensemble", *snaps, nproc=2).stdout.strip().splitlines()[-1])
    assert [e["top1"] for e in two["ensembles"]] == [e["top1"] for e in out["ensembles"]]

    # resume in the middle of cycle 2 (step 42), after snapshot 1: the same weights, the same
    # later snapshots, and the running ensemble rebuilt from snapshot 1's file
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    ckpts = cut / "checkpoints"
    for p in ckpts.glob("step-*.pt"):
        if int(p.stem.split("-")[1]) > 42:
            p.unlink()
    (ckpts / "last.pt").unlink()
    os.link(ckpts / "step-00000042.pt", ckpts / "last.pt")
    for p in snapshot_files(cut)[1:]:
        p.unlink()
    run_cli("train", *CE, "--out", cut, "--resume")
    assert json.loads((cut / "run.json").read_text())["resumed_from_step"] == 42
    assert_bitwise_equal(checkpoint.load(full / "checkpoints/last.pt")["model"],
                         checkpoint.load(ckpts / "last.pt")["model"])
    for a, b in zip(snaps, snapshot_files(cut)):
        assert_bitwise_equal(checkpoint.load(a)["model"], checkpoint.load(b)["model"])
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["snapshots"] == summary["snapshots"]


def test_ensemble_command_rejects_different_models(tmp_path, fmnist_dir):
    quick = [*TINY, "--steps", "1", "--set", "data.eval_samples=500"]
    run_cli("train", *quick, "--out", tmp_path / "a")
    run_cli("train", *quick, "--model", "resnet14", "--out", tmp_path / "b")
    proc = run_cli("ensemble", tmp_path / "a/checkpoints/last.pt", tmp_path / "b/checkpoints/last.pt", check=False)
    assert proc.returncode == 2 and "is not the same model" in proc.stderr
