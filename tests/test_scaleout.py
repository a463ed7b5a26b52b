"""Layout invariance, elastic resume, failures and cluster launchers, with real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from largebatch import checkpoint
from largebatch.bench import free_port
from largebatch.dist import first_host, from_env

from conftest import ROOT, run_cli
from test_train import TINY

# fmnist with augmentation on, fp32, BN groups of 16, global batch 64 = P x A x 16, fp64 gradient sums
LAYOUT = [*TINY, "--micro-batch", "16", "--set", "data.augment=true", "--set", "schedule.horizon_epochs=0.1",
          "--set", "dist.exact_reduction=true"]


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if x.is_floating_point():
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
        else:
            assert torch.equal(x, y), k
    return worst


def final(path):
    return checkpoint.load(path / "checkpoints/last.pt")["model"]


def srun_like(args, nprocs, out):
    """Start processes the way srun does: no torchrun, only SLURM's variables."""
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nprocs),
               "SLURM_LOCALID": str(rank), "SLURM_NTASKS_PER_NODE": str(nprocs),
               "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "largebatch", "train", *map(str, args), "--out", str(out)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-3000:]


def test_layouts_and_launchers_train_the_same_model(tmp_path, fmnist_dir):
    """1x4, 2x2 (torchrun), 2x2 (srun-style) and 4x1 for 20 steps; then elastic: 2 processes
    for 10 steps, resumed on 1 process to 20."""
    args = [*LAYOUT, "--steps", "20"]
    run_cli("train", *args, "--out", tmp_path / "1x4")
    run_cli("train", *args, "--out", tmp_path / "2x2", nproc=2)
    run_cli("train", *args, "--out", tmp_path / "4x1", nproc=4)
    srun_like(args, 2, tmp_path / "srun")
    ref = final(tmp_path / "1x4")
    deviations = {name: max_rel_diff(ref, final(tmp_path / name)) for name in ("2x2", "4x1", "srun")}
    # elastic resume: the checkpoint of a 2-process run continues on 1 process
    run_cli("train", *LAYOUT, "--steps", "10", "--out", tmp_path / "elastic", nproc=2)
    run_cli("train", *args, "--out", tmp_path / "elastic", "--resume")
    deviations["elastic"] = max_rel_diff(ref, final(tmp_path / "elastic"))
    print("max relative deviation from 1x4:", deviations)
    assert all(d <= 1e-5 for d in deviations.values()), deviations
    for name, (procs, accum) in {"1x4": (1, 4), "2x2": (2, 2), "4x1": (4, 1), "srun": (2, 2)}.items():
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert (s["processes"], s["accum_steps"], s["micro_batch"]) == (procs, accum, 16)
    logged = [json.loads(l) for l in (tmp_path / "2x2/metrics.jsonl").read_text().splitlines()]
    assert all(l["comm_seconds"] > 0 for l in logged if "comm_seconds" in l)


def test_sync_bn_on_two_processes_equals_whole_batch_bn_on_one(tmp_path, fmnist_dir):
    """SyncBN: 2 processes x 32 normalise over 64 samples, like one process with micro-batch 64.
    One step: the micro-batches differ in size, so their convolutions round differently and
    later steps amplify that in near-zero tensors; the first update shows the statistics agree."""
    sync = [*TINY, "--steps", "1", "--set", "dist.exact_reduction=true", "--set", "model.bn_group_size=0"]
    run_cli("train", *sync, "--set", "model.sync_bn=true", "--micro-batch", "64", "--out", tmp_path / "one")
    run_cli("train", *sync, "--set", "model.sync_bn=true", "--micro-batch", "32", "--out", tmp_path / "two", nproc=2)
    run_cli("train", *sync, "--micro-batch", "32", "--out", tmp_path / "local", nproc=2)
    deviation = max_rel_diff(final(tmp_path / "one"), final(tmp_path / "two"))
    print("SyncBN 1x64 vs 2x32 deviation:", deviation)
    assert deviation <= 1e-5
    # without sync each process normalises its own 32 samples: a different model
    assert max_rel_diff(final(tmp_path / "one"), final(tmp_path / "local")) > 1e-3


def test_killed_worker_restarts_from_checkpoint_and_ends_identical(tmp_path, fmnist_dir):
    args = ["--recipe", "fmnist-large", "--global-batch", "512", "--micro-batch", "64", "--steps", "40",
            "--set", "train.bf16=false", "--set", "train.channels_last=false", "--set", "schedule.warmup_epochs=0",
            "--set", "train.eval_every_epochs=0", "--set", "train.checkpoint_every_steps=5",
            "--set", "train.keep_checkpoints=2"]
    run_cli("train", *args, "--out", tmp_path / "clean", nproc=2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", "-m", "largebatch", "train", *args, "--out", str(out), "--resume"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints/step-00000010.pt").exists():
        assert agent.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    output, _ = agent.communicate(timeout=600)
    assert agent.returncode == 0, output[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_step"] >= 10, "the group did not restart from a checkpoint"
    assert max_rel_diff(final(tmp_path / "clean"), final(out)) == 0.0
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one eval line shares the last step


def test_sigterm_checkpoints_and_resume_finishes_the_same(tmp_path, fmnist_dir):
    base = ["train", *LAYOUT, "--set", "schedule.decay=constant"]
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "largebatch", *base, "--steps", "400", "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    stopped = checkpoint.load(out / "checkpoints/last.pt")["step"]
    assert 2 <= stopped < 400
    assert f"checkpoint at step {stopped}" in output
    run_cli(*base, "--steps", stopped + 3, "--out", out, "--resume")
    run_cli(*base, "--steps", stopped + 3, "--out", tmp_path / "ref")
    assert max_rel_diff(final(tmp_path / "ref"), final(out)) == 0.0


def test_launcher_environments():
    assert from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).rank == 1
    slurm = from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x4)"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size) == (5, 8, 1, 2)
    ompi = from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                     "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (ompi.rank, ompi.world_size, ompi.local_world_size) == (3, 4, 2)
    pmi = from_env({"PMI_RANK": "2", "PMI_SIZE": "3"})
    assert (pmi.rank, pmi.world_size) == (2, 3)
    assert from_env({}).world_size == 1
    assert first_host("gpu[003-010,020],cpu1") == "gpu003" and first_host("node7,node8") == "node7"


def test_slurm_script(tmp_path):
    script = tmp_path / "job.sh"
    out = run_cli("slurm", "--nodes", "448", "--procs-per-node", "2", "--threads", "20", "--time", "01:30:00",
                  "--out", tmp_path / "run", "--write", script, "--", "--recipe", "sc18-run-a", "--data", "/d").stdout
    text = script.read_text()
    for want in ("#SBATCH --nodes=448", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=20",
                 "#SBATCH --signal=USR1@300", "#SBATCH --open-mode=append", "export OMP_NUM_THREADS=20", "srun --cpu-bind=cores",
                 "--recipe sc18-run-a --data /d", "--set train.threads=20 --resume", "scontrol requeue"):
        assert want in text, want
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert (tmp_path / "run").is_dir() and "sbatch" in out


def test_compiled_training_resumes_bitwise_and_keeps_the_layout(tmp_path, fmnist_dir):
    """train.compile=true: 1x4 for 4 steps equals the same run stopped at 2 and resumed
    (bitwise), and equals 2x2 (2 processes x 2 micro-batches, exact reduction)."""
    args = [*LAYOUT, "--set", "train.compile=true"]
    run_cli("train", *args, "--steps", "4", "--out", tmp_path / "1x4")
    run_cli("train", *args, "--steps", "2", "--out", tmp_path / "split")
    run_cli("train", *args, "--steps", "4", "--out", tmp_path / "split", "--resume")
    run_cli("train", *args, "--steps", "4", "--out", tmp_path / "2x2", nproc=2)
    ref = final(tmp_path / "1x4")
    assert max_rel_diff(ref, final(tmp_path / "split")) == 0.0
    assert max_rel_diff(ref, final(tmp_path / "2x2")) <= 1e-5
    assert "compile: true" in (tmp_path / "2x2/config.yaml").read_text()
