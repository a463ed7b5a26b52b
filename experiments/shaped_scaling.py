"""Weak scaling across hosts on shaped links, beside `largebatch plan`'s prediction.

Hosts are network namespaces on one machine (largebatch.cluster, root), one process per
host, each link shaped with tc's token bucket to 10 or 1 Gbit/s in both directions or
left unshaped (veth, about 8-14 Gbit/s). For each process count and link, the real
training step is timed (`largebatch bench`'s worker on synthetic data) and the all-reduce
microbenchmark fits alpha and beta on the same links.

The hosts share this machine's cores: with more processes than cores each process
computes more slowly than alone, whatever the network. So each shaped run is compared
with the *unshaped run of the same layout*, and the prediction takes its compute times
from that run and its network from the shaped all-reduce fit: what is compared is what
the link costs, with CPU sharing cancelled out.

    sudo python experiments/shaped_scaling.py [--model resnet18] [--procs 2 4] [--rates 1gbit] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, hardware

from largebatch import plan
from largebatch.bench import launch
from largebatch.cluster import Cluster, available

RATES = ("unshaped", "10gbit", "1gbit")


COMPRESSION = {"none": {}, "bf16": {"allreduce_bf16": True}, "powersgd": {"powersgd_rank": 4}}


def spec_for(a, compression: str = "none") -> dict:
    return {"model": a.model, "batch": a.batch, "steps": a.steps, "warmup": 2, "repeats": a.repeats,
            "dtype": "bf16", "threads": 1, "image_size": a.image_size, "classes": 1000, "channels": 3,
            "channels_last": True, "allreduce": True, **COMPRESSION[compression]}


def predicted(unshaped: dict, shaped: dict, procs: int) -> dict:
    """plan's step for `procs` hosts of one process: compute from the unshaped run of the
    same layout, the all-reduce from the shaped links' fit (ring between hosts)."""
    parts, b = unshaped["breakdown"], unshaped["global_batch"] // procs
    compute = plan.Compute(parts["forward"] / b, (parts["backward"]) / b, parts["optimizer"] + parts["data"])
    ar = shaped["allreduce"]
    net = plan.Network(ar["alpha"], ar["beta"], ar["alpha"], ar["beta"])
    row = plan.predict(compute, net, shaped["gradient_bytes"], procs, 1, shaped["global_batch"], 1, 1,
                       algorithm="ring")
    return {"images_per_sec": row.images_per_sec, "exposed_comm_seconds": row.exposed_comm_seconds,
            "comm_seconds": row.comm_seconds, "step_seconds": row.step_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compressed-at", default="1gbit",
                   help="also run the bf16 all-reduce and PowerSGD (rank 4) on this link")
    p.add_argument("--rates", nargs="+", default=list(RATES), choices=RATES,
                   help="links to measure (unshaped is always run: the predictions take compute from it)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/bench/shaped_scaling.json")
    a = p.parse_args()
    if reason := available():
        raise SystemExit(f"shaped_scaling: {reason}")
    runs = []
    one = launch(spec_for(a), 1)
    runs.append({"procs": 1, "link": "none", **one})
    print(f"1 process: {one['images_per_sec']:.2f} images/s", flush=True)
    for procs in a.procs:
        by_rate = {}
        for rate in [r for r in RATES if r == "unshaped" or r in a.rates]:
            variants = ["none"] + (["bf16", "powersgd"] if rate == a.compressed_at else [])
            for comp in variants:
                t0 = time.time()
                with Cluster(procs, rate=None if rate == "unshaped" else rate) as c:
                    r = launch(spec_for(a, comp), procs, cluster=c)
                row = {"procs": procs, "link": rate, "compression": comp, "allreduce_bf16": comp == "bf16", **r}
                if comp == "none":
                    by_rate[rate] = r
                if rate != "unshaped" and comp == "none":
                    row["predicted"] = predicted(by_rate["unshaped"], r, procs)
                    row["vs_unshaped"] = r["images_per_sec"] / by_rate["unshaped"]["images_per_sec"]
                runs.append(row)
                ar = r.get("allreduce", {})
                pred = row.get("predicted", {}).get("images_per_sec")
                print(f"{procs} hosts, {rate}{'' if comp == 'none' else ' ' + comp}: {r['images_per_sec']:.2f} images/s, "
                      f"exposed comm {r['breakdown']['comm_exposed']:.3f} s/step, all-reduce {1 / ar.get('beta', float('inf')) / 1e9 * 8:.2f} Gbit/s"
                      + (f", plan {pred:.2f}" if pred else "") + f" ({time.time() - t0:.0f} s)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "args": vars(a) | {"out": str(a.out)},
                                 "runs": runs}, indent=1, default=str) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
