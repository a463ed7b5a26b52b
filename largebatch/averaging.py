"""A weight-averaged collapse: the mean of chosen snapshots' weights as one model
(stochastic weight averaging, Izmailov et al. 2018), with its BatchNorm statistics
recomputed on training data, since the average of the snapshots' running statistics is
not the statistics of the averaged network. It costs one forward pass at inference,
where a probability ensemble of k snapshots costs k.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import ConfigError
from .data import make_loader
from .data.sampler import BatchSpec
from .evaluate import forward_eval
from .models.group_bn import GroupBatchNorm2d


def average_states(states: Iterable[dict]) -> dict:
    """The mean of every floating-point tensor of the model states; integer buffers (BN's
    num_batches_tracked) are taken from the last state. The states are read one at a time
    (a generator that loads each snapshot keeps one in memory beside the fp64 sums)."""
    sums, last, n = {}, None, 0
    for state in states:
        if last is not None and list(state) != list(last):
            raise ConfigError("average: the snapshots are not all the same model (their parameters differ)")
        for k, v in state.items():
            if v.is_floating_point():
                if k in sums:
                    sums[k] += v.double()
                else:
                    sums[k] = v.double().clone()
        last, n = state, n + 1
    if not n:
        raise ConfigError("average: no snapshots to average")
    return {k: (sums[k] / n).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in last.items()}


@torch.no_grad()
def recompute_bn(model: nn.Module, dataset, batch: int, samples: int, device: torch.device, *,
                 bf16: bool = False, channels_last: bool = False) -> int:
    """Set every BatchNorm layer's running mean and variance to the average of the
    statistics it computes in training mode (one per group of model.bn_group_size samples,
    as in training) over the first `samples` training samples, read in batches of `batch`,
    without augmentation. Returns the number of samples used."""
    norms = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    if not norms:
        return 0
    group = max(m.group_size for m in norms)
    if group and batch % group:
        raise ConfigError(f"recomputing BatchNorm: batches of {batch} do not split into the groups of {group} "
                          f"samples the model normalises over")
    for m in norms:
        m.stat_sum.zero_()
        m.stat_count.zero_()
    was_training = model.training
    model.train()
    n = min(samples, len(dataset)) if samples else len(dataset)
    n -= n % batch  # whole batches only: every group as large as in training
    if n == 0:
        raise ConfigError(f"--bn-samples: fewer than one batch ({batch}) of training samples to recompute "
                          f"BatchNorm statistics on")
    specs = [BatchSpec(tuple(range(i, min(i + batch, n))), 0, False) for i in range(0, n, batch)]
    try:
        for x, _, _ in make_loader(dataset, specs, 0, device):
            forward_eval(model, x, device, bf16, channels_last)
    finally:
        model.train(was_training)
    for m in norms:
        m.running_mean.copy_(m.stat_sum[0] / m.stat_count)
        m.running_var.copy_(m.stat_sum[1] / m.stat_count)
        m.stat_sum.zero_()
        m.stat_count.zero_()
    return n
