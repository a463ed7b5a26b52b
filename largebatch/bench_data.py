"""`largebatch bench-data`: decode + augment throughput of the input pipeline, side by
side with torchvision's ImageFolder and standard transforms, on the same files, with
the same workers and batch, in one run (these machines are shared: compare ratios)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .data import make_loader, model_input
from .data.folder import ImageFolder
from .data.sampler import BatchSpec
from .data.shards import Shards, pack


def _time_batches(batches, count: int) -> float:
    """images/s from the first batch's arrival (workers started) to the last, with each
    batch made into the float tensor the model takes (ours normalise uint8 here)."""
    it = iter(batches)
    first = next(it)
    t0, seen = time.perf_counter(), 0
    for batch in it:
        model_input(batch[0], torch.device("cpu"))
        seen += len(batch[1])
    elapsed = time.perf_counter() - t0
    assert seen + len(first[1]) == count
    return seen / elapsed


def _ours(dataset, order: np.ndarray, batch: int, workers: int) -> float:
    specs = [BatchSpec(tuple(order[i:i + batch].tolist()), 0, True) for i in range(0, len(order), batch)]
    return _time_batches(make_loader(dataset, specs, workers, torch.device("cpu")), len(order))


def _torchvision(root: Path, order: np.ndarray, batch: int, workers: int, size: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder as TVImageFolder
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = TVImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=order.tolist(), num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    return _time_batches(loader, len(order))


def bench_data(src: Path, workers: int = 1, batch: int = 64, images: int = 0, repeats: int = 2,
               image_size: int = 224, shards: Path | None = None, resize_shorter: int = 256) -> dict:
    src = Path(src)
    if not (src / "train").is_dir():
        raise ConfigError(f"bench-data: {src} has no train/ folder (expected SRC/train/CLASS/*.jpg)")
    cfg = DataConfig(name="folder", path=str(src), image_size=image_size)
    folder = ImageFolder(src, "train", cfg, seed=0, train=True)
    # Unreadable files are timed by nobody: packing skips them, and torchvision's loader
    # would stop at them. Shard k is the k-th readable file of the folder, in scan order.
    readable, skipped = [], []
    for k in range(len(folder)):
        (skipped if folder.unreadable(k) else readable).append(k)
    n = min(images or len(readable), len(readable))
    if n == 0:
        raise ConfigError(f"bench-data: no readable image under {src / 'train'}")
    positions = np.random.default_rng(0).permutation(len(readable))[:n]
    order = np.asarray(readable)[positions]
    result = {"source": str(src), "images": n, "batch": batch, "workers": workers, "image_size": image_size,
              "skipped_files": [folder.name(k) for k in skipped]}
    with tempfile.TemporaryDirectory() as tmp:
        if shards is None:
            t0 = time.perf_counter()
            shards = Path(tmp) / "shards"
            pack(src, shards, resize_shorter=resize_shorter, workers=max(workers, 1))
            result["pack_seconds"] = time.perf_counter() - t0
            result["shards_resize_shorter"] = resize_shorter
        packed = Shards(Path(shards), "train", DataConfig(name="shards", path=str(shards),
                                                           image_size=image_size), seed=0, train=True)
        if len(packed) != len(readable):
            raise ConfigError(f"bench-data: the shards hold {len(packed)} samples, the folder {len(readable)} "
                              f"readable ones: pass shards packed from this folder, or none")
        runs = {"folder": [], "shards": [], "torchvision": []}
        for _ in range(repeats):  # interleaved, so that a noisy neighbour hits all three alike
            runs["torchvision"].append(_torchvision(src / "train", order, batch, workers, image_size))
            runs["folder"].append(_ours(folder, order, batch, workers))
            runs["shards"].append(_ours(packed, positions, batch, workers))
    for name, values in runs.items():
        result[f"{name}_images_per_sec"] = statistics.fmean(values)
        result[f"{name}_images_per_sec_runs"] = values
        result[f"{name}_images_per_sec_per_worker"] = statistics.fmean(values) / max(workers, 1)
    tv = result["torchvision_images_per_sec"]
    result["folder_vs_torchvision"] = result["folder_images_per_sec"] / tv
    result["shards_vs_torchvision"] = result["shards_images_per_sec"] / tv
    return result
