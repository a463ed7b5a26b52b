import pytest
import torch

from largebatch import checkpoint
from largebatch.checkpoint import CheckpointError


def state(step, value=None):
    return {"model": {"w": torch.full((3,), float(step if value is None else value))}, "config": {}, "step": step}


def test_save_links_last_and_keeps_k(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(state(step), tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.step_files(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["step-00000030.pt.sha256", "step-00000040.pt.sha256"]
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["step"] == 40 and last["model"]["w"].tolist() == [40.0] * 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_kill_during_write_leaves_previous_last_intact(tmp_path, monkeypatch):
    checkpoint.save(state(1), tmp_path, 1, keep=3)
    real_save = torch.save

    def torn_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(state(2), tmp_path, 2, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 1
    assert [p.name for p in checkpoint.step_files(tmp_path)] == ["step-00000001.pt"]
    # the next run clears what the killed save left
    assert [p.name for p in checkpoint.remove_partial(tmp_path)] == [f".step-00000002.pt.tmp-{__import__('os').getpid()}"]


def test_full_disk_is_one_clear_error_and_leaves_nothing_behind(small_disk):
    d = small_disk(64 * 1024)
    checkpoint.save(state(1), d, 1, keep=2)
    big = {**state(2), "model": {"w": torch.ones(100_000)}}
    with pytest.raises(CheckpointError, match="disk is full.*previous checkpoint is unchanged"):
        checkpoint.save(big, d, 2, keep=2)
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "step-00000001.pt", "step-00000001.pt.sha256"]
    assert checkpoint.load(d / "last.pt")["step"] == 1


def test_damaged_files_are_detected_and_passed_over(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(state(step), tmp_path, step, keep=3)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    with open(last, "r+b") as f:  # flip one byte in the middle: torch might still read it
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(last)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(tmp_path / "step-00000003.pt")  # the hard-linked twin
    (tmp_path / "step-00000002.pt").write_bytes(b"")  # truncated to nothing
    path, loaded, passed = checkpoint.newest_intact(tmp_path)
    assert path.name == "step-00000001.pt" and loaded["step"] == 1
    assert len(passed) == 2 and "step-00000003.pt" in passed[0] and "step-00000002.pt" in passed[1]


def test_non_finite_weights_are_not_intact(tmp_path):
    checkpoint.save(state(1), tmp_path, 1, keep=3)
    checkpoint.save(state(2, float("nan")), tmp_path, 2, keep=3)
    path, _, passed = checkpoint.newest_intact(tmp_path)
    assert path.name == "step-00000001.pt" and "non-finite" in passed[0]


def test_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")


def test_load_names_what_it_was_given(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "config.yaml")
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        checkpoint.load(tmp_path / "bare.pt")
