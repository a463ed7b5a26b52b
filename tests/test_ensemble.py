"""The Collapsed Ensemble: probability averaging, snapshots, the ensemble command, resume."""
import json
import os
import shutil

import torch
from torch import nn

from largebatch import checkpoint
from largebatch.data.sampler import BatchSpec
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
    # top-1 classes: a 0 1 1 2 0 2, b 2 1 2 0 2 0: they agree on sample 1 only; a is wrong on
    # 2, 3 and 4, of which b gets 2 and 3 right
    assert first["disagreement"] == 0 and first["right_where_first_wrong"] == 0
    assert second["disagreement"] == 5 / 6 and second["right_where_first_wrong"] == 2 / 6


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
    # two processes, each sample counted once: the same numbers (both on the CPU where
    # there is one GPU: a process per GPU)
    cpu = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.device_count() == 1 else None
    one = json.loads(run_cli("ensemble", *snaps, env=cpu).stdout) if cpu else out
    two = json.loads(run_cli("ensemble", *snaps, nproc=2, env=cpu).stdout.strip().splitlines()[-1])
    assert [e["top1"] for e in two["ensembles"]] == [e["top1"] for e in one["ensembles"]]
    # each member against the last snapshot: the last agrees with itself; the shares are
    # counts over the whole evaluation set, so two processes give them too
    assert out["members"][-1]["disagrees_with_last"] == 0 and out["members"][-1]["right_where_last_wrong"] == 0
    diffs = lambda r: [(m["disagrees_with_last"], m["right_where_last_wrong"]) for m in r["members"]]  # noqa: E731
    assert diffs(two) == diffs(one)
    assert all(0 <= right <= agree_not <= 1 for agree_not, right in diffs(out))

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


def test_weight_average_and_bn_recomputation_by_hand():
    """The average of three states tensor by tensor; BN statistics set to the mean of the
    group statistics a training-mode pass computes, checked on a first BN layer whose
    input is the data itself."""
    from largebatch.averaging import average_states, recompute_bn
    from largebatch.data import model_input
    from largebatch.data.synthetic import Synthetic
    from largebatch.models.group_bn import convert
    torch.manual_seed(0)
    nets = [convert(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 8, 0.1)
            for _ in range(3)]
    for i, n in enumerate(nets):
        for p in n.parameters():
            p.data.normal_()
        n[0].num_batches_tracked.fill_(i)
    states = [n.state_dict() for n in nets]
    avg = average_states(states)
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (states[0][k] + states[1][k] + states[2][k]) / 3)
    assert avg["0.num_batches_tracked"] == 2  # integer buffers: the last state's

    data = Synthetic(48, 10, 3, 6, seed=1)
    model = nets[0]
    model.load_state_dict(avg)
    assert recompute_bn(model, data, 16, 40, torch.device("cpu")) == 32  # whole batches of 16 only
    x = torch.stack([model_input(data[BatchSpec(tuple(range(i, i + 16)), 0)][0], torch.device("cpu"))
                     for i in (0, 16)])  # 2 x 16 samples, normalised as the model sees them
    groups = x.reshape(4, 8, 3, 6, 6)  # groups of 8 samples, as in training
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.var(dim=(1, 3, 4), correction=1).mean(0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert model.training  # left as it was


def test_averaged_collapse_from_the_ensemble_command(tmp_path, fmnist_dir):
    run_cli("train", *CE, "--out", tmp_path / "ce")
    snaps = snapshot_files(tmp_path / "ce")
    out = json.loads(run_cli("ensemble", *snaps[-3:], "--average", tmp_path / "avg.pt", "--bn-samples", "2000").stdout)
    avg = out["average"]
    assert avg["members"] == 3 and avg["forward_passes"] == 1 and avg["bn_samples"] == 1984  # whole micro-batches of 32
    assert [e["forward_passes"] for e in out["ensembles"]] == [1, 2, 3]
    assert out["ensembles"][-1]["seconds"] > out["ensembles"][0]["seconds"] > 0
    # a checkpoint like any other: `largebatch eval` loads it and agrees
    again = json.loads(run_cli("eval", "--checkpoint", tmp_path / "avg.pt").stdout.splitlines()[-1])
    assert again["top1"] == avg["top1"]
    state = checkpoint.load(tmp_path / "avg.pt")
    assert state["averaged_from"] == [str(p) for p in snaps[-3:]]


def test_averaged_torchvision_model_loads_into_plain_torchvision():
    import torchvision
    from largebatch.averaging import average_states
    from largebatch.config import ModelConfig
    from largebatch.models import build_model
    states = [build_model(ModelConfig(name="resnet18"), 3, 10).state_dict() for _ in range(2)]
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(average_states(states))  # strict: the same keys, shapes and buffers
