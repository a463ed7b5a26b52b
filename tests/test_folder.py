import json

import numpy as np
import pytest
import torch

from largebatch.config import ConfigError, DataConfig
from largebatch.data import build_dataset
from largebatch.data.folder import random_resized_crop, resize, scan
from largebatch.data.shards import pack
from largebatch.data.sampler import BatchSpec

from conftest import run_cli
from imagetree import make_tree, photo


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def folder_cfg(root, **kw):
    return DataConfig(name="folder", path=str(root), **kw)


def test_scan_labels_follow_sorted_class_folders(tree):
    classes, samples = scan(tree / "train")
    assert classes == ["astronaut", "cat", "coffee", "rocket"]
    assert len(samples) == 24
    for path, label in samples:
        assert f"/{classes[label]}/" in path


def test_train_and_eval_transforms(tree):
    cfg = folder_cfg(tree, image_size=64, eval_resize=72, eval_crop=64)
    train = build_dataset(cfg, "train", seed=1)
    x, y, _ = train[BatchSpec(tuple(range(8)), epoch=0, augment=True)]
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.uint8  # normalised on the device (model_input)
    assert y.tolist() == [label for _, label in train.samples[:8]]
    again, _, _ = train[BatchSpec((3,), epoch=0, augment=True)]
    torch.testing.assert_close(again[0], x[3])               # a pure function of (seed, epoch, index)
    assert not torch.equal(train[BatchSpec((3,), epoch=1, augment=True)][0][0], x[3])
    val = build_dataset(cfg, "val", seed=1)
    xv, _, _ = val[BatchSpec((0, 1), epoch=0)]
    assert xv.shape == (2, 3, 64, 64)
    torch.testing.assert_close(val[BatchSpec((0,), epoch=5)][0][0], xv[0])   # no randomness in eval
    # grayscale, CMYK and palette files all become 3-channel images
    assert {p.rsplit(".", 1)[1] for p, _ in train.samples} == {"JPEG", "jpg", "png"}


def test_random_resized_crop_respects_area_and_aspect():
    cfg = DataConfig()
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = int(rng.integers(50, 600)), int(rng.integers(50, 600))
        left, top, cw, ch = random_resized_crop(rng.random(41), w, h, cfg)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
        area = cw * ch / (w * h)
        assert area <= 1.0 + 1e-9
        if area >= 0.08 * 0.9 and not (cw == w or ch == h):
            assert 0.7 < cw / ch < 1.4


def test_class_mismatch_and_empty_class_are_errors(tmp_path):
    root = make_tree(tmp_path / "a", per_class=1, val_per_class=1, classes=["cat", "coffee"])
    (root / "val" / "coffee").rename(root / "val" / "tea")
    with pytest.raises(ConfigError, match="the train and val splits have different classes"):
        build_dataset(folder_cfg(root), "val", 0)
    with pytest.raises(ConfigError, match="pack: .* different classes \\(coffee, tea\\)"):
        pack(root, tmp_path / "packed")  # refused before any shard is written
    assert not (tmp_path / "packed").exists()
    (root / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build_dataset(folder_cfg(root), "train", 0)
    with pytest.raises(ConfigError, match="no folder"):
        build_dataset(folder_cfg(tmp_path / "nothing"), "train", 0)


def test_train_and_eval_on_a_folder_tree(tree, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--recipe", "fmnist-large", "--data", tree, "--out", out, "--steps", "3",
            "--global-batch", "8", "--set", "data.name=folder", "--set", "data.image_size=32",
            "--set", "data.eval_resize=36", "--set", "data.eval_crop=32", "--set", "model.bn_group_size=4",
            "--set", "schedule.warmup_epochs=0", "--set", "data.workers=1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["global_batch"] == 8
    result = json.loads(run_cli("eval", "--checkpoint", out / "checkpoints/last.pt").stdout.splitlines()[-1])
    assert result["samples"] == 8 and result["top1"] == summary["top1"]


@pytest.mark.parametrize("box, size", [((37, 20, 337, 320), (224, 224)),  # a crop, downscaled
                                       ((100, 50, 180, 130), (224, 224)),  # a small crop, upscaled
                                       ((0, 0, 500, 375), (299, 224))])  # the whole image (evaluation)
def test_resize_computes_pils_bilinear_filter(box, size):
    """The crop's resize (torch's uint8 kernel) gives PIL's antialiased bilinear pixels to
    within rounding, except in a border where PIL's filter reads pixels outside the box."""
    from PIL import Image
    img = photo("astronaut").resize((500, 375))
    ours = resize(img, box, *size)
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    pil = np.asarray(img.resize(size, Image.BILINEAR, box=box))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff[3:-3, 3:-3].max() <= 1 and diff.mean() < 0.1, (diff.max(), diff.mean())
