"""CPU settings for ResNet-50 training on this machine, measured with `largebatch bench`
(the real training step, synthetic 224 px data): dtype, channels_last, threads per
process, one vs two processes, and torch.compile (in a bare loop: eager vs compiled, in
one process). Then checks `largebatch plan` against the 1- and 2-process measurements.

    python experiments/cpu_tuning.py [--out docs/bench/cpu_tuning.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from largebatch import plan
from largebatch.bench import bench
from largebatch.dist import usable_cores


def compile_vs_eager(model_name: str, batch: int, steps: int, threads: int) -> dict:
    import torchvision
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(1000, (batch,))
    out = {}
    for mode in ("eager", "compiled"):
        model = getattr(torchvision.models, model_name)(num_classes=1000)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        fwd = torch.compile(model) if mode == "compiled" else model

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fwd(x).float(), y)
            loss.backward()
            opt.step()
        t0 = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001 - report whatever the compiler raised
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        first = time.perf_counter() - t0
        step()
        rates = []
        for _ in range(2):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            rates.append(steps * batch / (time.perf_counter() - t0))
        out[mode] = {"first_step_seconds": first, "images_per_sec": statistics.fmean(rates), "runs": rates}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/bench/cpu_tuning.json"))
    a = p.parse_args()
    cores = usable_cores()
    common = dict(model=a.model, batch=a.batch, steps=a.steps, warmup=1, repeats=a.repeats)
    configs = {
        f"fp32, 1 x {cores} threads": dict(dtype="fp32"),
        f"bf16, 1 x {cores} threads": dict(dtype="bf16"),
        f"bf16 + channels_last, 1 x {cores} threads": dict(dtype="bf16", channels_last=True),
        "bf16, 1 x 1 thread": dict(dtype="bf16", threads=1),
        f"bf16, 1 vs 2 processes x {cores // 2} threads": dict(dtype="bf16", procs=[1, 2]),
    }
    results = {}
    for name, kw in configs.items():
        print(f"bench: {name}", flush=True)
        results[name] = bench(**common, **kw)
        for s in results[name]["scaling"]:
            print(f"  {s['procs']} procs: {s['images_per_sec']:.2f} images/s (efficiency {s['efficiency']:.3f})",
                  flush=True)
    if not a.skip_compile:
        print("torch.compile vs eager (bare loop, bf16)", flush=True)
        results["torch.compile (bare loop, bf16)"] = compile_vs_eager(a.model, a.batch, a.steps, cores)
        print(json.dumps(results["torch.compile (bare loop, bf16)"]), flush=True)

    # plan against the measurements: 1 and 2 processes on this one node
    sweep = results[f"bf16, 1 vs 2 processes x {cores // 2} threads"]
    validation = []
    for run in sweep["runs"]:
        ppn = run["procs"]
        compute = plan.Compute.from_bench(sweep, ppn)
        a_r = next((r["allreduce"] for r in sweep["runs"] if "allreduce" in r), None)
        net = plan.Network(a_r["alpha"], a_r["beta"], a_r["alpha"], a_r["beta"]) if a_r else plan.Network.named("ethernet-10")
        row = plan.predict(compute, net, run["gradient_bytes"], 1, ppn, run["global_batch"], 1, 1)
        validation.append({"procs": ppn, "predicted_images_per_sec": row.images_per_sec,
                           "measured_images_per_sec": run["images_per_sec"],
                           "error": row.images_per_sec / run["images_per_sec"] - 1,
                           "predicted_step_seconds": row.step_seconds,
                           "measured_step_seconds": run["breakdown"]["step"]})
        print(f"plan vs bench, {ppn} procs: predicted {row.images_per_sec:.2f}, measured "
              f"{run['images_per_sec']:.2f} images/s ({validation[-1]['error']:+.1%})", flush=True)
    results["plan_validation"] = validation
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
