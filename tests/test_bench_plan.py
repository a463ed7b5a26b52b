"""`largebatch bench` and `largebatch plan`: the commands work and the model's arithmetic
is what its docstring says."""
import json
import math

import pytest
import torch

from largebatch import bench, plan

from conftest import run_cli


def test_bench_sweep_reports_throughput_breakdown_scaling_and_allreduce(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run_cli("bench", "--model", "resnet8", "--batch", "32", "--steps", "2", "--warmup", "1", "--repeats", "2",
            "--procs", "1,2", "--out", out, "--plot", png, timeout=300)
    r = json.loads(out.read_text())
    assert r["images_per_sec"] > 0 and r["images_per_sec_spread"] >= 0
    assert [s["procs"] for s in r["scaling"]] == [1, 2]
    one, two = r["runs"]
    assert r["scaling"][0]["efficiency"] == pytest.approx(1.0)
    assert r["scaling"][1]["efficiency"] == pytest.approx(two["images_per_sec"] / (2 * one["images_per_sec"]))
    assert two["global_batch"] == 64 and one["global_batch"] == 32            # weak scaling
    assert r["bn_group_size"] == 32                                            # the training default
    for run in r["runs"]:
        b = run["breakdown"]
        parts = b["data"] + b["forward"] + b["backward"] + b["comm_exposed"] + b["optimizer"]
        assert 0.8 * b["step"] <= parts <= 1.05 * b["step"], b                 # the parts make the step
    a = two["allreduce"]
    assert a["alpha"] >= 0 and a["beta"] > 0 and len(a["points"]) >= 3
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args,says", [
    (["bench", "--procs", "1,x"], "argument --procs: expected a positive integer, got 'x'"),
    (["bench", "--procs", "0"], "argument --procs: must be positive"),
    (["bench", "--steps", "0"], "argument --steps: must be positive"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["plan", "--node-images-per-sec", "0"], "argument --node-images-per-sec: must be a positive number"),
    (["plan", "--nodes", "1,0"], "argument --nodes: must be positive"),
    (["slurm", "--nodes", "2", "--threads", "0"], "argument --threads: must be positive"),
    (["bench-data", "somewhere", "--workers", "-1"], "argument --workers: must be 0 or more"),
    (["train", "--epochs", "0"], "argument --epochs: must be a positive number"),
])
def test_counts_are_checked_when_parsed(args, says):
    """One line naming the option, before anything starts: not a ZeroDivisionError later."""
    proc = run_cli(*args, check=False, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_bench_reports_a_workers_setting_error_in_one_line():
    proc = run_cli("bench", "--model", "vgg16", "--steps", "1", "--repeats", "1", "--warmup", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[-1]  # one line
    assert "largebatch: error: bench: model.name: unknown model 'vgg16'" in proc.stderr


@pytest.mark.parametrize("asked,batch,expect", [(None, 64, 32), (None, 48, 0), (0, 64, 0), (16, 64, 16)])
def test_bench_bn_groups_default_to_trainings_and_can_be_set(asked, batch, expect):
    spec = {"model": "resnet8", "batch": batch, "image_size": 32, "classes": 10, "channels": 3, "dtype": "fp32",
            "channels_last": False, "threads": 1, "warmup": 1, "steps": 1, "repeats": 1, "bn_group_size": asked}
    assert bench.bench_config(spec, 1).model.bn_group_size == expect


def test_the_ceiling_is_the_faster_of_the_matrix_product_and_the_1x1_convolution(monkeypatch):
    seen = []

    def fake_rate(product, flops, device, seconds):
        seen.append((flops, product().numel()))
        return [100.0, 180.0][len(seen) - 1]

    monkeypatch.setattr(bench, "_rate", fake_rate)
    assert bench.matmul_gflops(torch.float32) == 180.0
    assert seen == [(2 * 2048 ** 3, 2048 ** 2)] * 2  # two products of the same size


def test_ring_tree_and_hierarchical_costs_by_hand():
    net = plan.Network(alpha=1e-6, beta=1e-9, alpha_intra=1e-7, beta_intra=1e-10)
    n = 1e8
    assert plan.allreduce_seconds(n, 1, 1, net, "ring") == 0.0
    assert plan.allreduce_seconds(n, 4, 2, net, "ring") == pytest.approx(2 * 7 * 1e-6 + 2 * 7 / 8 * n * 1e-9)
    assert plan.allreduce_seconds(n, 4, 2, net, "tree") == pytest.approx(2 * 3 * 1e-6 + 2 * 7 / 8 * n * 1e-9)
    hier = 2 * 1 * 1e-7 + 2 * 0.5 * n * 1e-10 + 2 * 3 * 1e-6 + 2 * 3 / 4 * n * 1e-9
    assert plan.allreduce_seconds(n, 4, 2, net, "hierarchical") == pytest.approx(hier)
    # one node: the intra-node network
    assert plan.allreduce_seconds(n, 1, 2, net, "ring") == pytest.approx(2 * 1e-7 + n * 1e-10)


def test_overlap_hides_communication_behind_backward():
    cost = lambda n: n * 1e-9  # 1 GB/s
    # 100 MB in 4 buckets of 25 MB, each 25 ms; backward 1 s: only the last bucket's 25 ms shows
    total, exposed = plan.exposed_comm(1.0, 100e6, 25e6, cost)
    assert total == pytest.approx(0.1) and exposed == pytest.approx(0.025)
    # backward 10 ms: communication is the bottleneck, 100 ms from the first bucket's readiness
    total, exposed = plan.exposed_comm(0.01, 100e6, 25e6, cost)
    assert exposed == pytest.approx(0.0025 + 0.1 - 0.01)


def test_predictions_efficiency_and_time_to_train():
    compute = plan.Compute.from_node_throughput(100.0, 2)   # 0.02 s per image per process
    net = plan.Network.named("omnipath-100")
    one = plan.predict(compute, net, 1e8, 1, 1, 32, 90, 1281167)
    assert one.efficiency == 1.0 and one.images_per_sec == pytest.approx(1 / 0.02)
    row = plan.predict(compute, net, 1e8, 64, 2, 64 * 2 * 16, 90, 1281167)
    assert row.step_seconds == pytest.approx(row.compute_seconds + row.exposed_comm_seconds)
    assert row.time_to_train_seconds == pytest.approx(90 * 1281167 / row.images_per_sec)
    assert 0.9 < row.efficiency < 1.0
    hit = plan.nodes_for_deadline(compute, net, 1e8, 2, 16, 90, 1281167, 28 * 60, "hierarchical", 25)
    assert hit["time_to_train_seconds"] <= 28 * 60
    fewer = plan.predict(compute, net, 1e8, hit["nodes"] - 1, 2, (hit["nodes"] - 1) * 32, 90, 1281167, "hierarchical")
    assert fewer.time_to_train_seconds > 28 * 60


def test_plan_cli_from_a_bench_file_and_from_the_paper(tmp_path):
    bench = {"runs": [{"procs": 1, "global_batch": 16, "parameters": 1000,
                       "breakdown": {"forward": 0.1, "backward": 0.2, "optimizer": 0.0, "data": 0.0}},
                      {"procs": 2, "allreduce": {"alpha": 1e-4, "beta": 1e-9}}]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    out = tmp_path / "plan.json"
    run_cli("plan", "--bench", tmp_path / "b.json", "--nodes", "1,2", "--procs-per-node", "1", "--batch-per-proc", "16",
            "--epochs", "1", "--dataset-size", "1600", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["nodes"] for r in rows] == [1, 2]
    assert rows[0]["step_seconds"] == pytest.approx(0.3) and rows[0]["time_to_train_seconds"] == pytest.approx(30)
    for key in ("nodes", "procs", "global_batch", "step_seconds", "images_per_sec", "efficiency", "time_to_train_seconds"):
        assert key in rows[1]
    paper = run_cli("plan", "--node-images-per-sec", "98.5", "--procs-per-node", "2", "--batch-per-proc", "16",
                    "--interconnect", "omnipath-100", "--nodes", "64", "--deadline-minutes", "28",
                    "--plot", tmp_path / "p.png").stdout
    assert "deadline 28.0 min" in paper and (tmp_path / "p.png").exists()
    bad = run_cli("plan", "--node-images-per-sec", "98.5", "--batch-per-proc", "16", check=False)
    assert bad.returncode == 2 and "--interconnect" in bad.stderr
    assert math.isfinite(rows[1]["efficiency"])


def test_a_noise_scale_makes_the_epochs_grow_with_the_batch():
    """E(B) = E_min (1 + B / B_noise), anchored at the reference batch's epochs."""
    stats = plan.Statistics(noise_scale=1000, reference_batch=100)
    assert stats.epochs(100, 90) == pytest.approx(90)
    e_min = 90 / 1.1
    assert stats.epochs(1000, 90) == pytest.approx(2 * e_min)       # at B_noise: twice the fewest epochs
    assert stats.epochs(10_000, 90) == pytest.approx(11 * e_min)
    compute = plan.Compute.from_node_throughput(100.0, 1)
    net = plan.Network.named("omnipath-100")
    row = plan.predict(compute, net, 1e8, 8, 1, 8 * 125, 90, 50_000, stats=stats)
    assert row.epochs_to_target == pytest.approx(stats.epochs(1000, 90))
    assert row.time_to_target_seconds == pytest.approx(row.epochs_to_target * 50_000 / row.images_per_sec)
    assert plan.predict(compute, net, 1e8, 8, 1, 1000, 90, 50_000).time_to_target_seconds is None
    # The deadline counts the extra epochs: the fewest nodes that reach the target in time
    deadline = 1.5 * row.time_to_target_seconds
    hit = plan.nodes_for_deadline(compute, net, 1e8, 1, 125, 90, 50_000, deadline, "hierarchical", 25,
                                  max_nodes=64, stats=stats)
    assert hit["time_to_target_seconds"] <= deadline and hit["epochs_to_target"] > 90
    fewer = plan.predict(compute, net, 1e8, hit["nodes"] - 1, 1, (hit["nodes"] - 1) * 125, 90, 50_000, stats=stats)
    assert fewer.time_to_target_seconds > deadline
    # Far past B_noise more nodes buy little: a deadline below S_min x step time is never met
    assert plan.nodes_for_deadline(compute, net, 1e8, 1, 125, 90, 50_000, 60, "hierarchical", 25,
                                   max_nodes=64, stats=stats) is None


def test_plan_cli_reads_the_noise_scale_of_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"noise_scale": 900.0, "noise_scale_late": 1200.0, "noise_scale_final": 5000.0,
                                                  "global_batch": 128}))
    out = tmp_path / "plan.json"
    shown = run_cli("plan", "--node-images-per-sec", "1000", "--interconnect", "ethernet-100", "--batch-per-proc", "128",
                    "--nodes", "1,4,16,64", "--epochs", "12", "--dataset-size", "60000", "--noise-scale", run,
                    "--out", out).stdout
    result = json.loads(out.read_text())
    assert result["statistics"] == {"noise_scale": 1200.0, "reference_batch": 128}
    rows = result["rows"]
    assert rows[0]["epochs_to_target"] == pytest.approx(12)
    assert rows[-1]["epochs_to_target"] == pytest.approx(12 * (1 + 8192 / 1200) / (1 + 128 / 1200))
    assert "noise scale 1200" in shown and "fastest to the target" in shown
    # 4 nodes (batch 512) keeps scaling x epochs efficiency above 0.5, 16 (2,048) does not
    assert "worth its nodes (scaling x epochs efficiency >= 0.5) up to 4 nodes, global batch 512" in shown
    (run / "summary.json").write_text(json.dumps({"noise_scale": None, "noise_scale_note": "not measured: one batch"}))
    bad = run_cli("plan", "--node-images-per-sec", "1000", "--interconnect", "ethernet-100", "--batch-per-proc", "128",
                  "--noise-scale", run, check=False)
    assert bad.returncode == 2 and "has no gradient noise scale (not measured: one batch)" in bad.stderr
    bad = run_cli("plan", "--node-images-per-sec", "1000", "--interconnect", "ethernet-100", "--batch-per-proc", "128",
                  "--noise-scale", "3000", check=False)
    assert bad.returncode == 2 and "--reference-batch" in bad.stderr and "Traceback" not in bad.stderr
