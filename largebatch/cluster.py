"""A small real cluster on one Linux machine: N hosts as network namespaces, each with
its own interface and address on a private bridge, optionally with shaped links.

Used by the multi-host tests and the scaling benchmarks, and by anyone who wants to try a
multi-node launch (torchrun across nodes, mpirun, srun) before booking a machine:

    with Cluster(2, rate="1gbit") as c:
        c.run(0, ["torchrun", "--nnodes", "2", "--node_rank", "0", ...])

Needs root (iproute2, and tc for shaping). It creates only what it names (a bridge, veth
pairs, namespaces, a 10.213.X.0/24 subnet no interface on this machine uses), routes
nothing off the bridge, and removes all of it on exit, after a failure too. Link shaping
uses tc's token-bucket filter in both directions of each host's link.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


class ClusterError(UserError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args]
    return _checked(cmd) if check else subprocess.run(cmd, capture_output=True, text=True)


def _checked(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise ClusterError(f"cluster: `{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _stop(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """End a process started in its own session, and its children: SIGTERM and up to
    `grace` seconds to exit, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        if grace:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _running(name: str) -> bool:
    """A process of this name is alive on the machine (every host shares its process table)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                return True
        except OSError:  # the process ended while we looked
            pass
    return False


class _TornDown:
    """Set up on entry (`_open`), torn down on exit (`close`), and also when the set-up
    fails half-way, so that nothing it made is left behind."""

    def __enter__(self):
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available() -> str | None:
    """None when a cluster can be made here, else why not (tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2 (the `ip` command)"
    probe = f"lbprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = _checked(["ip", "-o", "-4", "addr", "show"]).stdout
    for x in range(1, 255):
        net = ipaddress.IPv4Network(f"10.213.{x}.0/24")
        if f" 10.213.{x}." not in used:
            return net
    raise ClusterError("cluster: no free 10.213.X.0/24 subnet on this machine")


@dataclass
class Host:
    index: int
    netns: str
    address: str          # this host's address on the bridge
    outer: str            # the veth end on the machine, attached to the bridge
    interface: str = "eth0"  # the veth end inside the namespace


@dataclass
class Cluster(_TornDown):
    """`hosts` namespaces on one bridge. `rate` shapes every host's link in both
    directions (tc tbf: "1gbit", "10gbit"); None leaves the veth links unshaped."""
    hosts_wanted: int
    rate: str | None = None
    name: str = field(default_factory=lambda: f"lb{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    gateway: str = ""     # the bridge's address: the machine itself, as seen from the hosts
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def _open(self) -> None:
        if not 1 <= self.hosts_wanted <= 16:
            raise ClusterError(f"cluster: 1 to 16 hosts, not {self.hosts_wanted}")
        net = _free_subnet()
        addrs = list(net.hosts())
        self.bridge, self.gateway = f"{self.name}br", str(addrs[0])
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.hosts_wanted):
            host = Host(i, f"{self.name}-h{i}", str(addrs[i + 1]), f"{self.name}h{i}")
            self.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.outer, "type", "veth", "peer", "name", host.interface, "netns", host.netns)
            _ip("link", "set", host.outer, "master", self.bridge)
            _ip("link", "set", host.outer, "up")
            inside = ["netns", "exec", host.netns, "ip"]
            _ip(*inside, "addr", "add", f"{host.address}/{net.prefixlen}", "dev", host.interface)
            _ip(*inside, "link", "set", host.interface, "up")
            _ip(*inside, "link", "set", "lo", "up")
            if self.rate:
                self.shape(host, self.rate)

    def shape(self, host: Host, rate: str) -> None:
        """Token-bucket shaping of the host's link, both ways (netem is not needed)."""
        for prefix, dev in (([], host.outer), (["ip", "netns", "exec", host.netns], host.interface)):
            _checked([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                      "burst", "256kb", "latency", "50ms"])

    def command(self, index: int, cmd: list[str]) -> list[str]:
        """`cmd` as run on host `index`: in its network namespace only (`ip netns exec`
        would also remount /sys, hiding the cgroup hierarchy slurmd needs)."""
        return ["nsenter", f"--net=/run/netns/{self.hosts[index].netns}", "--", *cmd]

    def run(self, index: int, cmd: list[str], **popen) -> subprocess.Popen:
        """Start `cmd` on host `index` (in its own process group, killed at close)."""
        proc = subprocess.Popen(self.command(index, cmd), start_new_session=True, **popen)
        self._procs.append(proc)
        return proc

    def kill_host(self, index: int) -> None:
        """Every process started on host `index` by this cluster, at once (a lost node)."""
        ns = self.hosts[index].netns
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for proc in self._procs:
            _stop(proc)
        for host in self.hosts:
            self.kill_host(host.index)
            _ip("link", "del", host.outer, check=False)
            _ip("netns", "del", host.netns, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        self.hosts, self._procs, self.bridge = [], [], ""


def write_hosts_script(cluster: Cluster, path: Path) -> Path:
    """An rsh-style agent (`AGENT HOST CMD...` runs CMD on HOST) for mpirun's
    `--mca plm_rsh_agent`: it maps the host's address to its namespace."""
    lines = ["#!/bin/sh", "host=$1; shift", 'case "$host" in']
    lines += [f"  {h.address}) ns={h.netns} ;;" for h in cluster.hosts]
    lines += ['  *) echo "no cluster host $host" >&2; exit 1 ;;', "esac",
              'exec nsenter --net=/run/netns/"$ns" -- sh -c "$*"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


HOSTS_FILE = Path("/etc/hosts")


class Slurm(_TornDown):
    """A real Slurm on a Cluster: slurmctld on this machine (at the bridge address), one
    slurmd per host namespace (`slurmd -N`), munge for authentication, no accounting and
    no cgroups. The hosts' node names are added to /etc/hosts (as a site's DNS would give
    them) and removed at the end. Jobs are submitted with `sbatch(script)`; every Slurm
    command sees this cluster through SLURM_CONF (`env`)."""

    def __init__(self, cluster: Cluster, workdir: Path, cpus_per_node: int = 2):
        self.cluster, self.dir, self.cpus = cluster, Path(workdir), cpus_per_node
        self.nodes = [f"{cluster.name}n{h.index}" for h in cluster.hosts]
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []
        self._marker = f"# largebatch cluster {cluster.name}"

    def _open(self) -> None:
        for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
            if not shutil.which(tool):
                raise ClusterError(f"cluster: {tool} not found (apt-get install slurm-wlm munge)")
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.dir / "spool" / n).mkdir(parents=True, exist_ok=True)
        d = self.dir
        lines = [f"ClusterName={self.cluster.name}", f"SlurmctldHost={socket.gethostname()}({self.cluster.gateway})",
                 "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
                 f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
                 f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
                 f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
                 "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
                 "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
                 "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
                 "ReturnToService=2", "MinJobAge=600", "SlurmctldTimeout=30", "SlurmdTimeout=30",
                 "InactiveLimit=0", "KillWait=10", "JobRequeue=1", "MailProg=/bin/true"]
        lines += [f"NodeName={n} NodeAddr={h.address} CPUs={self.cpus} State=UNKNOWN"
                  for n, h in zip(self.nodes, self.cluster.hosts)]
        lines.append(f"PartitionName=main Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        with HOSTS_FILE.open("a") as f:
            f.writelines(f"{h.address} {n} {self._marker}\n" for n, h in zip(self.nodes, self.cluster.hosts))
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            _checked(["/etc/init.d/munge", "start"])  # the system's munged, left running
        log = open(d / "daemons.log", "a")
        self._daemons.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], stdout=log,
                                              stderr=log, start_new_session=True))
        for n, h in zip(self.nodes, self.cluster.hosts):
            self._daemons.append(self.cluster.run(h.index, ["slurmd", "-D", "-N", n, "-f", str(self.conf)],
                                                  stdout=log, stderr=log, env=self.env))
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.idle():
                return
            time.sleep(1)
        raise ClusterError(f"cluster: the Slurm nodes did not come up in 60 s; see {d}/slurmctld.log and "
                           f"{d}/slurmd-*.log")

    def sbatch(self, script: Path, cwd: Path | None = None) -> int:
        out = _checked(["sbatch", "--parsable", str(script)], self.env, cwd).stdout
        return int(out.strip().split(";")[0])

    def update(self, job_id: int, **fields) -> None:
        """`scontrol update JobId=ID KEY=VALUE ...` (TimeLimit, StartTime, ...)."""
        _checked(["scontrol", "update", f"JobId={job_id}", *(f"{k}={v}" for k, v in fields.items())], self.env)

    def idle(self) -> bool:
        """Every node idle and no job step left on any: sinfo reports a node idle while the
        slurmstepd of a step it has killed may still be winding down for seconds, and a job
        started on the node before it is gone can fail to launch."""
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                env=self.env).stdout.split()
        return len(states) == len(self.nodes) and all(s == "idle" for s in states) and not _running("slurmstepd")

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              env=self.env).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def close(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=self.env)
        for proc in reversed(self._daemons):
            _stop(proc, grace=10)  # slurmctld saves its state on SIGTERM
        self._daemons = []
        if HOSTS_FILE.exists():
            kept = [line for line in HOSTS_FILE.read_text().splitlines(keepends=True) if self._marker not in line]
            HOSTS_FILE.write_text("".join(kept))

