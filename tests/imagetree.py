"""Small ImageNet-like JPEG trees cut from scikit-image's real photographs."""
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut"}


def photo(name: str) -> Image.Image:
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)())


def make_tree(root: Path, per_class: int = 6, val_per_class: int = 2, classes=None, seed: int = 0) -> Path:
    """root/{train,val}/CLASS/*.{jpg,png}: random crops of one photo per class, of varied sizes,
    saved in several modes (RGB and grayscale JPEG, CMYK JPEG, palette PNG)."""
    rng = np.random.default_rng(seed)
    classes = classes or list(SOURCES)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for cls in classes:
            src = photo(SOURCES[cls])
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = src.size
                cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = src.crop((x, y, x + cw, y + ch)).resize((int(rng.integers(80, 200)), int(rng.integers(80, 200))))
                kind = i % 4
                if kind == 1:
                    img.convert("L").save(d / f"{cls}_{i}.jpg", quality=90)
                elif kind == 2:
                    img.convert("CMYK").save(d / f"{cls}_{i}.jpg", quality=90)
                elif kind == 3:
                    img.convert("P").save(d / f"{cls}_{i}.png")
                else:
                    img.save(d / f"{cls}_{i}.JPEG", quality=90)
    return root
