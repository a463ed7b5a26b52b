"""Distributed state in one place: who am I, how many are we, and the few collective
operations the rest of the code uses. Valid with one process (every collective is then
a no-op), so no other module branches on 'distributed or not'.

Rank and world size come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or, when started
directly by a cluster launcher, from SLURM (SLURM_PROCID ...) or MPI (Open MPI's
OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

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


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


def init(device: torch.device) -> DistInfo:
    """Read the launcher's environment and join the process group (when > 1 process)."""
    global _INFO
    _INFO = from_env()
    if _INFO.world_size > 1 and not td.is_initialized():
        # torchrun sets these; srun/mpirun users export MASTER_ADDR/MASTER_PORT (docs).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, rank=_INFO.rank, world_size=_INFO.world_size,
                              timeout=datetime.timedelta(minutes=30))
    return _INFO


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def active() -> bool:
    return td.is_initialized() and td.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        td.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when there are several processes. BatchNorm buffers are
    kept in step by group_bn.commit_running_stats, so DDP must not broadcast them."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 renamed the switch; older releases know only broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=ids, forward_sync_buffers=False)
    return ddp(model, device_ids=ids, broadcast_buffers=False)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
