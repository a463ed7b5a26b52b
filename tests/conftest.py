import os

# The suite runs in parallel (pytest -n auto, one worker per core): a run trained inside a
# worker keeps to one thread, as the subprocess runs do, so that no two OpenMP teams share
# a core (they would spin against each other at every barrier, 10x slower).
os.environ["OMP_NUM_THREADS"] = "1"

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import torch

from largebatch.data import fmnist

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
# bf16 timings (autotune) of the tests' runs stay out of the user's cache
os.environ.setdefault("LARGEBATCH_CACHE", tempfile.mkdtemp(prefix="largebatch-cache-"))


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    root = fmnist.resolve_dir(None)
    if not (root / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST missing from {root}: CI must install dataset-fashion-mnist")
        pytest.skip(f"Fashion-MNIST not installed in {root} (apt-get install dataset-fashion-mnist)")
    return root


def run_cli(*args, env=None, nproc=1, check=True, timeout=600):
    """Run `largebatch ARGS` in a subprocess (under torchrun when nproc > 1)."""
    base = [sys.executable, "-m"]
    if nproc > 1:
        base += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(base + ["largebatch", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"largebatch {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a directory on a tmpfs of that size (a disk that fills up)."""
    mounts = []

    def make(size: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def cluster():
    """cluster(hosts, rate=None) -> a running largebatch.cluster.Cluster, torn down after
    the test. Skipped where namespaces cannot be made (not root); CI must make them."""
    from largebatch.cluster import Cluster, available
    reason = available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host tests, but a cluster cannot be made here: {reason}")
        pytest.skip(f"no cluster of namespaces here: {reason}")
    made = []

    def make(hosts: int, rate: str | None = None):
        made.append(Cluster(hosts, rate=rate).__enter__())
        return made[-1]

    yield make
    for c in made:
        c.close()
