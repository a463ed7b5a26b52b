"""The Collapsed Ensemble: snapshots taken at the end of LR cycles, evaluated together
by averaging their softmax probabilities.

Evaluation streams: one model is loaded at a time, and what is kept between members
is the running sum of probabilities over this process's shard of the evaluation set
(samples x classes floats), so memory does not grow with the number of members.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint, dist
from .config import ConfigError
from .evaluate import eval_loader, forward_eval, topk_hits


def snapshot_path(out: Path, index: int) -> Path:
    return Path(out) / "snapshots" / f"{index:02d}.pt"


def snapshot_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "snapshots").glob("[0-9][0-9].pt"))


class RunningEnsemble:
    """Sum of the members' softmax probabilities, per evaluation batch of this process."""

    def __init__(self, dataset, batch: int, device: torch.device, workers: int = 0, *, bf16: bool = False,
                 channels_last: bool = False):
        self.dataset, self.batch, self.device, self.workers = dataset, batch, device, workers
        self.bf16, self.channels_last = bf16, channels_last
        self.sums: list[torch.Tensor] = []
        self.first_pred: list[torch.Tensor] = []  # the first member's top-1 class, per batch
        self.count = 0  # members added so far

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> dict:
        """Add a member; returns its own top-1/top-5, the ensemble's (all members so far), and
        how it differs from the first member: the share of samples whose top-1 class differs
        (an ensemble can change only those) and the share it gets right where the first
        member is wrong (the most an ensemble with it could correct)."""
        was_training = model.training
        model.eval()
        # member top1, top5, ensemble top1, top5, samples, disagreements, right where the first is wrong
        counts = torch.zeros(7, dtype=torch.float64)
        for i, (x, y, _) in enumerate(eval_loader(self.dataset, self.batch, self.device, self.workers)):
            y = y.to(self.device, non_blocking=True)
            probs = forward_eval(model, x, self.device, self.bf16, self.channels_last).softmax(dim=1)
            pred = probs.argmax(dim=1)
            if self.count == 0:
                self.sums.append(probs)
                self.first_pred.append(pred)
            else:
                self.sums[i] += probs
            first = self.first_pred[i]
            counts += torch.tensor([*topk_hits(probs, y), *topk_hits(self.sums[i], y), len(y),
                                    (pred != first).sum().item(), ((pred == y) & (first != y)).sum().item()],
                                   dtype=torch.float64)
        model.train(was_training)
        self.count += 1
        dist.all_reduce_sum(counts)
        n = max(counts[4].item(), 1.0)
        return {"top1": counts[0].item() / n, "top5": counts[1].item() / n,
                "ensemble_top1": counts[2].item() / n, "ensemble_top5": counts[3].item() / n,
                "ensemble_members": self.count, "samples": int(counts[4].item()),
                "disagreement": counts[5].item() / n, "right_where_first_wrong": counts[6].item() / n}

    def probabilities(self) -> torch.Tensor:
        """Mean probabilities over the members, this process's samples in order."""
        return torch.cat(self.sums) / max(self.count, 1)


def evaluate_snapshots(paths: list[Path], model: torch.nn.Module, ensemble: RunningEnsemble) -> dict:
    """Every member's accuracy and how it differs from the last snapshot, and the ensemble
    of the last k members for k = 1..K (members are added from the last to the first, so
    each prefix is a 'last k')."""
    members, ensembles, seconds = [None] * len(paths), [], 0.0
    for i in reversed(range(len(paths))):
        state = checkpoint.load(paths[i])
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ConfigError(f"ensemble: {paths[i]} is not the same model as {paths[-1]}: {e}") from e
        t0 = time.perf_counter()
        r = ensemble.add(model)
        seconds += time.perf_counter() - t0
        members[i] = {"path": str(paths[i]), "step": state.get("step"), "phase": state.get("phase", {}).get("name"),
                      "top1": r["top1"], "top5": r["top5"], "disagrees_with_last": r["disagreement"],
                      "right_where_last_wrong": r["right_where_first_wrong"]}
        # the inference cost: one forward pass over the evaluation set per member
        ensembles.append({"k": r["ensemble_members"], "top1": r["ensemble_top1"], "top5": r["ensemble_top5"],
                          "forward_passes": r["ensemble_members"], "seconds": seconds})
    return {"members": members, "ensembles": ensembles}
