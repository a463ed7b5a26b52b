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
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


class ClusterError(UserError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args]
    return _checked(cmd) if check else subprocess.run(cmd, capture_output=True, text=True)


def _checked(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"cluster: `{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


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
class Cluster:
    """`hosts` namespaces on one bridge. `rate` shapes every host's link in both
    directions (tc tbf: "1gbit", "10gbit"); None leaves the veth links unshaped."""
    hosts_wanted: int
    rate: str | None = None
    name: str = field(default_factory=lambda: f"lb{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    gateway: str = ""     # the bridge's address: the machine itself, as seen from the hosts
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> "Cluster":
        if not 1 <= self.hosts_wanted <= 16:
            raise ClusterError(f"cluster: 1 to 16 hosts, not {self.hosts_wanted}")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
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
        """`cmd` as run on host `index`."""
        return ["ip", "netns", "exec", self.hosts[index].netns, *cmd]

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
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
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
              'exec ip netns exec "$ns" sh -c "$*"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
