"""`largebatch bench`: images/s and a per-step time breakdown of the real training step
(train.train_step) on synthetic data, for 1, 2, ... processes on this machine, plus an
all-reduce microbenchmark giving latency and bandwidth (alpha, beta) for `plan`.

Each process count runs in fresh worker processes (`python -m largebatch.bench`, ranks
from the environment as under torchrun); rank 0 reports.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import dist
from .autotune import synchronize
from .errors import UserError

PARTS = ("data", "forward", "backward", "optimizer")


ERROR = "largebatch: error: "  # how a worker says what the user must change


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, procs: int, timeout: float = 3600, cluster=None) -> dict:
    """Run one measurement in `procs` fresh processes; returns rank 0's result. With a
    `cluster` (largebatch.cluster.Cluster), process r runs on host r mod hosts, and the
    rendezvous is on host 0's address."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        port = str(free_port())
        threads = spec["threads"]
        hosts = len(cluster.hosts) if cluster else 1
        master = cluster.hosts[0].address if cluster else "127.0.0.1"
        workers = []
        for rank in range(procs):
            host, per_host = rank % hosts, len(range(rank % hosts, procs, hosts))
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(rank // hosts),
                   "LOCAL_WORLD_SIZE": str(per_host), "MASTER_ADDR": master, "MASTER_PORT": port,
                   "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "largebatch.bench", json.dumps(spec), str(out)]
            workers.append(subprocess.Popen(cluster.command(host, cmd) if cluster else cmd, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
        failed = [rank for rank, w in enumerate(workers) if w.returncode]
        said = [line.removeprefix(ERROR) for r in failed for line in logs[r].splitlines() if line.startswith(ERROR)]
        if said:  # a worker's one-line error (a bad setting, more processes than GPUs) is the user's to fix
            raise UserError(f"bench: {said[0]}")
        if failed:
            raise RuntimeError(f"bench: worker rank(s) {failed} of {procs} failed:\n" +
                               "\n".join(f"--- rank {r}:\n{logs[r][-3000:]}" for r in failed))
        return json.loads(out.read_text())


def bench_config(spec: dict, procs: int):
    from .config import build_config
    b = spec["batch"]
    group = spec.get("bn_group_size")
    if group is None:
        group = 32 if b % 32 == 0 else 0  # the training default where it divides the batch
    return build_config({
        "model": {"name": spec["model"], "bn_group_size": group},
        "data": {"name": "synthetic", "synthetic_size": spec["image_size"], "synthetic_classes": spec["classes"],
                 "synthetic_channels": spec["channels"], "synthetic_samples": b * procs * 8, "workers": 0},
        "train": {"global_batch": b * procs, "micro_batch": b, "bf16": spec["dtype"] == "bf16",
                  "channels_last": spec["channels_last"], "threads": spec["threads"],
                  "compile": spec.get("compile", False), "keep_freed_memory": spec.get("keep_freed_memory", True),
                  "deterministic": spec.get("deterministic", True),
                  # + the step whose operations are counted, + the GPU's extra repeat for the parts
                  "steps": spec["warmup"] + 1 + spec["steps"] * (spec["repeats"] + 1)},
        # PowerSGD compresses from the 3rd step: the warm-up steps also warm its factors
        "optim": {"name": "sgd"}, "dist": {"allreduce_bf16": spec.get("allreduce_bf16", False),
                                           "powersgd_rank": spec.get("powersgd_rank", 0), "powersgd_start_steps": 2}})


def allreduce_sweep(sizes: list[int], iters: int = 10) -> dict:
    """Median time of an fp32 all-reduce per size, and the least-squares fit t = a + b * bytes."""
    points = []
    for n in sizes:
        t = torch.zeros(max(n // 4, 1))
        for _ in range(3):
            dist.all_reduce_sum(t)
        times = []
        for _ in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce_sum(t)
            times.append(time.perf_counter() - t0)
        points.append({"bytes": t.numel() * 4, "seconds": statistics.median(times)})
    xs, ys = [p["bytes"] for p in points], [p["seconds"] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    w = dist.info().world_size
    fit_a, fit_b = max(my - slope * mx, 0.0), max(slope, 0.0)
    # a ring all-reduce costs 2(W-1) alpha + 2(W-1)/W bytes beta
    return {"points": points, "fit_seconds": fit_a, "fit_seconds_per_byte": fit_b,
            "alpha": fit_a / (2 * (w - 1)), "beta": fit_b / (2 * (w - 1) / w), "procs": w}


def matmul_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), seconds: float = 1.0) -> float:
    """This process's rate of n x n matrix products in `dtype` on `device` (GFLOP/s,
    2 n^3 per product): the ceiling a training step is measured against. n is 2,048 on
    a CPU and 8,192 on a GPU, which a smaller product leaves partly idle. On a CPU a
    product of the same size is also timed as a 1 x 1 convolution, and the faster counts:
    torch.mm and the convolutions may go to different libraries, and where the
    convolutions' is the faster (fp32 on a Zen 5, docs/BENCHMARKS.md) the matrix product
    alone would put a ResNet's own rate above its ceiling."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    products = [lambda: torch.mm(a, b)]
    if device.type == "cpu":
        x = a.reshape(1, n, n, 1).contiguous(memory_format=torch.channels_last)
        w = b.reshape(n, n, 1, 1)
        products.append(lambda: torch.nn.functional.conv2d(x, w))
    return max(_rate(product, 2 * n ** 3, device, seconds) for product in products)


def _rate(product, flops: int, device: torch.device, seconds: float) -> float:
    for _ in range(2):
        product()
    count = 0
    synchronize(device)
    t0 = time.perf_counter()
    while count < 3 or time.perf_counter() - t0 < seconds:
        for _ in range(10 if device.type == "cuda" else 1):  # queue enough work between clock reads
            product()
            count += 1
        synchronize(device)
    return flops * count / (time.perf_counter() - t0) / 1e9


def step_flops(run, batches, loss_fn) -> float:
    """Floating-point operations of one training step of this process (convolutions and
    matrix products, forward and backward, as torch's FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .train import train_step
    with FlopCounterMode(display=False) as counter:
        train_step(run, batches, loss_fn)
    return float(counter.get_total_flops())


def worker(spec: dict, out: Path) -> None:
    from .train import NO_TIMER, StepPartTimer, setup, train_step

    procs = int(os.environ["WORLD_SIZE"])
    run = setup(bench_config(spec, procs), out.parent / "run")  # a scratch run directory beside the result
    batches, loss_fn = run.batches, run.loss_fn
    for group in run.optimizer.param_groups:
        group["lr"] = 1e-3
    for _ in range(spec["warmup"]):
        train_step(run, batches, loss_fn)
    images_per_proc = run.layout.global_batch // procs
    flops_per_image = step_flops(run, batches, loss_fn) / images_per_proc
    run.sync.take_seconds()
    rates, parts = [], []
    # On a GPU the part timer's synchronisations would keep the host from running ahead of
    # the device: the rates come from untimed repeats, the parts from one more.
    on_gpu = run.device.type == "cuda"
    for repeat in range(spec["repeats"] + on_gpu):
        parts_pass = not on_gpu or repeat == spec["repeats"]
        timer = StepPartTimer(run.device) if parts_pass else NO_TIMER
        exposed = 0.0
        dist.barrier()
        synchronize(run.device)
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            train_step(run, batches, loss_fn, timer)
            exposed += run.sync.take_seconds()[1]
        synchronize(run.device)
        elapsed = time.perf_counter() - t0
        if repeat < spec["repeats"]:
            rates.append(spec["steps"] * run.layout.global_batch / elapsed)
        if parts_pass:
            per_step = {k: timer.seconds.get(k, 0.0) / spec["steps"] for k in PARTS}
            per_step["comm_exposed"] = exposed / spec["steps"]
            per_step["backward"] -= per_step["comm_exposed"]
            per_step["step"] = elapsed / spec["steps"]
            parts.append(per_step)
    grad_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    result = {"procs": procs, "threads_per_proc": torch.get_num_threads(), "global_batch": run.layout.global_batch,
              "images_per_sec": statistics.fmean(rates), "images_per_sec_runs": rates,
              "images_per_sec_spread": statistics.stdev(rates) if len(rates) > 1 else 0.0,
              "breakdown": {k: statistics.fmean(p[k] for p in parts) for k in parts[0]},
              "gradient_bytes": grad_bytes, "bn_group_size": run.cfg.model.bn_group_size,
              "parameters": sum(p.numel() for p in run.model.parameters()),
              "flops_per_image": flops_per_image,
              "achieved_gflops": statistics.fmean(rates) * flops_per_image / 1e9}
    if procs == 1:  # the matrix units' ceiling, with this process's threads
        result["matmul_gflops"] = {"bf16": matmul_gflops(torch.bfloat16, run.device),
                                   "fp32": matmul_gflops(torch.float32, run.device)}
        result["share_of_matmul"] = result["achieved_gflops"] / result["matmul_gflops"][spec["dtype"]]
    if procs > 1 and spec["allreduce"]:
        bucket = int(run.cfg.dist.bucket_mb * 2**20)
        sizes = sorted({4 ** k for k in range(6, 13)} | {bucket, grad_bytes})  # 4 KB .. 16 MB, bucket, all
        # up to the bucket size at least: a small model's few hundred KB of gradients are
        # all latency, and a fit over them alone cannot see the bandwidth
        result["allreduce"] = allreduce_sweep([s for s in sizes if s <= max(grad_bytes, bucket)])
    if dist.info().is_main:
        Path(out).write_text(json.dumps(result))
    dist.shutdown(together=True)  # nobody closes its connections while another process is still reducing


def bench(model: str = "resnet50", batch: int = 16, steps: int = 5, warmup: int = 2, repeats: int = 3,
          dtype: str = "fp32", threads: int = 0, procs: list[int] = (1,), image_size: int = 224,
          channels_last: bool = False, mode: str = "weak", allreduce: bool = True, compile: bool = False,
          keep_freed_memory: bool = True, bn_group_size: int | None = None, deterministic: bool = True) -> dict:
    """Measure each process count; weak scaling keeps `batch` per process, strong scaling
    keeps the global batch batch * max(procs). bn_group_size: None = 32 where it divides
    the batch (the training default), 0 = BN over each process's whole batch."""
    from .models import CIFAR
    cifar = model in CIFAR
    runs = []
    for p in procs:
        per_proc = batch if mode == "weak" else batch * max(procs) // p
        spec = {"model": model, "batch": per_proc, "steps": steps, "warmup": warmup, "repeats": repeats,
                "dtype": dtype, "threads": threads or max(1, dist.usable_cores() // p), "image_size": 32 if cifar else image_size,
                "classes": 10 if cifar else 1000, "channels": 3, "channels_last": channels_last,
                "allreduce": allreduce, "compile": compile, "keep_freed_memory": keep_freed_memory,
                "bn_group_size": bn_group_size, "deterministic": deterministic}
        runs.append(launch(spec, p))
    base = runs[0]["images_per_sec"] / runs[0]["procs"]
    result = {"model": model, "batch_per_process": batch, "dtype": dtype, "image_size": image_size,
              "channels_last": channels_last, "compile": compile, "keep_freed_memory": keep_freed_memory,
              "bn_group_size": runs[0]["bn_group_size"], "deterministic": deterministic, "mode": mode,
              "cores": dist.usable_cores(),
              "images_per_sec": runs[0]["images_per_sec"], "images_per_sec_spread": runs[0]["images_per_sec_spread"],
              "breakdown": runs[0]["breakdown"], "runs": runs,
              "flops_per_image": runs[0]["flops_per_image"], "matmul_gflops": runs[0].get("matmul_gflops"),
              "share_of_matmul": runs[0].get("share_of_matmul"),
              "scaling": [{"procs": r["procs"], "images_per_sec": r["images_per_sec"],
                           "efficiency": r["images_per_sec"] / (r["procs"] * base)} for r in runs]}
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['procs']} x {r['threads_per_proc']} thr" for r in runs]
    a1.bar(labels, [r["images_per_sec"] for r in runs], yerr=[r["images_per_sec_spread"] for r in runs])
    for i, s in enumerate(result["scaling"]):
        a1.text(i, runs[i]["images_per_sec"], f"eff {s['efficiency']:.2f}", ha="center", va="bottom")
    a1.set_ylabel("images/s")
    a1.set_title(f"{result['model']}, {result['dtype']}, batch {result['batch_per_process']}/process ({result['mode']})")
    bottom = [0.0] * len(runs)
    for part in ("data", "forward", "backward", "comm_exposed", "optimizer"):
        vals = [r["breakdown"][part] for r in runs]
        a2.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a2.set_ylabel("seconds per step")
    a2.set_title("step breakdown")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        worker(json.loads(sys.argv[1]), Path(sys.argv[2]))
    except UserError as e:
        print(f"{ERROR}{e}", flush=True)
        sys.exit(2)
    dist.exit_after_group()
