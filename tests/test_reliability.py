"""Nothing lost and nothing silent: divergence, damaged checkpoints, a busy run directory,
resume with another config, Ctrl-C, bad data, and user errors as one line."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
import torch

from largebatch import checkpoint
from largebatch.cli import main as cli_main
from largebatch.config import ConfigError, TrainConfig, build_config, to_dict
from largebatch.dist import resolve_layout
from largebatch.rundir import RunLock

from conftest import ROOT, run_cli
from imagetree import make_tree
from test_train import TINY as TRAIN_TINY

TINY = [*TRAIN_TINY, "--set", "data.eval_samples=1000"]


def cli(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, stderr). Its stdout stays in cli.out."""
    capsys.readouterr()
    try:
        cli_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    cli.out = captured.out
    return code, captured.err


def one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("largebatch: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# 1. divergence ------------------------------------------------------------------------

def test_divergence_stops_with_exit_3_and_saves_nothing_from_it(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    code, err = cli(capsys, "train", *TINY, "--steps", "20", "--set", "schedule.peak_lr=10000.0", "--out", out)
    assert code == 3
    one_line_error(err, "diverged at step", "peak LR", "warmup", "lars")
    assert not checkpoint.has_checkpoints(out / "checkpoints")
    assert "diverged" in (out / "metrics.jsonl").read_text().splitlines()[-1]


def test_late_divergence_keeps_the_good_checkpoints(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    # the LR is multiplied by 1e5 from step 25 on: it blows up a few steps later
    late = [*TINY, "--set", "schedule.decay=step", "--set", f"schedule.milestones=[{25 / 937}]",
            "--set", "schedule.gamma=100000.0", "--set", "train.checkpoint_every_steps=10",
            "--set", "train.keep_checkpoints=2", "--steps", "60", "--out", out]
    code, err = cli(capsys, "train", *late)
    assert code == 3
    files = checkpoint.step_files(out / "checkpoints")
    assert len(files) == 2 and str(files[-1]) in err  # the message names the newest good one
    assert all(checkpoint.finite(checkpoint.load(p)) for p in files)
    good = checkpoint.load(files[-1])["step"]
    assert good >= 20 and good % 10 == 0
    code, err = cli(capsys, "train", *late, "--resume")  # resumes from the newest good one, diverges again
    assert code == 3 and json.loads((out / "run.json").read_text())["resumed_from_step"] == good


def test_eval_refuses_non_finite_weights(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    cli_main(["train", *TINY, "--steps", "2", "--out", str(out)])
    state = checkpoint.load(out / "checkpoints/last.pt")
    state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.atomic_save(state, tmp_path / "nan.pt")
    code, err = cli(capsys, "eval", "--checkpoint", tmp_path / "nan.pt")
    assert code == 2
    one_line_error(err, "non-finite")


# 2. damaged checkpoints -----------------------------------------------------------------

def test_resume_passes_over_a_damaged_last_and_ends_identical(tmp_path, capsys, fmnist_dir):
    full, run = tmp_path / "full", tmp_path / "run"
    every2 = [*TINY, "--set", "train.checkpoint_every_steps=2", "--set", "train.keep_checkpoints=3"]
    cli_main(["train", *every2, "--steps", "6", "--out", str(full)])
    cli_main(["train", *every2, "--steps", "4", "--out", str(run)])
    last = run / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated; its hard-linked twin step-4 too
    code, err = cli(capsys, "train", *every2, "--steps", "6", "--out", run, "--resume")
    assert code == 0
    assert "passing over" in cli.out and "step-00000004.pt is damaged" in cli.out
    assert json.loads((run / "run.json").read_text())["resumed_from_step"] == 2
    a, b = (checkpoint.load(p / "checkpoints/last.pt")["model"] for p in (full, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_last_uses_the_step_files_and_never_restarts_from_zero(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    every2 = [*TINY, "--set", "train.checkpoint_every_steps=2", "--set", "train.keep_checkpoints=3"]
    cli_main(["train", *every2, "--steps", "4", "--out", str(out)])
    (out / "checkpoints/last.pt").unlink()
    cli_main(["train", *every2, "--steps", "6", "--out", str(out), "--resume"])
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 4
    for p in checkpoint.step_files(out / "checkpoints"):
        p.write_bytes(b"garbage")
    code, err = cli(capsys, "train", *every2, "--steps", "8", "--out", out, "--resume")
    assert code == 2
    one_line_error(err, "no intact checkpoint", "not starting from step 0")
    assert [p.read_bytes() for p in checkpoint.step_files(out / "checkpoints")] == [b"garbage"] * 3


def test_full_disk_during_training_is_one_line_and_the_previous_checkpoint_stays(small_disk, capsys, fmnist_dir):
    out = small_disk(1_000_000) / "run"  # room for one checkpoint (~630 KB), not two
    code, err = cli(capsys, "train", *TINY, "--steps", "4", "--set", "train.checkpoint_every_steps=2",
                    "--out", out)
    assert code == 2
    one_line_error(err, "disk is full")
    assert [p.name for p in checkpoint.step_files(out / "checkpoints")] == ["step-00000002.pt"]
    assert checkpoint.load(out / "checkpoints/last.pt")["step"] == 2
    assert not list((out / "checkpoints").glob(".*tmp*")) and not list(out.glob(".*tmp*"))


# 3. the lock on --out -------------------------------------------------------------------

def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    lock = RunLock(out)
    assert lock.acquire() is None
    try:
        code, err = cli(capsys, "train", *TINY, "--steps", "2", "--out", out)
    finally:
        lock.release()
    assert code == 2
    one_line_error(err, "in use by another run", f"pid {os.getpid()}")
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_dead_runs_lock_is_taken_over(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "yesterday"}))
    code, _ = cli(capsys, "train", *TINY, "--steps", "2", "--out", out)
    assert code == 0 and "took over the lock" in cli.out and "pid 999999 on host elsewhere" in cli.out


def test_two_runs_started_together_one_is_refused(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "largebatch", "train", *TINY, "--steps", "30", "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert any("in use by another run" in err for _, err in results)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one writer


# 4. resume with a changed config ------------------------------------------------------

def test_resume_refuses_changes_to_what_is_trained(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    cli_main(["train", *TINY, "--steps", "2", "--out", str(out)])
    saved = (out / "config.yaml").read_text()
    for change, key in ((["--global-batch", "128"], "train.global_batch"), (["--model", "resnet20"], "model.name"),
                        (["--set", "optim.weight_decay=1e-3"], "optim.weight_decay")):
        code, err = cli(capsys, "train", *TINY, "--steps", "4", "--out", out, "--resume", *change)
        assert code == 2
        one_line_error(err, key, "--allow-config-change")
        assert (out / "config.yaml").read_text() == saved
    # run length, logging and layout may change, with a line saying so
    code, _ = cli(capsys, "train", *TINY, "--steps", "4", "--out", out, "--resume",
                  "--set", "train.log_every_steps=1", "--micro-batch", "16")
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_step"] == 2 and run["config_changes"]["train.log_every_steps"] == [2, 1]
    # an accepted change is recorded
    code, _ = cli(capsys, "train", *TINY, "--steps", "6", "--out", out, "--resume",
                  "--set", "optim.weight_decay=1e-3", "--allow-config-change")
    assert code == 0
    assert json.loads((out / "run.json").read_text())["config_changes"]["optim.weight_decay"] == [0.0005, 0.001]


def test_keys_added_by_a_newer_version_at_their_default_do_not_block_a_resume():
    """A run started before a key existed did what the key's default does."""
    from largebatch.config import Config, dump_yaml
    from largebatch.rundir import config_changes
    now = to_dict(Config())
    saved = yaml.safe_load(dump_yaml(Config()))
    del saved["ensemble"]["cycle_shape"], saved["dist"]["interface"]
    assert config_changes(yaml.safe_dump(saved), now) == ({}, {})
    now["ensemble"]["cycle_shape"] = "cosine"  # not the default: a change of what is trained
    assert config_changes(yaml.safe_dump(saved), now)[1] == {"ensemble.cycle_shape": ("(absent)", "cosine")}


# 5. Ctrl-C ------------------------------------------------------------------------------

def _start(args, nproc=1):
    base = [sys.executable, "-m"]
    if nproc > 1:
        base += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    return subprocess.Popen(base + ["largebatch", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)


def _wait_for_steps(out, proc, timeout=240):
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_checkpoints_and_exits_130(tmp_path, nproc, fmnist_dir):
    out = tmp_path / "run"
    proc = _start(["train", *TINY, "--steps", "5000", "--out", out], nproc)
    _wait_for_steps(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: every process of the group
    stdout, stderr = proc.communicate(timeout=120)
    if nproc == 1:
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr.replace("torch.distributed.elastic", ""), stderr
    state = checkpoint.load(out / "checkpoints/last.pt")
    assert 0 < state["step"] < 5000
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["stopped_by_signal"] == signal.SIGINT


def test_a_second_ctrl_c_exits_at_once(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    proc = _start(["train", *TINY, "--steps", "5000", "--set", "train.eval_every_epochs=0.05",
                   "--set", "data.eval_samples=10000", "--out", out])
    _wait_for_steps(out, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(2.5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr


# 6. bad data ----------------------------------------------------------------------------

def _fmnist_copy(src, dst, split_file, labels):
    shutil.copytree(src, dst)
    with gzip.open(dst / split_file, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + bytes(labels))
    return dst


@pytest.mark.parametrize("split_file,n", [("t10k-labels-idx1-ubyte.gz", 10000), ("train-labels-idx1-ubyte.gz", 60000)])
def test_labels_out_of_range_stop_before_training(tmp_path, capsys, fmnist_dir, split_file, n):
    labels = [i % 10 for i in range(n)]
    labels[n // 2] = 12
    data = _fmnist_copy(fmnist_dir, tmp_path / "fm", split_file, labels)
    code, err = cli(capsys, "train", *TINY, "--steps", "2", "--data", data, "--out", tmp_path / "run")
    assert code == 2
    one_line_error(err, split_file, "label 12")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


FOLDER = ["--recipe", "fmnist-large", "--set", "data.name=folder", "--model", "resnet18", "--global-batch", "8",
          "--set", "data.image_size=32", "--set", "data.eval_resize=36", "--set", "data.eval_crop=32",
          "--set", "train.eval_every_epochs=0", "--set", "model.bn_group_size=0", "--set", "train.bf16=false",
          "--set", "data.workers=0", "--set", "schedule.warmup_epochs=0"]


def test_unreadable_validation_files_are_found_before_training(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", per_class=4, val_per_class=2)
    broken = tree / "val/cat/broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    code, err = cli(capsys, "train", *FOLDER, "--steps", "1", "--data", tree, "--strict", "--out", tmp_path / "strict")
    assert code == 2
    one_line_error(err, "broken.jpg", "data.strict")
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()
    code, _ = cli(capsys, "train", *FOLDER, "--steps", "1", "--data", tree, "--out", tmp_path / "run")
    assert code == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["val_skipped_files"] == [str(broken)]
    proc = run_cli("eval", "--checkpoint", tmp_path / "run/checkpoints/last.pt")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 8 and result["skipped_files"] == [str(broken)]


def test_a_class_with_no_readable_file_is_an_error(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", per_class=2, val_per_class=1)
    for f in (tree / "train/coffee").iterdir():
        f.write_bytes(b"\xff\xd8 truncated")
    code, err = cli(capsys, "train", *FOLDER, "--steps", "1", "--data", tree, "--out", tmp_path / "run")
    assert code == 2
    one_line_error(err, "class 'coffee'")


def test_eval_checks_class_names(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", per_class=2, val_per_class=1)
    cli_main(["train", *FOLDER, "--steps", "1", "--data", str(tree), "--out", str(tmp_path / "run")])
    ckpt = tmp_path / "run/checkpoints/last.pt"
    renamed = tmp_path / "renamed"
    shutil.copytree(tree, renamed)
    for split in ("train", "val"):
        (renamed / split / "cat").rename(renamed / split / "dog")
    code, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", renamed)
    assert code == 2
    one_line_error(err, "other classes")
    fewer = tmp_path / "fewer"
    shutil.copytree(tree, fewer)
    for split in ("train", "val"):
        shutil.rmtree(fewer / split / "rocket")
    checkpoint.atomic_save(checkpoint.load(ckpt), tmp_path / "01.pt")
    code, err = cli(capsys, "ensemble", tmp_path / "01.pt", ckpt, "--data", fewer)
    assert code == 2
    one_line_error(err, "other classes", "3 classes")


# 7. numbers in scientific notation -----------------------------------------------------

def test_scientific_notation_is_a_number(tmp_path):
    cfg = build_config({"optim": {"weight_decay": "5e-4"}}, ["optim.label_smoothing=1e-1", "schedule.peak_lr=2E0"])
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.label_smoothing == 0.1 and cfg.schedule.peak_lr == 2.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: fmnist-baseline\noptim:\n  weight_decay: 5e-4\n")
    from largebatch.recipes import load_recipe
    assert build_config(load_recipe(str(recipe))).optim.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="expected a number"):
        build_config({}, ["optim.weight_decay=lots"])


# 8-10. wrong answers and tracebacks --------------------------------------------------

def test_user_errors_are_one_line(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "run"
    cli_main(["train", *TINY, "--steps", "2", "--out", str(out)])
    ckpt = out / "checkpoints/last.pt"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  epochs: [1, 2\n")
    torch.save({"conv1.weight": torch.ones(1)}, tmp_path / "bare.pt")
    (tmp_path / "occupied").write_text("a file")
    truncated = tmp_path / "trunc"
    shutil.copytree(fmnist_dir, truncated)
    data = (truncated / "t10k-images-idx3-ubyte.gz").read_bytes()
    (truncated / "t10k-images-idx3-ubyte.gz").write_bytes(data[:len(data) // 2])
    cases = [
        (["eval", "--checkpoint", out / "config.yaml"], "not a readable checkpoint"),
        (["eval", "--checkpoint", out], "is a directory"),
        (["eval", "--checkpoint", tmp_path / "bare.pt"], "bare state_dict"),
        (["train", "--recipe", bad_yaml, "--out", tmp_path / "x"], "not valid YAML at line"),
        (["train", *TINY, "--steps", "1", "--data", truncated, "--out", tmp_path / "y"], "t10k-images-idx3-ubyte.gz"),
        (["train", *TINY, "--steps", "1", "--out", tmp_path / "occupied"], "occupied"),
        (["train", *TINY, "--steps", "1", "--data", tmp_path / "empty", "--set", "data.download=true",
          "--out", tmp_path / "z"], "could not fetch"),
    ]
    ckpt.write_bytes(ckpt.read_bytes()[:-50])
    cases.append((["eval", "--checkpoint", ckpt], "damaged"))
    import largebatch.data.fmnist as fm
    url = fm.URL
    fm.URL = "http://127.0.0.1:9/"  # nothing listens there: the download fails at once
    try:
        for args, fragment in cases:
            code, err = cli(capsys, *args)
            assert code == 2, (args, err)
            one_line_error(err, fragment)
    finally:
        fm.URL = url
    assert not list((tmp_path / "empty").glob("*.part"))


def test_eval_batch_must_be_positive(tmp_path, capsys):
    code, err = cli(capsys, "eval", "--checkpoint", tmp_path / "x.pt", "--batch", "-5")
    assert code == 2 and "must be positive" in err


def test_global_batch_smaller_than_the_processes_names_the_keys():
    with pytest.raises(ConfigError, match=r"global_batch \(1\) must be a multiple of the number of processes \(2\)"):
        resolve_layout(TrainConfig(global_batch=1), world_size=2, rank=0)


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """NCCL would refuse two ranks on one GPU only once all of them had started; the
    device choice says so first, with what to do."""
    from largebatch.dist import DistInfo
    from largebatch.errors import UserError
    from largebatch.train import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"2 processes on this host but 1 GPU\(s\).*--nproc_per_node 1.*CUDA_VISIBLE"):
        pick_device(DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2))
