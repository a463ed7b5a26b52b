"""Evaluation that counts every sample exactly once across processes."""
from __future__ import annotations

import torch

from . import dist
from .data import make_loader, model_input
from .data.sampler import eval_batches


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Correct top-1 and top-5 predictions in a batch of scores (logits or probabilities)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


def eval_loader(dataset, batch: int, device: torch.device, workers: int = 0):
    """This process's contiguous shard of the evaluation set, in order."""
    info = dist.info()
    return make_loader(dataset, eval_batches(len(dataset), batch, info.rank, info.world_size), workers, device)


def forward_eval(model: torch.nn.Module, x: torch.Tensor, device: torch.device, bf16: bool,
                 channels_last: bool) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(model_input(x, device, channels_last)).float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch: int, device: torch.device, workers: int = 0, *,
             bf16: bool = False, channels_last: bool = False) -> dict:
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct top-1, correct top-5, loss, count
    for x, y, _ in eval_loader(dataset, batch, device, workers):
        y = y.to(device, non_blocking=True)
        logits = forward_eval(model, x, device, bf16, channels_last)
        top1, top5 = topk_hits(logits, y)
        sums += torch.tensor([top1, top5, torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                              len(y)], dtype=torch.float64)
    dist.all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n,
            "samples": int(sums[3].item())}
