"""`largebatch slurm`: an sbatch script for N nodes x P processes per node.

Processes are started by srun itself (no torchrun): each reads its rank from SLURM's
environment, the first node hosts the rendezvous, threads are pinned to the cores of
the task (`--cpu-bind=cores`), as the SC18 runs pinned 2 ranks per dual-socket node.
SLURM sends SIGUSR1 `signal_seconds` before the wall-time limit; the run checkpoints,
exits, and the script requeues the job, which resumes from the checkpoint.
"""
from __future__ import annotations

import shlex


def sbatch_script(train_args: list[str], nodes: int, procs_per_node: int, threads: int, time: str,
                  out: str, partition: str | None = None, account: str | None = None,
                  gpus_per_node: int = 0, signal_seconds: int = 300, python: str = "python") -> str:
    if nodes < 1 or procs_per_node < 1 or threads < 1:
        raise ValueError("--nodes, --procs-per-node and --threads must be positive")
    opt = ["--job-name=largebatch", f"--nodes={nodes}", f"--ntasks-per-node={procs_per_node}",
           f"--cpus-per-task={threads}", f"--time={time}", f"--signal=USR1@{signal_seconds}",
           "--requeue", f"--output={out}/slurm-%j.out", "--open-mode=append"]  # a requeued start keeps the log
    if partition:
        opt.append(f"--partition={partition}")
    if account:
        opt.append(f"--account={account}")
    if gpus_per_node:
        opt.append(f"--gpus-per-node={gpus_per_node}")
    cmd = [python, "-m", "largebatch", "train", *train_args, "--out", out,
           "--set", f"train.threads={threads}", "--resume"]
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opt), "",
             f"# {nodes} nodes x {procs_per_node} processes = {nodes * procs_per_node} processes, "
             f"{threads} threads each.",
             "# Rank, world size and the rendezvous host come from SLURM's environment.",
             f"export OMP_NUM_THREADS={threads}",
             "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
             f"mkdir -p {shlex.quote(out)}", "",
             "srun --cpu-bind=cores --kill-on-bad-exit=1 \\",
             "    " + shlex.join(cmd),
             "status=$?", "",
             "# 138 = stopped by SIGUSR1 (wall time near), 143 = SIGTERM: a checkpoint was written;",
             "# requeue the job, which continues from it (--resume).",
             'if [ "$status" -eq 138 ] || [ "$status" -eq 143 ]; then',
             '    scontrol requeue "$SLURM_JOB_ID"',
             "fi",
             'exit "$status"', ""]
    return "\n".join(lines)
