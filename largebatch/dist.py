"""Distributed state in one place: who am I, how many are we, how the global batch is
cut among us (the Layout), and the few collective operations the rest of the code uses. Valid with one process (every collective is then
a no-op), so no other module branches on 'distributed or not'.

Rank and world size come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or, when started
directly by a cluster launcher, from SLURM (SLURM_PROCID ...) or MPI (Open MPI's
OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as td

from . import netif
from .config import ConfigError, TrainConfig
from .errors import UserError

_LAUNCHERS = (  # (rank, world size, local rank, local world size)
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env, name: str, default: int) -> int:
    digits = env.get(name, "").split("(")[0]  # SLURM_NTASKS_PER_NODE may read "2(x4)"
    return int(digits) if digits.strip().isdigit() else default


def from_env(env=None) -> DistInfo:
    env = os.environ if env is None else env
    for rank_key, size_key, local_key, local_size_key in _LAUNCHERS:
        if rank_key in env and size_key in env:
            world = _int_env(env, size_key, 1)
            return DistInfo(rank=_int_env(env, rank_key, 0), world_size=world,
                            local_rank=_int_env(env, local_key, 0),
                            local_world_size=_int_env(env, local_size_key, world),
                            launcher=rank_key)
    return DistInfo()


@dataclass(frozen=True, slots=True)
class Layout:
    world_size: int
    rank: int
    accum_steps: int
    micro_batch: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.accum_steps * self.micro_batch


def resolve_layout(train: TrainConfig, world_size: int, rank: int, bn_group_size: int = 0) -> Layout:
    b = train.global_batch
    if train.micro_batch is None and b % world_size != 0:
        raise ConfigError(f"train.global_batch ({b}) must be a multiple of the number of processes "
                          f"({world_size}): each process takes an equal share")
    m = train.micro_batch if train.micro_batch is not None else b // world_size
    if m <= 0 or b % (world_size * m) != 0:
        fits = fitting_micro_batch(b, world_size, m, bn_group_size)
        raise ConfigError(f"train.global_batch ({b}) must be divisible by processes ({world_size}) "
                          f"x train.micro_batch ({train.micro_batch if train.micro_batch else m})"
                          + (f"; train.micro_batch={fits} fits this layout" if fits else ""))
    # BatchNorm groups are cut within micro-batches: the one model setting a layout must respect
    if bn_group_size and m % bn_group_size != 0:
        raise ConfigError(f"model.bn_group_size ({bn_group_size}) must divide train.micro_batch ({m}); "
                          f"set model.bn_group_size=0 to normalise over whole micro-batches")
    return Layout(world_size=world_size, rank=rank, accum_steps=b // (world_size * m), micro_batch=m)


def fitting_micro_batch(global_batch: int, world_size: int, micro_batch: int, bn_group_size: int = 0) -> int | None:
    """The largest micro-batch up to `micro_batch` that divides each process's share of
    the global batch (and that BN groups divide): what to suggest when a recipe written
    for one layout is run on another."""
    if global_batch % world_size:
        return None
    share = global_batch // world_size
    return next((m for m in range(min(micro_batch, share), 0, -1)
                 if share % m == 0 and (not bn_group_size or m % bn_group_size == 0)), None)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as a launcher binds it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-010,020],cpu1' -> 'gpu003'."""
    head = nodelist.strip()
    depth, cut = 0, len(head)
    for i, ch in enumerate(head):  # the first comma outside brackets ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            cut = i
            break
    head = head[:cut]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


_NETWORK: dict = {}
# How long a collective (or a rank waiting in the store) may wait for slow peers.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def network() -> dict:
    """The interface the collectives use and why (run.json); empty with one process."""
    return dict(_NETWORK)


def init(device: torch.device, info: DistInfo | None = None, interface: str = "auto",
         connect_timeout_s: float = 120.0) -> DistInfo:
    """Join the process group (when > 1 process) as `info` says (default: the launcher's
    environment, read once here or by the caller that chose the device with it).
    `interface`: the network interface for the collectives, "auto" = the one that
    reaches the rendezvous host (netif.py)."""
    global _INFO, _NETWORK
    _INFO = info or from_env()
    if _INFO.world_size > 1 and not td.is_initialized():
        # torchrun sets these. Under srun the first node of the allocation hosts the
        # rendezvous; under mpirun, export MASTER_ADDR (docs/launching.md).
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        os.environ.setdefault("MASTER_ADDR", first_host(nodelist) if nodelist else "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if _INFO.world_size > _INFO.local_world_size and netif.is_loopback(addr):
            # torchrun's c10d rendezvous hands out the rank-0 host's name; where that name
            # resolves to 127.0.0.1 the other hosts would dial themselves and wait.
            raise UserError(f"MASTER_ADDR is {addr}, a loopback address the other hosts cannot reach, in a "
                            f"run of {_INFO.world_size} processes over several hosts: with torchrun pass "
                            f"--local-addr <this host's address> on every host (or make the host name resolve "
                            f"to a reachable address); with other launchers export MASTER_ADDR")
        _NETWORK = netif.choose(addr, port, interface)
        netif.apply(_NETWORK)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Under torchrun the agent hosts the store and keeps it across restarts; keys
        # of a killed attempt would be read by the next one (gloo then dials a dead
        # peer), so every attempt gets its own key prefix.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        try:
            # A short timeout to reach the store, so an unreachable host is an error in
            # minutes; the long one afterwards, for ranks that wait on slow peers.
            store = td.TCPStore(addr, port, _INFO.world_size, is_master=_INFO.rank == 0 and not agent_store,
                                timeout=datetime.timedelta(seconds=connect_timeout_s))
        except (RuntimeError, OSError) as e:
            raise UserError(f"cannot reach the rendezvous host {addr}:{port} within {connect_timeout_s:g} s "
                            f"({str(e).splitlines()[0][:160]}); check that rank 0 is running and that "
                            f"MASTER_ADDR/MASTER_PORT name it") from None
        store.set_timeout(COLLECTIVE_TIMEOUT)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        td.init_process_group(backend, store=td.PrefixStore(f"largebatch/attempt_{attempt}", store),
                              rank=_INFO.rank, world_size=_INFO.world_size, timeout=COLLECTIVE_TIMEOUT)
    return _INFO


def shutdown(together: bool = False) -> None:
    """Leave the process group. `together` (after a command that ended normally on every
    process): wait for every process first, so that none closes its connections while a
    peer is still in a collective. Not after an error, where the others may never arrive."""
    if td.is_initialized():
        if together:
            barrier()
        td.destroy_process_group()


def exit_after_group() -> None:
    """A process of a multi-process run ends here once its command has finished and
    written everything: C++ teardown at interpreter exit can still find a thread of the
    collectives' libraries running and abort the process ("terminate called without an
    active exception", one two-process run in about ten on 2 busy cores), which would
    fail a finished run. Leaving without that teardown ends it as it finished."""
    if _INFO.world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def active() -> bool:
    """Several processes in a joined group (the world size is _INFO's, the one source)."""
    return _INFO.world_size > 1 and td.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if active():
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return t


def gather_union(items: set) -> list:
    """The sorted union of every process's set (small sets: names of skipped files)."""
    if not active():
        return sorted(items)
    gathered = [None] * _INFO.world_size
    td.all_gather_object(gathered, sorted(items))
    return sorted(set().union(*gathered))


def on_main(fn):
    """Run fn on the main process only; its result, or the UserError it raised, reaches
    every process, so an error on the main process never leaves the others waiting."""
    result = error = None
    if _INFO.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    if active():
        box = [(result, error)]
        td.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if active():
        td.barrier()
