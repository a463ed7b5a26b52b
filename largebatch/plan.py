"""`largebatch plan`: an analytical model of synchronous data-parallel SGD, to answer
"how many nodes and what batch for my deadline?" before booking a machine.

Assumptions, all of them:
- Compute: each process takes t_fwd + t_bwd seconds per image and t_opt per step. From
  `largebatch bench` (1 process using the whole node: a process with 1/P of the node's
  cores is taken to be P times slower per image, i.e. perfect thread scaling) or from a
  node's images/s (backward = 2/3 of the compute, optimizer time ignored).
- Gradients: `bytes_per_param` per parameter (4 = fp32 all-reduce, 2 = bf16), in
  buckets of `bucket_mb`; a bucket is ready when backward has produced its share of the
  bytes (gradient bytes spread evenly over backward time), and buckets are reduced one
  after the other while backward goes on. What is left after backward is exposed.
- All-reduce of n bytes over W = N x P processes (alpha: latency per message, beta:
  seconds per byte; intra-node values for processes on one node):
    ring          2 (W-1) alpha + 2 (W-1)/W n beta
    tree          2 ceil(log2 W) alpha + 2 (W-1)/W n beta   (recursive halving/doubling)
    hierarchical  intra-node 2 (P-1) alpha_i + 2 (P-1)/P n beta_i, then between nodes
                  2 (N-1) alpha + 2 (N-1)/N n beta (the node's NIC carries its traffic)
  With one node, ring and tree use the intra-node alpha_i, beta_i.
- No stragglers, no data-loading stalls, no contention from other jobs.
- Epochs: the same at every batch, unless a gradient noise scale is given; then the
  epochs to the same target follow E(B) = E_min (1 + B / B_noise) (McCandlish et al.
  2018, "An Empirical Model of Large-Batch Training"), from `epochs` at a reference
  batch: up to about B_noise a larger batch costs few extra epochs, far above it the
  epochs grow with the batch and more nodes stop shortening the run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# name: (alpha seconds, bytes/s achieved), for MPI-style all-reduce between nodes
INTERCONNECTS = {
    "omnipath-100": (2e-6, 11e9),    # Intel Omni-Path 100 Gb/s (the SC18 authors' Skylake cluster)
    "infiniband-edr": (1.5e-6, 11e9),   # 100 Gb/s
    "infiniband-hdr": (1.5e-6, 22e9),   # 200 Gb/s
    "infiniband-ndr": (1.5e-6, 45e9),   # 400 Gb/s
    "ethernet-10": (30e-6, 1.1e9),
    "ethernet-100": (10e-6, 10e9),
}
INTRA_NODE = (1e-6, 20e9)  # shared memory between the processes of one node


@dataclass
class Compute:
    fwd_per_image: float
    bwd_per_image: float
    opt_per_step: float = 0.0

    @classmethod
    def from_node_throughput(cls, images_per_sec: float, procs_per_node: int) -> "Compute":
        per_image = procs_per_node / images_per_sec  # one process's share of the node
        return cls(per_image / 3, 2 * per_image / 3)

    @classmethod
    def from_bench(cls, result: dict, procs_per_node: int) -> "Compute":
        """From a 1-process `largebatch bench` run, scaled to a process with 1/P of the cores."""
        run = next(r for r in result["runs"] if r["procs"] == 1)
        b, parts = run["global_batch"], run["breakdown"]
        scale = procs_per_node
        return cls(scale * parts["forward"] / b, scale * parts["backward"] / b,
                   scale * (parts["optimizer"] + parts["data"]))


@dataclass
class Network:
    alpha: float
    beta: float              # seconds per byte
    alpha_intra: float = INTRA_NODE[0]
    beta_intra: float = 1 / INTRA_NODE[1]

    @classmethod
    def named(cls, name: str) -> "Network":
        if name not in INTERCONNECTS:
            raise ValueError(f"unknown interconnect {name!r} (known: {', '.join(INTERCONNECTS)})")
        alpha, bw = INTERCONNECTS[name]
        return cls(alpha, 1 / bw)


def allreduce_seconds(n: float, nodes: int, ppn: int, net: Network, algorithm: str) -> float:
    w = nodes * ppn
    if w == 1:
        return 0.0
    alpha, beta = (net.alpha, net.beta) if nodes > 1 else (net.alpha_intra, net.beta_intra)
    if algorithm == "ring":
        return 2 * (w - 1) * alpha + 2 * (w - 1) / w * n * beta
    if algorithm == "tree":
        return 2 * math.ceil(math.log2(w)) * alpha + 2 * (w - 1) / w * n * beta
    if algorithm == "hierarchical":
        intra = 2 * (ppn - 1) * net.alpha_intra + 2 * (ppn - 1) / ppn * n * net.beta_intra if ppn > 1 else 0.0
        inter = 2 * (nodes - 1) * net.alpha + 2 * (nodes - 1) / nodes * n * net.beta if nodes > 1 else 0.0
        return intra + inter
    raise ValueError(f"unknown algorithm {algorithm!r} (ring, tree, hierarchical)")


def exposed_comm(backward: float, grad_bytes: float, bucket_bytes: float, cost) -> tuple[float, float]:
    """(total all-reduce seconds, seconds left after backward), buckets reduced in order."""
    k = max(1, math.ceil(grad_bytes / bucket_bytes))
    sizes = [bucket_bytes] * (k - 1) + [grad_bytes - bucket_bytes * (k - 1)]
    done, total, produced = 0.0, 0.0, 0.0
    for size in sizes:
        produced += size
        ready = backward * produced / grad_bytes
        t = cost(size)
        done = max(done, ready) + t
        total += t
    return total, max(0.0, done - backward)


@dataclass(frozen=True)
class Statistics:
    """`epochs` reach the target at `reference_batch`; `noise_scale` is B_noise."""
    noise_scale: float
    reference_batch: int

    def epochs(self, batch: int, epochs: float) -> float:
        return epochs * (1 + batch / self.noise_scale) / (1 + self.reference_batch / self.noise_scale)


@dataclass
class Row:
    nodes: int
    procs_per_node: int
    procs: int
    global_batch: int
    batch_per_proc: float
    compute_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float
    step_seconds: float
    images_per_sec: float
    efficiency: float
    time_to_train_seconds: float
    epochs_to_target: float | None = None       # with a noise scale (Statistics)
    time_to_target_seconds: float | None = None


def predict(compute: Compute, net: Network, grad_bytes: float, nodes: int, ppn: int, global_batch: int,
            epochs: float, dataset: int, algorithm: str = "hierarchical", bucket_mb: float = 25.0,
            stats: Statistics | None = None) -> Row:
    w = nodes * ppn
    b = global_batch / w
    fwd, bwd = b * compute.fwd_per_image, b * compute.bwd_per_image
    comp = fwd + bwd + compute.opt_per_step
    total, exposed = exposed_comm(bwd, grad_bytes, bucket_mb * 2**20,
                                  lambda n: allreduce_seconds(n, nodes, ppn, net, algorithm))
    step = comp + exposed
    ips = global_batch / step
    row = Row(nodes, ppn, w, global_batch, b, comp, total, exposed, step, ips, comp / step, epochs * dataset / ips)
    if stats:
        row.epochs_to_target = stats.epochs(global_batch, epochs)
        row.time_to_target_seconds = row.epochs_to_target * dataset / ips
    return row


def rows_for(compute: Compute, net: Network, grad_bytes: float, nodes: list[int], ppn: int,
             batch_per_proc: float | None, global_batch: int | None, epochs: float, dataset: int,
             algorithm: str, bucket_mb: float, stats: Statistics | None = None) -> list[dict]:
    out = []
    for n in nodes:
        gb = global_batch if global_batch else int(round(batch_per_proc * n * ppn))
        out.append(asdict(predict(compute, net, grad_bytes, n, ppn, gb, epochs, dataset, algorithm, bucket_mb,
                                  stats)))
    return out


def fastest_to_target(rows: list[dict]) -> dict:
    """The row that reaches the target soonest (rows predicted with a noise scale)."""
    return min(rows, key=lambda r: r["time_to_target_seconds"])


def worth_its_nodes(rows: list[dict], epochs: float) -> dict | None:
    """The last row whose scaling efficiency times epochs efficiency (the reference
    batch's epochs over this batch's) stays at or above 0.5: past B_noise the epochs
    double, McCandlish's point of diminishing returns."""
    worth = [r for r in rows if r["efficiency"] * epochs / r["epochs_to_target"] >= 0.5]
    return worth[-1] if worth else None


def nodes_for_deadline(compute: Compute, net: Network, grad_bytes: float, ppn: int, batch_per_proc: float,
                       epochs: float, dataset: int, seconds: float, algorithm: str, bucket_mb: float,
                       max_nodes: int = 100_000, stats: Statistics | None = None) -> dict | None:
    """The fewest nodes (weak scaling at batch_per_proc) that train within `seconds`; with
    a noise scale, that reach the target within `seconds` (the epochs grow with the batch)."""
    lo, hi = 1, max_nodes
    row = lambda n: predict(compute, net, grad_bytes, n, ppn, int(round(batch_per_proc * n * ppn)), epochs,
                            dataset, algorithm, bucket_mb, stats)
    if stats:
        # Time to target falls, then rises once the batch passes the noise scale: not
        # monotone in the node count, so every count is tried (each prediction is cheap).
        return next((asdict(r) for n in range(1, max_nodes + 1)
                     if (r := row(n)).time_to_target_seconds <= seconds), None)
    if row(hi).time_to_train_seconds > seconds:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if row(mid).time_to_train_seconds <= seconds:
            hi = mid
        else:
            lo = mid + 1
    return asdict(row(lo))


def plot(rows_by_algorithm: dict[str, list[dict]], path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in rows_by_algorithm.items():
        xs = [r["nodes"] for r in rows]
        a1.plot(xs, [r["efficiency"] for r in rows], marker="o", label=name)
        a2.plot(xs, [r["time_to_train_seconds"] / 60 for r in rows], marker="o", label=name)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("nodes")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("scaling efficiency")
    a2.set_ylabel("time to train (min)")
    a2.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
