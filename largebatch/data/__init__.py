"""Datasets and loaders. A dataset maps a BatchSpec (indices + epoch) to a whole batch
(x, y, skipped): `skipped` names the unreadable files replaced in it. The loader feeds
it BatchSpecs from the global sampler, in order."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Iterable

import torch

from .. import dist
from ..config import ConfigError, DataConfig
from . import checks, fmnist, folder, shards
from .folder import ImageFolder, ImageSet
from .sampler import BatchSpec
from .synthetic import Synthetic


def data_channels(cfg: DataConfig) -> int:
    """Known before any file is read, so config errors come first."""
    return {"fmnist": 1, "folder": 3, "shards": 3, "synthetic": cfg.synthetic_channels}[cfg.name]


def data_image_size(cfg: DataConfig) -> int:
    """The side of the images the model sees, known before any file is read."""
    return {"fmnist": 28, "synthetic": cfg.synthetic_size}.get(cfg.name, cfg.image_size)


class Head:
    """The first n samples of a dataset (data.eval_samples: quick validation)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, spec: BatchSpec):
        return self.dataset[spec]

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_dataset(cfg: DataConfig, split: str, seed: int):
    """split: 'train' or 'val'. Checked before it is used (data/checks.py): labels in
    range, every training class readable, every validation file readable."""
    ds = _build(cfg, split, seed)
    where = f"{cfg.path or cfg.name} ({split})"
    checks.labels_in_range(ds, where)
    if isinstance(ds, ImageSet):
        if split == "train":
            checks.every_class_readable(ds, where)
        else:
            ds = checks.readable_validation(ds, cfg.strict)
    return Head(ds, cfg.eval_samples) if split == "val" and cfg.eval_samples else ds


def _build(cfg: DataConfig, split: str, seed: int):
    train = split == "train"
    if cfg.name == "fmnist":
        root = fmnist.resolve_dir(cfg.path)
        if cfg.download:
            fmnist.download(root)
        return fmnist.FashionMNIST(root, "train" if train else "test", seed, train)
    if cfg.name == "folder":
        if not cfg.path:
            raise ConfigError("data.path: folder data needs --data ROOT (ROOT/train/CLASS/*.jpg, ROOT/val/...)")
        ds = ImageFolder(Path(cfg.path), split, cfg, seed, train)
        if not train:
            checks.same_classes(folder.class_names(Path(cfg.path) / "train"), ds.classes, f"data.path {cfg.path}")
        return ds
    if cfg.name == "shards":
        if not cfg.path:
            raise ConfigError("data.path: shard data needs --data DIR (the output of `largebatch pack`)")
        ds = shards.Shards(Path(cfg.path), split, cfg, seed, train)
        if not train and (Path(cfg.path) / "train" / "index.json").exists():
            checks.same_classes(shards.class_names(Path(cfg.path) / "train"), ds.classes, f"data.path {cfg.path}")
        return ds
    n = cfg.synthetic_samples if train else max(cfg.synthetic_samples // 4, 1)
    return Synthetic(n, cfg.synthetic_classes, cfg.synthetic_channels, cfg.synthetic_size,
                     seed + (0 if train else 1))


def default_workers(cfg: DataConfig, local_world_size: int, device: torch.device) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    if cfg.name not in ("folder", "shards"):
        return 0  # in-memory batches cost less than a worker's hand-off
    cores = max(1, dist.usable_cores() // max(local_world_size, 1))
    if device.type == "cpu":
        # The model computes on the same cores. One worker decodes about 560 JPEG images/s
        # (900 from shards) and a CPU core trains ResNet-50 at 3-10 images/s: one worker
        # per 16 cores of the process keeps even ResNet-18 or evaluation fed, and leaves
        # the rest to the model (docs/BENCHMARKS.md).
        return max(1, min(8, math.ceil(cores / 16)))
    return max(1, min(8, cores - 1))  # a GPU's main process wants every other core decoding


IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: building them per batch would copy host->GPU every step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def model_input(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A loader batch as the model takes it. Image batches arrive as uint8 and are
    normalised here, on the device (the GPU, where there is one), after the copy."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        mean, std = _normalisation(device)
        # one copy converts type and layout together, then in place: a fraction of the
        # memory traffic of x.float().sub(mean).div(std).contiguous()
        return torch.empty(x.shape, device=device, memory_format=fmt).copy_(x).sub_(mean).div_(std)
    return x.contiguous(memory_format=fmt)


def make_loader(dataset, specs: Iterable[BatchSpec], workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=specs, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False)
