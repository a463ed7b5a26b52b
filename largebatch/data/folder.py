"""ImageNet-style class-per-folder image trees: ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, DataConfig
from .sampler import BatchSpec, sample_uniforms

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
CROP_ATTEMPTS = 10


def scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not split_dir.is_dir():
        raise ConfigError(f"data.path: no folder {split_dir} (expected ROOT/train/CLASS/*.jpg and "
                          f"ROOT/val/CLASS/*.jpg)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"data.path: {split_dir} has no class folders")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"data.path: class folder {split_dir / name} holds no images")
        samples += [(str(p), label) for p in files]
    return classes, samples


def random_resized_crop(u: np.ndarray, width: int, height: int, cfg: DataConfig) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from the sample's uniforms.
    Returns (left, top, crop_width, crop_height)."""
    area = width * height
    log_lo, log_hi = math.log(cfg.min_aspect), math.log(cfg.max_aspect)
    for a in range(CROP_ATTEMPTS):
        ua, ur, ui, uj = u[4 * a:4 * a + 4]
        target = area * (cfg.min_area + (cfg.max_area - cfg.min_area) * ua)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(uj * (width - w + 1)), int(ui * (height - h + 1)), w, h
    ratio = width / height  # fallback: the largest centred crop within the aspect range
    if ratio < cfg.min_aspect:
        w, h = width, int(round(width / cfg.min_aspect))
    elif ratio > cfg.max_aspect:
        h, w = height, int(round(height * cfg.max_aspect))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise OSError(f"cannot read image {path}: {e}") from e


class ImageFolder:
    channels = 3

    def __init__(self, root: Path, split: str, cfg: DataConfig, seed: int, train: bool):
        self.classes, self.samples = scan(root / split)
        self.class_names = self.classes
        self.num_classes = len(self.classes)
        self.cfg, self.seed, self.train = cfg, seed, train
        self.augment = train  # per step, BatchSpec.augment decides (data.augment, or the phase)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def transform(self, img: Image.Image, u: np.ndarray | None) -> Image.Image:
        cfg = self.cfg
        if self.train:
            if u is not None:
                left, top, w, h = random_resized_crop(u, img.width, img.height, cfg)
            else:  # augmentation off: a centred square crop of the whole image
                side = min(img.width, img.height)
                left, top, w, h = (img.width - side) // 2, (img.height - side) // 2, side, side
            img = img.resize((cfg.image_size, cfg.image_size), Image.BILINEAR,
                             box=(left, top, left + w, top + h))
            if u is not None and u[-1] < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            return img
        scale = cfg.eval_resize / min(img.width, img.height)
        img = img.resize((max(cfg.eval_crop, round(img.width * scale)),
                          max(cfg.eval_crop, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - cfg.eval_crop) // 2, (img.height - cfg.eval_crop) // 2
        return img.crop((left, top, left + cfg.eval_crop, top + cfg.eval_crop))

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
        u = (sample_uniforms(self.seed, spec.epoch, spec.indices, 4 * CROP_ATTEMPTS + 1)
             if self.augment and spec.augment else [None] * len(spec.indices))
        arrays, labels = [], []
        for i, k in enumerate(spec.indices):
            path, label = self.samples[k]
            arrays.append(np.asarray(self.transform(open_rgb(path), u[i])))
            labels.append(label)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return (x - MEAN) / STD, torch.tensor(labels, dtype=torch.long)
