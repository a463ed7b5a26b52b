"""How gradients become the global-batch mean: one interface, two strategies.

`Bucketed` (the default) lets DDP all-reduce buckets of gradients while backward is
still running, accumulating micro-batches in fp32 (optionally sent in bf16, or
compressed by PowerSGD). `Exact` sums every micro-batch's
gradient in fp64 across micro-steps and processes and divides once, so the fp32 result
does not depend on how the global batch was cut into processes and micro-steps; it
costs twice the bytes and all overlap. With one process both run without DDP.

The training step calls, for every micro-step a, `with sync.micro_step(a): loss = ...`
then `sync.backward(loss)`, and `sync.finish()` before the optimizer step.

With `measure`, each strategy also keeps the squared norm of a small-batch gradient it
sees on the way (this process's gradient before the all-reduce, or with one process the
first micro-batch's) for the gradient noise scale (noise_scale.py); `take_sq_norms()`
returns it with the squared norm of the global gradient, as device tensors (no sync).
"""
from __future__ import annotations

import contextlib
import inspect
import time

import torch
import torch.distributed as td
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

from . import dist
from .config import DistConfig


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


class _Measure:
    """The small-batch squared norm, gathered during the step; shared by both strategies."""

    accum_steps: int  # may change between steps (batch-size control)

    def __init__(self, model: torch.nn.Module, measure: bool):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.measure = measure
        self.small_sq = None

    @property
    def first_micro(self) -> bool:
        """With several processes the local gradient is the small one; else the first micro-batch's."""
        return self.measure and not dist.active() and self.accum_steps > 1

    def take_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(small-batch |g|^2 of this process, global |G|^2) of the step just finished; None
        where the step had one batch size only (one process, no accumulation)."""
        if self.small_sq is None:
            return None
        out, self.small_sq = (self.small_sq, _sq_norm([p.grad for p in self.params])), None
        return out


class Bucketed(_Measure):
    def __init__(self, model: torch.nn.Module, device: torch.device, accum_steps: int, cfg: DistConfig,
                 measure: bool = False):
        super().__init__(model, measure)
        self.accum_steps, self.bf16 = accum_steps, cfg.allreduce_bf16
        self.module = model
        self.ddp = None  # kept apart from `module`, which torch.compile may wrap
        self.micro = 0
        self.powersgd = None
        if dist.active():
            self.module = self.ddp = self._ddp(model, device, cfg.bucket_mb)
            self.ddp.register_comm_hook(self, _bucket_hook)
            if cfg.powersgd_rank:
                self.powersgd = powerSGD.PowerSGDState(None, matrix_approximation_rank=cfg.powersgd_rank,
                                                       start_powerSGD_iter=cfg.powersgd_start_steps)
        self._reset()

    @staticmethod
    def _ddp(model, device, bucket_mb):
        # BatchNorm buffers are kept in step by group_bn.commit_running_stats, so DDP
        # must not broadcast them. torch >= 2.14 renamed that switch.
        ddp = torch.nn.parallel.DistributedDataParallel
        kwargs = dict(device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb)
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
            return ddp(model, forward_sync_buffers=False, **kwargs)
        return ddp(model, broadcast_buffers=False, **kwargs)

    def micro_step(self, a: int):
        """DDP all-reduces during the backward of the last micro-step only."""
        self.micro = a
        if a < self.accum_steps - 1 and self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()
        if self.first_micro and self.micro == 0:  # p.grad holds this micro-batch's gradient / accum_steps
            self.small_sq = _sq_norm([p.grad for p in self.params]) * self.accum_steps ** 2

    def finish(self) -> None:
        pass

    def _reset(self) -> None:
        self.first_launch = self.last_launch = self.last_done = None

    def _allreduce(self, bucket):
        now = time.perf_counter()
        self.first_launch = self.first_launch or now
        self.last_launch = now
        grads = bucket.buffer()
        if self.measure:  # this process's gradient, before it becomes the global mean
            sq = torch.linalg.vector_norm(grads).double().square()
            self.small_sq = sq if self.small_sq is None else self.small_sq + sq
        if self.powersgd is not None:  # the hook averages, compressed after its first steps
            return powerSGD.powerSGD_hook(self.powersgd, bucket).then(self._done)
        send = grads.to(torch.bfloat16) if self.bf16 else grads
        send.div_(dist.info().world_size)

        def done(f):
            self._done(f)
            if self.bf16:
                grads.copy_(f.value()[0])
            return grads
        return td.all_reduce(send, async_op=True).get_future().then(done)

    def _done(self, fut):
        """Every bucket's future ends here: the time the last one was reduced."""
        self.last_done = time.perf_counter()
        return fut.value()

    def take_seconds(self) -> tuple[float, float]:
        """This step's (communication window: first bucket sent to last reduced;
        exposed tail: last bucket sent to reduced, which backward could not hide)."""
        if self.first_launch is None or self.last_done is None:
            out = (0.0, 0.0)
        else:
            out = (self.last_done - self.first_launch, self.last_done - self.last_launch)
        self._reset()
        return out


def _bucket_hook(state: Bucketed, bucket):
    return state._allreduce(bucket)


class Exact(_Measure):
    def __init__(self, model: torch.nn.Module, device: torch.device, accum_steps: int, cfg: DistConfig,
                 measure: bool = False):
        super().__init__(model, measure)
        self.module, self.accum_steps = model, accum_steps
        self.sums = None
        self.comm = 0.0

    def micro_step(self, a: int):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Unscaled: dividing by accum_steps here would round differently per layout.
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1).double() for p in self.params])
        if self.first_micro and self.sums is None:
            self.small_sq = grads.square().sum()
        self.sums = grads if self.sums is None else self.sums.add_(grads)
        for p in self.params:
            p.grad = None

    def finish(self) -> None:
        if self.measure and dist.active():
            self.small_sq = (self.sums / self.accum_steps).square().sum()
        t0 = time.perf_counter()
        dist.all_reduce_sum(self.sums)
        self.comm = time.perf_counter() - t0
        flat = (self.sums / (self.accum_steps * dist.info().world_size)).to(self.params[0].dtype)
        self.sums = None
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def take_seconds(self) -> tuple[float, float]:
        """Same meaning as Bucketed's; nothing here overlaps backward."""
        out, self.comm = (self.comm, self.comm), 0.0
        return out


def build(model: torch.nn.Module, device: torch.device, accum_steps: int, cfg: DistConfig,
          measure: bool = False) -> Bucketed | Exact:
    return (Exact if cfg.exact_reduction else Bucketed)(model, device, accum_steps, cfg, measure)
