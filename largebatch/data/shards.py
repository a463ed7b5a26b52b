"""Packed shards: an image tree written once into large tar files, read by offset.

Layout of DST/SPLIT/ (SPLIT = train, val):
  shard-000000.tar ...  WebDataset-compatible tars: each sample is KEY.jpg (or the file's
                        own image extension) followed by KEY.cls, the class index as text
  index.npz             per sample: shard number, byte offset and size of the image, label
  index.json            class names, shard names, sample count, files skipped when packing

Training reads samples by offset in the global sample order (os.pread, so forked
loader workers never share a file position), which keeps layout invariance and exact
resume. A parallel file system then sees a few large files instead of a million small
ones, and `data.stage_to` copies them to node-local disk first, as the SC18 authors did
with their database.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from .. import dist
from ..config import ConfigError, DataConfig
from . import checks
from .folder import ImageSet, UnreadableImage, scan
from .folder import class_names as class_names_of_folder

SPLITS = ("train", "val")


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KB', '1000' -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * factor)
    return int(t)


def _prepare(job: tuple[str, int]) -> tuple[bytes, str] | str:
    """Read one file; check it decodes; re-encode it when resizing. A string = the error."""
    path, resize_shorter = job
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if not resize_shorter:
                img.load()  # a full decode: truncated files fail here, not in training
                return data, Path(path).suffix.lower().lstrip(".")
            w, h = img.size
            scale = resize_shorter / min(w, h)
            if img.format == "JPEG" and scale < 1:
                img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
            rgb = img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{path}: {e}"
    if scale < 1:
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=90)
    return out.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_split(src: Path, dst: Path, shard_bytes: int, resize_shorter: int, workers: int,
               strict: bool) -> dict:
    classes, samples = scan(src)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard_of, offset, size, label, skipped, shards = [], [], [], [], [], []
    tar, key = None, 0
    jobs = [(path, resize_shorter) for path, _ in samples]
    with Pool(workers) as pool:
        for (path, lab), done in zip(samples, pool.imap(_prepare, jobs, chunksize=16)):
            if isinstance(done, str):
                if strict:
                    raise UnreadableImage(f"cannot read image {done} (--strict)")
                skipped.append(done)
                continue
            data, ext = done
            if tar is None or tar.offset >= shard_bytes:
                if tar is not None:
                    tar.close()
                shards.append(f"shard-{len(shards):06d}.tar")
                tar = tarfile.open(tmp / shards[-1], "w", format=tarfile.USTAR_FORMAT)
            name = f"{key:09d}"
            header_at = tar.offset
            _add(tar, f"{name}.{ext}", data)
            shard_of.append(len(shards) - 1)
            offset.append(header_at + tarfile.BLOCKSIZE)  # USTAR: one 512-byte header per member
            size.append(len(data))
            label.append(lab)
            _add(tar, f"{name}.cls", str(lab).encode())
            key += 1
    if tar is not None:
        tar.close()
    if not label:
        raise ConfigError(f"pack: no readable image in {src}")
    np.savez(tmp / "index.npz", shard=np.array(shard_of, np.int32), offset=np.array(offset, np.int64),
             size=np.array(size, np.int64), label=np.array(label, np.int32))
    meta = {"classes": classes, "shards": shards, "samples": len(label), "skipped": skipped,
            "resize_shorter": resize_shorter, "source": str(src)}
    (tmp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)  # the split appears complete or not at all
    return meta


def pack(src: Path, dst: Path, shard_bytes: int = 1 << 30, resize_shorter: int = 0, workers: int = 0,
         strict: bool = False) -> dict:
    src, dst = Path(src), Path(dst)
    splits = [s for s in SPLITS if (src / s).is_dir()]
    if not splits:
        raise ConfigError(f"pack: {src} has neither train/ nor val/ (expected SRC/train/CLASS/*.jpg)")
    if len(splits) == 2:  # before hours of packing
        checks.same_classes(class_names_of_folder(src / "train"), class_names_of_folder(src / "val"), f"pack: {src}")
    workers = workers or dist.usable_cores()
    report = {}
    for split in splits:
        t0 = time.time()
        meta = pack_split(src / split, dst / split, shard_bytes, resize_shorter, workers, strict)
        report[split] = {"samples": meta["samples"], "shards": len(meta["shards"]),
                         "skipped": meta["skipped"], "seconds": round(time.time() - t0, 1)}
    return report


def class_names(split_dir: Path) -> list[str]:
    return json.loads((split_dir / "index.json").read_text())["classes"]


class Shards(ImageSet):
    def __init__(self, root: Path, split: str, cfg: DataConfig, seed: int, train: bool):
        d = Path(root) / split
        if not (d / "index.json").exists():
            raise ConfigError(f"data.path: no packed shards in {d} (write them with `largebatch pack SRC {root}`)")
        meta = json.loads((d / "index.json").read_text())
        index = np.load(d / "index.npz")
        self.dir, self.shards = d, meta["shards"]
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]
        super().__init__(meta["classes"], index["label"].tolist(), cfg, seed, train)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.dir / self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def source(self, k: int):
        data = os.pread(self._fd(int(self.shard[k])), int(self.size[k]), int(self.offset[k]))
        if len(data) != self.size[k]:
            raise UnreadableImage(f"{self.name(k)}: shard is truncated")
        return io.BytesIO(data)

    def name(self, k: int) -> str:
        return f"{self.dir / self.shards[int(self.shard[k])]}#{k:09d}"

    def __getstate__(self):  # descriptors are per process
        return {**self.__dict__, "_fds": {}}


def stage(root: Path, dest: Path) -> Path:
    """Copy packed shards to `dest` (node-local disk); files already there with the same
    size are kept, so a restarted job does not copy again. Returns the new root."""
    root, dest = Path(root), Path(dest)
    for split in SPLITS:
        if not (root / split / "index.json").exists():
            continue
        meta = json.loads((root / split / "index.json").read_text())
        (dest / split).mkdir(parents=True, exist_ok=True)
        for name in [*meta["shards"], "index.npz", "index.json"]:
            src, dst = root / split / name, dest / split / name
            if dst.exists() and dst.stat().st_size == src.stat().st_size:
                continue
            tmp = dst.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return dest
