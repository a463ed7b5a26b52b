"""Several hosts for real: network namespaces on a bridge (largebatch.cluster), each
with its own interface and address, and the launchers users run across nodes."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from largebatch import checkpoint, netif
from largebatch.cluster import write_hosts_script
from largebatch.config import ConfigError

from conftest import ROOT, run_cli
from test_train import TINY

ARGS = [*TINY, "--steps", "4", "--set", "dist.exact_reduction=true", "--set", "data.eval_samples=200"]


def same_weights(a, b):
    one, two = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    return all(torch.equal(one[k], two[k]) for k in one)


def test_interface_choice_follows_the_route_and_yields_to_the_user(monkeypatch):
    for var in netif.ENV:
        monkeypatch.delenv(var, raising=False)
    one_host = netif.choose("127.0.0.1", 29500, "auto")
    assert one_host["interface"] is None and "loopback" in one_host["chosen_by"]
    assert netif.choose("127.0.0.1", 29500, "lo")["interface"] == "lo"
    with pytest.raises(ConfigError, match="dist.interface: no interface 'nosuch0'"):
        netif.choose("127.0.0.1", 29500, "nosuch0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert netif.choose("127.0.0.1", 29500, "auto") == {"interface": "eth7",
                                                        "chosen_by": "GLOO_SOCKET_IFNAME set in the environment"}


def test_unreachable_rendezvous_host_is_one_line_in_bounded_time(tmp_path):
    """A process that is not rank 0 and finds nobody at MASTER_ADDR:MASTER_PORT."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29593"}
    t0 = time.time()
    proc = run_cli("train", *ARGS, "--set", "dist.connect_timeout_s=3", "--out", tmp_path / "r", env=env,
                   check=False, timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 60
    assert "cannot reach the rendezvous host 127.0.0.1:29593 within 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the same process told it is one of two hosts: a loopback MASTER_ADDR cannot be right
    proc = run_cli("train", *ARGS, "--out", tmp_path / "r", check=False,
                   env={**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "localhost"})
    assert proc.returncode == 2 and "MASTER_ADDR is localhost, a loopback address" in proc.stderr
    assert "--local-addr" in proc.stderr and "Traceback" not in proc.stderr


def torchrun_on(cluster, host: int, rdzv: str, out, port: int, extra=()) -> list[str]:
    master = cluster.hosts[0].address
    if rdzv == "static":
        launch = ["--node_rank", str(host), "--master_addr", master, "--master_port", str(port)]
    else:
        # torchrun decides which agent hosts the c10d store by matching the endpoint against
        # the addresses its host name resolves to, and hands the workers the rank-0 host's
        # name as MASTER_ADDR; with the host name resolving to 127.0.0.1 (as here, and in
        # many containers) both go wrong, so each host states its address (docs/launching.md).
        launch = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", "t",
                  "--rdzv_conf", f"is_host={str(host == 0).lower()}", "--local-addr", cluster.hosts[host].address]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *launch,
            *extra, "-m", "largebatch", "train", *ARGS, "--out", str(out)]


@pytest.mark.cluster
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_across_two_hosts_picks_the_interface_and_matches_one_process(tmp_path, fmnist_dir, cluster, rdzv):
    """Both hosts' names resolve to 127.0.0.1 (the namespaces share the machine's host
    name): without the interface choice, gloo advertises that and the run dies in
    connectFullMesh."""
    c = cluster(2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in netif.ENV:
        env.pop(var, None)
    procs = [c.run(h, torchrun_on(c, h, rdzv, tmp_path / "two", 29511), cwd=ROOT, env=env, text=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for h in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    network = json.loads((tmp_path / "two/run.json").read_text())["network"]
    assert network["interface"] == "eth0" and network["address"] in {h.address for h in c.hosts}
    run_cli("train", *ARGS, "--out", tmp_path / "one")
    assert same_weights(tmp_path / "one/checkpoints/last.pt", tmp_path / "two/checkpoints/last.pt")


def need(tool: str) -> None:
    if not shutil.which(tool):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host tests: {tool} is missing (make install adds it)")
        pytest.skip(f"{tool} not installed")


@pytest.mark.cluster
def test_mpirun_across_two_hosts_matches_one_process(tmp_path, fmnist_dir, cluster):
    """Open MPI starts one process per host (its remote agent enters the host's namespace);
    MASTER_ADDR is exported as docs/launching.md says, the interface is chosen."""
    need("mpirun")
    c = cluster(2)
    agent = write_hosts_script(c, tmp_path / "agent.sh")
    subnet = c.hosts[0].address.rsplit(".", 1)[0] + ".0/24"
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "--host", ",".join(f"{h.address}:1" for h in c.hosts),
           "--mca", "plm_rsh_agent", str(agent), "--mca", "oob_tcp_if_include", subnet,
           # Open MPI 4.1's remote daemon once crashed exporting the hwloc topology through
           # shared memory (hwloc_shmem_topology_write); nothing here needs that component
           "--mca", "rtc", "^hwloc",
           "-x", f"MASTER_ADDR={c.hosts[0].address}", "-x", "MASTER_PORT=29533", "-x", "OMP_NUM_THREADS=1",
           "-x", "PATH", "--wdir", str(ROOT),
           sys.executable, "-m", "largebatch", "train", *ARGS, "--out", str(tmp_path / "two")]
    env = {k: v for k, v in os.environ.items() if k not in netif.ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "two/run.json").read_text())
    assert run["processes"] == 2 and run["network"]["interface"] == "eth0"
    run_cli("train", *ARGS, "--out", tmp_path / "one")
    assert same_weights(tmp_path / "one/checkpoints/last.pt", tmp_path / "two/checkpoints/last.pt")


@pytest.mark.cluster
def test_slurm_job_on_two_hosts_checkpoints_before_its_time_limit_and_requeues_to_the_end(tmp_path, fmnist_dir,
                                                                                          cluster):
    """A real Slurm (slurmctld here, a slurmd in each host's namespace) runs the sbatch
    script `largebatch slurm` writes: srun starts one process per host, SIGUSR1 comes 40 s
    before the time limit, the run checkpoints and exits 138, the script requeues the job,
    and the second start resumes and finishes, equal to one process throughout."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
        need(tool)
    from largebatch.cluster import Slurm
    c = cluster(2)
    out, script = tmp_path / "run", tmp_path / "job.sh"
    # A 1-minute limit: slurmctld checks limits about every 30 s, so SIGUSR1 comes 20-50 s
    # after the start; 900 steps take longer than that here, so the first start is stopped.
    args = [a if a != "4" else "900" for a in ARGS]
    run_cli("slurm", "--nodes", "2", "--procs-per-node", "1", "--threads", "1", "--time", "1",
            "--signal-seconds", "40", "--python", sys.executable, "--out", out, "--write", script, "--", *args)
    with Slurm(c, tmp_path / "slurm") as slurm:
        job = slurm.sbatch(script, cwd=ROOT)
        deadline, info = time.time() + 480, {}
        while time.time() < deadline:
            info = slurm.job(job)
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) > 0 and info["TimeLimit"] != "00:10:00" \
                    and slurm.idle():
                # requeued: the second start gets the time to finish, as soon as the first
                # has been cleaned up on both nodes (Slurm alone would hold it 2 minutes)
                slurm.update(job, TimeLimit=10, StartTime="now")
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            time.sleep(1)
    logs = "".join(p.read_text(errors="replace") for p in out.glob("slurm-*.out"))
    keys = ("JobState", "Reason", "ExitCode", "Restarts", "TimeLimit", "RunTime")
    ctld = (tmp_path / "slurm/slurmctld.log").read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED" and int(info["Restarts"]) >= 1, \
        ({k: info.get(k) for k in keys}, logs[-2000:], ctld[-2000:])
    assert "largebatch: signal 10: checkpoint at step" in logs
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["resumed_from_step"] > 0 and run["network"]["interface"] == "eth0"
    run_cli("train", *args, "--out", tmp_path / "one")
    assert same_weights(tmp_path / "one/checkpoints/last.pt", out / "checkpoints/last.pt")


@pytest.mark.cluster
def test_losing_a_host_resumes_on_the_rest_and_ends_identical(tmp_path, fmnist_dir, cluster):
    """Every process of host 1 killed at once after step 40. With the settings
    docs/launching.md recommends (c10d rendezvous, --nnodes 1:2, --max-restarts, --resume,
    periodic checkpoints) host 0's agent restarts its worker, which resumes from the newest
    checkpoint alone (the accumulation takes the lost process's share) and finishes with the
    weights of an uninterrupted one-process run."""
    c = cluster(2)
    out = tmp_path / "two"
    args = [a if a != "4" else "200" for a in ARGS] + ["--set", "train.checkpoint_every_steps=20", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    master = c.hosts[0].address

    def torchrun(h: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:29520", "--rdzv_id", "lose",
                "--rdzv_conf", f"is_host={str(h == 0).lower()}", "--local-addr", c.hosts[h].address,
                "--max-restarts", "3", "-m", "largebatch", "train", *args, "--out", str(out)]

    procs = [c.run(h, torchrun(h), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for h in range(2)]
    deadline = time.time() + 240
    while not any(int(p.stem.split("-")[1]) >= 40 for p in (out / "checkpoints").glob("step-*.pt")):
        assert time.time() < deadline and procs[0].poll() is None, "no checkpoint at step 40"
        time.sleep(0.2)
    c.kill_host(1)
    log = procs[0].communicate(timeout=400)[0]
    assert procs[0].returncode == 0, log[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 1 and run["resumed_from_step"] >= 40
    run_cli("train", *[a for a in args if a != "--resume"], "--out", tmp_path / "one")
    assert same_weights(tmp_path / "one/checkpoints/last.pt", out / "checkpoints/last.pt")
