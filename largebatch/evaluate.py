"""Evaluation that counts every sample exactly once across processes."""
from __future__ import annotations

import torch

from . import dist
from .data import make_loader
from .data.sampler import eval_batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch: int, device: torch.device, workers: int = 0,
             bf16: bool = False, channels_last: bool = False) -> dict:
    info = dist.info()
    was_training = model.training
    model.eval()
    specs = eval_batches(len(dataset), batch, info.rank, info.world_size)
    sums = torch.zeros(4, dtype=torch.float64)  # correct top-1, correct top-5, loss, count
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in make_loader(dataset, specs, workers, device):
        x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        sums += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                              torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                              len(y)], dtype=torch.float64)
    dist.all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n,
            "samples": int(sums[3].item())}
