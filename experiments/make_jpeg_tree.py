"""Build an ImageNet-like JPEG tree from scikit-image's real photographs, for benchmarks:
ROOT/{train,val}/CLASS/*.JPEG, about 500x375 (landscape or portrait, sizes jittered),
quality 90, like the typical ImageNet-1K file.

    python experiments/make_jpeg_tree.py ROOT [--per-class 125]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "brick"]  # the last two are grayscale, like some ImageNet files


def photo(name: str) -> Image.Image:
    import skimage.data
    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    return Image.fromarray(img).convert("RGB")


def build(root: Path, per_class: int, val_per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        src = photo(name)
        for split, n in (("train", per_class), ("val", val_per_class)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = src.size
                cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                size = (500, 375) if rng.random() < 0.75 else (375, 500)
                jitter = rng.uniform(0.9, 1.1)
                size = (int(size[0] * jitter), int(size[1] * jitter))
                img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img.save(d / f"{name}_{i:05d}.JPEG", quality=90)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--per-class", type=int, default=125)
    p.add_argument("--val-per-class", type=int, default=10)
    a = p.parse_args()
    build(a.root, a.per_class, a.val_per_class)
    files = list(a.root.rglob("*.JPEG"))
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / len(files) / 1024:.0f} KB each on average")
