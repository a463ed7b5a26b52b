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
CROP_ATTEMPTS = 10


def class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise ConfigError(f"data.path: no folder {split_dir} (expected ROOT/train/CLASS/*.jpg and "
                          f"ROOT/val/CLASS/*.jpg)")
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = class_names(split_dir)
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


class UnreadableImage(OSError):
    """A file that is not a readable image (corrupt, truncated, empty, another format)."""


def probe(source) -> None:
    """Raise UnreadableImage unless `source` decodes; JPEGs at 1/8 scale in the DCT domain,
    so checking a whole validation set costs a fraction of evaluating it."""
    try:
        with Image.open(source) as img:
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))
            img.load()
    except Exception as e:  # PIL raises many types for broken files
        raise UnreadableImage(f"cannot read image {getattr(source, 'name', source)}: {e}") from e


def decode_transform(source, u: np.ndarray | None, cfg: DataConfig, train: bool) -> np.ndarray:
    """Open `source` (a path or a file object), crop and resize it, return HxWx3 uint8.

    JPEGs are decoded with libjpeg's DCT-domain downscaling (PIL's draft) to the smallest
    size that is still at least the size the crop is resized to, so a 500x375 photo that
    becomes a 224 crop is often decoded at a half or a quarter of its pixels.
    Train: the random-area crop (u = the sample's uniforms; None = augmentation off: a
    centred square) resized to image_size, flipped when the last uniform < 0.5.
    Eval: shorter side to eval_resize, centre crop eval_crop.
    """
    try:
        with Image.open(source) as img:
            width, height = img.size
            if train:
                if u is not None:
                    box = random_resized_crop(u, width, height, cfg)
                else:
                    side = min(width, height)
                    box = ((width - side) // 2, (height - side) // 2, side, side)
                want = (width * cfg.image_size / box[2], height * cfg.image_size / box[3])
            else:
                scale = cfg.eval_resize / min(width, height)
                want = (width * scale, height * scale)
            if img.format == "JPEG":
                img.draft(None, (math.ceil(want[0]), math.ceil(want[1])))
            img.load()
            if img.mode != "RGB":  # L, CMYK, P, RGBA...
                img = img.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise UnreadableImage(f"cannot read image {getattr(source, 'name', source)}: {e}") from e
    rx, ry = img.width / width, img.height / height
    if train:
        left, top, w, h = box
        out = resize(img, (left * rx, top * ry, (left + w) * rx, (top + h) * ry), cfg.image_size, cfg.image_size)
        return out[:, ::-1] if u is not None and u[-1] < 0.5 else out
    out = resize(img, (0, 0, img.width, img.height), max(cfg.eval_crop, round(want[0])),
                 max(cfg.eval_crop, round(want[1])))
    top, left = (out.shape[0] - cfg.eval_crop) // 2, (out.shape[1] - cfg.eval_crop) // 2
    return out[top:top + cfg.eval_crop, left:left + cfg.eval_crop]


def resize(img: Image.Image, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """The region `box` (left, top, right, bottom; rounded to whole pixels) of an RGB image
    resized to width x height: HxWx3 uint8. Bilinear with antialiasing, PIL's filter, in
    torch's vectorised uint8 kernel (faster than Pillow's: docs/BENCHMARKS.md)."""
    left, top, right, bottom = (round(v) for v in box)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None, :, top:bottom, left:right]
    # the kernel's fast path wants its input dense in channels-last memory, which the crop is not
    out = torch.nn.functional.interpolate(x.contiguous(memory_format=torch.channels_last), size=(height, width),
                                          mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class ImageSet:
    """Labelled images read by index; subclasses say where a sample's bytes are.

    An unreadable sample is replaced by the next readable one (its own label comes
    with it, so no label is ever wrong) and its name is returned with the batch, so the
    run can count and report it; with data.strict the first one stops the run.
    """
    channels = 3

    def __init__(self, classes: list[str], labels: list[int], cfg: DataConfig, seed: int, train: bool):
        self.classes = self.class_names = classes
        self.num_classes = len(classes)
        self.labels = labels
        self.cfg, self.seed, self.train = cfg, seed, train
        self.augment = train  # per step, BatchSpec.augment decides (data.augment, or the phase)

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, k: int):
        """A path or file object holding sample k's encoded image."""
        raise NotImplementedError

    def name(self, k: int) -> str:
        raise NotImplementedError

    def unreadable(self, k: int) -> str | None:
        """Why sample k cannot be decoded, or None when it can."""
        try:
            probe(self.source(k))
        except UnreadableImage as e:
            return str(e)
        return None

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        u = (sample_uniforms(self.seed, spec.epoch, spec.indices, 4 * CROP_ATTEMPTS + 1)
             if self.augment and spec.augment else [None] * len(spec.indices))
        arrays, labels, bad = [], [], []
        for i, k in enumerate(spec.indices):
            for _ in range(len(self)):
                try:
                    arrays.append(decode_transform(self.source(k), u[i], self.cfg, self.train))
                    break
                except UnreadableImage as e:
                    if self.cfg.strict:
                        raise UnreadableImage(f"{e} (data.strict is on; without --strict the file is "
                                              f"skipped and reported)") from None
                    bad.append(self.name(k))
                    k = (k + 1) % len(self)
            else:
                raise UnreadableImage("no readable image in the dataset")
            labels.append(self.labels[k])
        # uint8 (N, 3, H, W) in channels-last memory: a quarter of float32's bytes through the
        # loader's queue; data.model_input normalises it on the training device.
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return x, torch.tensor(labels, dtype=torch.long), bad


class ImageFolder(ImageSet):
    def __init__(self, root: Path, split: str, cfg: DataConfig, seed: int, train: bool):
        classes, self.samples = scan(root / split)
        super().__init__(classes, [label for _, label in self.samples], cfg, seed, train)

    def source(self, k: int):
        return self.samples[k][0]

    def name(self, k: int) -> str:
        return self.samples[k][0]
