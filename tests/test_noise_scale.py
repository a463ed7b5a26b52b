"""The gradient noise scale against a case with a known answer: a linear least-squares
model, whose per-sample gradients give |G|^2 and tr(Sigma) exactly over the dataset."""
import json
import re

import pytest
import torch

from largebatch import grad_sync
from largebatch.cli import main as cli_main
from largebatch.config import DistConfig
from largebatch.noise_scale import NoiseScale, batches, two_batch

from test_train import TINY as TRAIN_TINY

N, D = 4096, 8


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.zeros(D, dtype=torch.float64)  # far from the optimum: |G|^2 is not tiny
    per_sample = (x @ w - y)[:, None] * x     # gradient of 0.5 (x.w - y)^2
    mean = per_sample.mean(0)
    exact_g2 = float(mean @ mean)
    exact_tr = float(((per_sample - mean) ** 2).sum(1).mean())
    return x, y, w, exact_g2, exact_tr


def test_two_batch_formula_is_unbiased():
    x, y, w, g2, tr = problem()
    gen = torch.Generator().manual_seed(1)
    norms = {}
    for b in (16, 256):
        sq = []
        for _ in range(4000):
            i = torch.randint(N, (b,), generator=gen)  # sampling with replacement
            grad = (((x[i] @ w - y[i])[:, None]) * x[i]).mean(0)
            sq.append(float(grad @ grad))
        norms[b] = sum(sq) / len(sq)
    e = two_batch(norms[16], norms[256], 16, 256)
    assert e.grad_sq == pytest.approx(g2, rel=0.05)
    assert e.trace_cov == pytest.approx(tr, rel=0.05)
    assert e.noise_scale == pytest.approx(tr / g2, rel=0.08)


@pytest.mark.parametrize("exact", [False, True])
def test_measured_in_the_step_under_accumulation(exact):
    """The norms grad_sync gathers during a real accumulated step (one process: the first
    micro-batch is the small batch) give the exact noise scale."""
    x, y, w, g2, tr = problem()
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    accum, micro = 4, 16
    sync = grad_sync.build(model, torch.device("cpu"), accum, DistConfig(exact_reduction=exact), measure=True)
    noise = NoiseScale(decay=0.99)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3000):
        for a in range(accum):
            i = torch.randint(N, (micro,), generator=gen)
            with sync.micro_step(a):
                loss = 0.5 * ((sync.module(x[i]).squeeze(1) - y[i]) ** 2).mean()
            sync.backward(loss)
        sync.finish()
        small, big = sync.take_sq_norms()
        noise.update(float(small), float(big), *batches(1, accum, micro))
        model.zero_grad(set_to_none=True)
    assert noise.run_mean() == pytest.approx(tr / g2, rel=0.1)


def test_the_late_mean_reads_only_the_second_half():
    """B_simple grows as the loss falls: the late mean is the ratio of the second half's
    sums alone, the run mean that of every window's."""
    noise = NoiseScale()
    norms = lambda g2, tr: (g2 + tr / 16, g2 + tr / 64)  # noqa: E731  E|G_B|^2 at B = 16 and 64
    for _ in range(5):
        noise.update(*norms(1.0, 100.0), 16, 64)
    assert noise.late_mean() is None
    for _ in range(5):
        noise.update(*norms(0.1, 100.0), 16, 64, late=True)
    assert noise.late_mean() == pytest.approx(1000.0)
    assert noise.run_mean() == pytest.approx(1000.0 / 5.5)


def test_layouts_and_their_batch_sizes():
    assert batches(4, 2, 32) == (64, 256)    # several processes: each one's share
    assert batches(1, 4, 32) == (32, 128)    # one process: the first micro-batch
    assert batches(1, 1, 128) is None         # one batch size: nothing to compare


TINY = [*TRAIN_TINY, "--set", "data.eval_samples=500"]  # global batch 64


def test_every_run_reports_it(tmp_path, fmnist_dir, capsys):
    out = tmp_path / "accum"
    cli_main(["train", *TINY, "--micro-batch", "16", "--steps", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [l for l in lines if "loss" in l and not l.get("eval")]
    assert all(l["noise_batches"] == [16, 64] and l["noise_scale"] > 0 and l["trace_cov"] > 0 for l in logged)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["noise_scale"] > 0 and summary["noise_batches"] == [16, 64]
    assert summary["noise_scale_late"] > 0
    assert re.search(rf"gradient noise scale +{summary['noise_scale']:.0f} \(run mean\), "
                     rf"{summary['noise_scale_late']:.0f} over the second half", printed)
    # resumed at its end (a job requeued after its last step): the estimate comes back whole
    cli_main(["train", *TINY, "--micro-batch", "16", "--steps", "6", "--out", str(out), "--resume"])
    again = json.loads((out / "summary.json").read_text())
    assert again["noise_scale"] == summary["noise_scale"] and again["noise_batches"] == [16, 64]
    assert again["noise_scale_late"] == summary["noise_scale_late"]
    capsys.readouterr()
    out = tmp_path / "plain"
    cli_main(["train", *TINY, "--micro-batch", "64", "--steps", "2", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["noise_scale"] is None and "one batch size" in summary["noise_scale_note"]
    assert "gradient noise scale" not in capsys.readouterr().out
