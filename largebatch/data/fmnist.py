"""Fashion-MNIST from the standard IDX files (gzipped or not), held in memory."""
from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .sampler import BatchSpec, sample_uniforms

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LARGEBATCH_FMNIST_DIR"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530
PAD = 2


def resolve_dir(path: str | None) -> Path:
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    return None


def download(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stem in FILES["train"] + FILES["test"]:
        if _find(root, stem) is None:
            tmp = root / (stem + ".gz.part")
            try:
                urllib.request.urlretrieve(URL + stem + ".gz", tmp)
            except (urllib.error.URLError, OSError) as e:
                tmp.unlink(missing_ok=True)
                raise ConfigError(f"data.download: could not fetch {URL}{stem}.gz ({getattr(e, 'reason', e)}); "
                                  f"on a machine without internet install dataset-fashion-mnist or copy the "
                                  f"four IDX .gz files into {root}") from None
            os.replace(tmp, root / (stem + ".gz"))


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"data.path: {path} cannot be read ({e}); the file is damaged: reinstall "
                          f"dataset-fashion-mnist or copy the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"data.path: {path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"data.path: {path} is truncated ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


class FashionMNIST:
    channels = 1
    num_classes = 10
    class_names = CLASSES

    def __init__(self, root: Path, split: str, seed: int, augment: bool):
        missing = [s for s in FILES[split] if _find(root, s) is None]
        if missing:
            raise ConfigError(
                f"data.path: Fashion-MNIST not found in {root} (missing {', '.join(m + '.gz' for m in missing)}). "
                f"On Debian/Ubuntu: 'apt-get install dataset-fashion-mnist' (installs to {DEFAULT_DIR}); "
                f"or put the four IDX .gz files in a folder and pass --data DIR or set {ENV_VAR}; "
                f"or add --set data.download=true on a machine with internet access.")
        images, labels = (read_idx(_find(root, s)) for s in FILES[split])
        if len(images) != len(labels):
            raise ConfigError(f"data.path: {root}: {len(images)} {split} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASSES):
            raise ConfigError(f"data.path: {_find(root, FILES[split][1])} holds label {int(labels.max())}, "
                              f"outside Fashion-MNIST's {len(CLASSES)} classes (0-{len(CLASSES) - 1}); "
                              f"the file is damaged or not Fashion-MNIST")
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype(np.int64))
        # the training split may augment; per step, BatchSpec.augment decides
        self.seed, self.augment = seed, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = torch.tensor(spec.indices, dtype=torch.long)
        x = self.images[idx]
        if self.augment and spec.augment:
            x = self._pad_crop_flip(x, spec)
        x = (x.float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
        return x, self.labels[idx], []  # in-memory arrays: nothing to skip

    def _pad_crop_flip(self, x: torch.Tensor, spec: BatchSpec) -> torch.Tensor:
        n, h, w = x.shape
        u = torch.from_numpy(sample_uniforms(self.seed, spec.epoch, spec.indices, 3))
        dy = (u[:, 0] * (2 * PAD + 1)).long()
        dx = (u[:, 1] * (2 * PAD + 1)).long()
        flip = u[:, 2] < 0.5
        padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
        rows = dy[:, None] + torch.arange(h)
        cols = torch.arange(w).expand(n, w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
        return padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
