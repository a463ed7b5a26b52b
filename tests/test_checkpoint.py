import pytest
import torch

from largebatch import checkpoint


def test_save_links_last_and_keeps_k(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.step_files(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    last = checkpoint.load(checkpoint.latest(tmp_path))
    assert last["step"] == 40 and last["w"].tolist() == [40.0] * 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_kill_during_write_leaves_previous_last_intact(tmp_path, monkeypatch):
    checkpoint.save({"step": 1, "w": torch.ones(2)}, tmp_path, 1, keep=3)
    real_save = torch.save

    def torn_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "w": torch.zeros(2)}, tmp_path, 2, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 1
    assert [p.name for p in checkpoint.step_files(tmp_path)] == ["step-00000001.pt"]


def test_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="cannot be read"):
        checkpoint.load(tmp_path / "evil.pt")


def test_load_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nope.pt")
