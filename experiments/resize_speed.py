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
from largebatch.data import folder
from largebatch.data.folder import CROP_ATTEMPTS, IMAGE_EXTENSIONS, resize
from largebatch.data.sampler import sample_uniforms


def jobs(tree: Path, images: int) -> list[tuple]:
    """(decoded image, box, width, height, train): the resize calls the loader makes for
    each image's training crop and evaluation resize. They are recorded from the loader
    itself (decode_transform run once each way with a recording resize), so the images
    are decoded, and the boxes and sizes chosen, exactly as in training."""
    cfg = build_config({}).data
    files = sorted(f for f in (tree / "train").rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)[:images]
    uniforms = sample_uniforms(0, 0, range(len(files)), 4 * CROP_ATTEMPTS + 1)
    calls: list[tuple] = []
    for train in (True, False):
        def record(img, box, width, height):
            calls.append((img, box, width, height, train))
            return resize(img, box, width, height)
        folder.resize = record  # decode_transform looks the name up in its module
        try:
            for f, u in zip(files, uniforms):
                folder.decode_transform(f, u if train else None, cfg, train)
        finally:
            folder.resize = resize
    return calls


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
    parts = {kind: [j[:4] for j in todo if j[4] == (kind == "train")] for kind in ("train", "eval")}
    ms: dict[str, dict[str, list[float]]] = {k: {"pillow": [], "largebatch": []} for k in parts}
    for _ in range(a.repeats):
        for name, fn in (("pillow", pillow), ("largebatch", resize)):
            for kind, part in parts.items():
                t0 = time.perf_counter()
                for call in part:
                    fn(*call)
                ms[kind][name].append(1e3 * (time.perf_counter() - t0) / len(part))
    result = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "images": len(parts["train"]),
              "repeats": a.repeats, "ms_per_image": ms}
    for kind, v in ms.items():
        old, new = statistics.median(v["pillow"]), statistics.median(v["largebatch"])
        result[f"{kind}_speedup"] = old / new
        print(f"{kind:5s}: Pillow {old:.3f} ms, largebatch {new:.3f} ms an image: {old / new:.2f}x")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
