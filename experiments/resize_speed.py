"""The loader's resize against Pillow's, on the same decoded images: each training crop
(the loader's random-area crops) and each evaluation resize, made by both, timed on one
thread as in a loader worker, repeats alternated.

    python experiments/resize_speed.py --tree /tmp/vs_timm_tree/jpeg --out docs/bench/resize_speed.json

Both compute PIL's antialiased bilinear filter (tests/test_folder.py pins that they agree);
what differs is the kernel: largebatch.data.folder.resize runs torch's vectorised uint8
one, Pillow its own. The decode is the same for both and not timed here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import hardware
from largebatch.config import build_config
from largebatch.data.folder import IMAGE_EXTENSIONS, random_resized_crop, resize


def jobs(tree: Path, images: int):
    """(decoded image, box, width, height, train) for each image: its training crop and its
    evaluation resize, with the loader's sizes."""
    cfg = build_config({}).data
    rng = np.random.default_rng(0)
    files = sorted(f for f in (tree / "train").rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)[:images]
    out = []
    for f in files:
        with Image.open(f) as img:
            img = img.convert("RGB")
        left, top, w, h = random_resized_crop(rng.random(41), img.width, img.height, cfg)
        out.append((img, (left, top, left + w, top + h), cfg.image_size, cfg.image_size, True))
        scale = cfg.eval_resize / min(img.size)
        out.append((img, (0, 0, img.width, img.height), round(img.width * scale), round(img.height * scale), False))
    return out


def pillow(img, box, width, height):
    return np.asarray(img.resize((width, height), Image.BILINEAR, box=box))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, required=True, help="a tree with train/CLASS/*.jpg")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)  # a loader worker's setting
    todo = jobs(a.tree, a.images)
    ms: dict[str, dict[str, list[float]]] = {k: {"pillow": [], "largebatch": []} for k in ("train", "eval")}
    for _ in range(a.repeats):
        for name, fn in (("pillow", pillow), ("largebatch", resize)):
            for kind in ("train", "eval"):
                part = [j for j in todo if j[4] == (kind == "train")]
                t0 = time.perf_counter()
                for img, box, w, h, _ in part:
                    fn(img, box, w, h)
                ms[kind][name].append(1e3 * (time.perf_counter() - t0) / len(part))
    result = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "images": len(todo) // 2,
              "repeats": a.repeats, "ms_per_image": ms}
    for kind, v in ms.items():
        old, new = statistics.median(v["pillow"]), statistics.median(v["largebatch"])
        result[f"{kind}_speedup"] = old / new
        print(f"{kind:5s}: Pillow {old:.3f} ms, largebatch {new:.3f} ms an image: {old / new:.2f}x")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
