"""Input pipeline: bad files, packed shards, staging, resume from shards, bench-data."""
import json
import tarfile

import numpy as np
import pytest
import torch

from largebatch import checkpoint
from largebatch.config import ConfigError, DataConfig
from largebatch.data import build_dataset
from largebatch.data.folder import UnreadableImage, decode_transform, scan
from largebatch.data.sampler import BatchSpec
from largebatch.data.shards import pack, parse_size

from conftest import run_cli
from imagetree import make_tree
from test_train import assert_bitwise_equal

BROKEN = {"cat/truncated.jpg", "coffee/empty.jpg", "rocket/notes.jpg"}


def add_broken_files(split_dir):
    good = sorted((split_dir / "cat").glob("*.JPEG"))[0].read_bytes()
    (split_dir / "cat/truncated.jpg").write_bytes(good[:len(good) // 2])
    (split_dir / "coffee/empty.jpg").write_bytes(b"")
    (split_dir / "rocket/notes.jpg").write_text("not an image\n")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("broken"))
    add_broken_files(root / "train")
    return root


def cfg_for(root, name="folder", **kw):
    return DataConfig(name=name, path=str(root), image_size=32, eval_resize=36, eval_crop=32, **kw)


def everything(ds, augment=False):
    return ds[BatchSpec(tuple(range(len(ds))), epoch=0, augment=augment)]


def test_unreadable_files_are_replaced_counted_and_never_mislabelled(broken):
    ds = build_dataset(cfg_for(broken), "train", 0)
    x, y, bad = everything(ds, augment=True)
    assert {b.split("train/")[1] for b in bad} == BROKEN
    assert x.shape == (len(ds), 3, 32, 32)
    plain, _, _ = everything(ds, augment=False)
    readable = [p.split("train/")[1] not in BROKEN for p, _ in ds.samples]
    for i in range(len(ds)):
        # a broken file is replaced by the next readable one, with that file's own label
        j = readable.index(True, i)
        assert y[i] == ds.samples[j][1] and torch.equal(plain[i], plain[j])
    strict = build_dataset(cfg_for(broken, strict=True), "train", 0)
    with pytest.raises(UnreadableImage, match="cat/truncated.jpg"):
        everything(strict)


def test_train_reports_skipped_files_and_strict_stops(broken, tmp_path):
    args = ["train", "--recipe", "fmnist-large", "--data", broken, "--steps", "3", "--global-batch", "27",
            "--set", "data.name=folder", "--set", "data.image_size=32", "--set", "data.eval_resize=36",
            "--set", "data.eval_crop=32", "--set", "model.bn_group_size=0", "--set", "schedule.warmup_epochs=0",
            "--set", "data.workers=1"]
    proc = run_cli(*args, "--out", tmp_path / "skip")
    summary = json.loads((tmp_path / "skip/summary.json").read_text())
    assert {p.split("train/")[1] for p in summary["skipped_files"]} == BROKEN  # 3 steps x 27 = every file
    assert "3 unreadable training files were skipped" in proc.stdout
    proc = run_cli(*args, "--strict", "--out", tmp_path / "strict", check=False)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "data.strict" in proc.stderr


def test_pack_keeps_labels_class_names_and_pixels(broken, tmp_path):
    dst = tmp_path / "packed"
    report = pack(broken, dst, shard_bytes=parse_size("40KB"), workers=2)
    assert {s.split("train/")[1].split(":")[0] for s in report["train"]["skipped"]} == BROKEN
    assert report["train"]["shards"] > 1 and report["val"]["skipped"] == []
    folder = build_dataset(cfg_for(broken), "train", 0)
    shards = build_dataset(cfg_for(dst, "shards"), "train", 0)
    good = [(p, label) for p, label in folder.samples if p.split("train/")[1] not in BROKEN]
    assert shards.classes == folder.classes and len(shards) == len(good)
    assert shards.labels == [label for _, label in good]
    # the same bytes: the same decoded, transformed pixels
    u = np.random.default_rng(0).random(41)
    for k in (0, 7, len(good) - 1):
        want = decode_transform(good[k][0], u, shards.cfg, True)
        assert np.array_equal(decode_transform(shards.source(k), u, shards.cfg, True), want)
    # readable as plain WebDataset tars: KEY.ext then KEY.cls holding the label
    members = []
    for shard in sorted((dst / "train").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [n.rsplit(".", 1)[1] for n, _ in members[1::2]] == ["cls"] * len(good)
    assert [int(v) for _, v in members[1::2]] == shards.labels
    assert {n.rsplit(".", 1)[1] for n, _ in members[0::2]} == {"jpeg", "jpg", "png"}
    assert all(a.split(".")[0] == b.split(".")[0] for (a, _), (b, _) in zip(members[0::2], members[1::2]))


def test_pack_resize_shorter(broken, tmp_path):
    from PIL import Image
    dst = tmp_path / "small"
    pack(broken, dst, resize_shorter=64, workers=1)
    shards = build_dataset(cfg_for(dst, "shards"), "val", 0)
    _, val = scan(broken / "val")
    assert shards.labels == [label for _, label in val]
    for k in range(len(shards)):
        with Image.open(shards.source(k)) as img:
            assert min(img.size) <= 64 and img.format == "JPEG"
    x, y, bad = everything(shards)
    assert x.shape == (len(val), 3, 32, 32) and bad == []


def test_shards_train_resume_mid_epoch_and_staging(broken, tmp_path):
    dst = tmp_path / "packed"
    pack(broken, dst, shard_bytes=parse_size("40KB"), workers=2)
    args = ["train", "--recipe", "fmnist-large", "--data", dst, "--global-batch", "8",
            "--set", "data.name=shards", "--set", "data.image_size=32", "--set", "data.eval_resize=36",
            "--set", "data.eval_crop=32", "--set", "model.bn_group_size=4", "--set", "schedule.warmup_epochs=0",
            "--set", "data.workers=1", "--set", "train.bf16=false", "--set", "train.channels_last=false",
            "--set", "data.augment=true"]
    run_cli(*args, "--steps", "4", "--out", tmp_path / "full")
    # 2 steps, then on to 4 (3 steps per epoch: the resume lands mid-epoch 0 -> epoch 1)
    run_cli(*args, "--steps", "4", "--set", "schedule.decay=constant", "--out", tmp_path / "c4")
    run_cli(*args, "--steps", "2", "--set", "schedule.decay=constant", "--out", tmp_path / "c2")
    run_cli(*args, "--steps", "4", "--set", "schedule.decay=constant", "--out", tmp_path / "c2", "--resume")
    assert_bitwise_equal(checkpoint.load(tmp_path / "c4/checkpoints/last.pt")["model"],
                         checkpoint.load(tmp_path / "c2/checkpoints/last.pt")["model"])
    # staged to "node-local" disk first: the same training
    local = tmp_path / "local"
    run_cli(*args, "--steps", "4", "--stage-to", local, "--out", tmp_path / "staged")
    assert sorted(p.name for p in (local / "train").iterdir()) == sorted(p.name for p in (dst / "train").iterdir())
    assert_bitwise_equal(checkpoint.load(tmp_path / "full/checkpoints/last.pt")["model"],
                         checkpoint.load(tmp_path / "staged/checkpoints/last.pt")["model"])


def test_shard_errors_are_clear(tmp_path, broken):
    with pytest.raises(ConfigError, match="largebatch pack"):
        build_dataset(cfg_for(tmp_path, "shards"), "train", 0)
    with pytest.raises(ConfigError, match="neither train/ nor val/"):
        pack(tmp_path, tmp_path / "out")
    assert parse_size("1GB") == 1 << 30 and parse_size("256MB") == 256 << 20 and parse_size("4096") == 4096


def test_draft_decoding_keeps_the_picture(tmp_path):
    """DCT-domain downscaling changes pixels only slightly against a full decode."""
    from PIL import Image
    from imagetree import photo
    path = tmp_path / "a.jpg"
    photo("astronaut").resize((500, 375)).save(path, quality=90)
    cfg = DataConfig(name="folder", eval_resize=64, eval_crop=56)
    fast = decode_transform(str(path), None, cfg, False).astype(np.float32)
    with Image.open(path) as img:  # the plain way: full decode, then resize
        img = img.convert("RGB").resize((85, 64), Image.BILINEAR)
    left, top = (85 - 56) // 2, (64 - 56) // 2
    slow = np.asarray(img.crop((left, top, left + 56, top + 56))).astype(np.float32)
    assert fast.shape == slow.shape == (56, 56, 3)
    assert np.abs(fast - slow).mean() < 6.0, np.abs(fast - slow).mean()
    assert torch.from_numpy(fast).std() > 20  # a real picture, not a flat one


def test_bench_data_reports_all_three_loaders(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=4, val_per_class=1)
    (root / "train/cat/zz_broken.jpg").write_bytes(b"not an image")  # timed by nobody, reported
    out = tmp_path / "bench.json"
    run_cli("bench-data", root, "--workers", "1", "--batch", "4", "--repeats", "1", "--image-size", "32",
            "--resize-shorter", "64", "--out", out)
    r = json.loads(out.read_text())
    for key in ("folder_images_per_sec", "shards_images_per_sec", "torchvision_images_per_sec"):
        assert r[key] > 0, key
    assert r["images"] == 16 and r["workers"] == 1
    assert r["skipped_files"] == [str(root / "train/cat/zz_broken.jpg")]
    assert r["folder_vs_torchvision"] == pytest.approx(r["folder_images_per_sec"] / r["torchvision_images_per_sec"])


def test_loader_workers_default_to_what_the_device_needs(monkeypatch):
    """A CPU trains on the cores the workers would take: one worker per 16 cores of the
    process; a GPU's main process wants every other core decoding (at most 8)."""
    from largebatch import dist
    from largebatch.config import DataConfig
    from largebatch.data import default_workers
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    folder = DataConfig(name="folder", path="x")
    for cores, procs, on_cpu, on_gpu in [(2, 1, 1, 1), (48, 2, 2, 8), (48, 1, 3, 8), (8, 8, 1, 1), (16, 2, 1, 7)]:
        monkeypatch.setattr(dist, "usable_cores", lambda: cores)
        assert (default_workers(folder, procs, cpu), default_workers(folder, procs, gpu)) == (on_cpu, on_gpu)
    assert default_workers(DataConfig(name="fmnist"), 1, cpu) == 0  # in memory
    assert default_workers(DataConfig(name="folder", path="x", workers=5), 1, cpu) == 5
