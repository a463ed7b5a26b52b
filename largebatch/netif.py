"""Which network interface the collectives use.

gloo (and NCCL's socket transport) advertise the address their host name resolves to.
On many clusters, and in containers, that is 127.0.0.1 or an interface the other hosts
cannot reach, and the first collective dies with `Connection refused` from a peer. The
interface that reaches the rendezvous host is the one every peer can reach back (they all
dial the same host), so that is the one chosen, unless the user has named one.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

SIOCGIFADDR = 0x8915
ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one (Linux ioctl; no extra package)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out[name] = socket.inet_ntoa(raw[20:24])
    return out


def route_source(host: str, port: int) -> str:
    """The local address the kernel would send from to reach host:port (a UDP
    connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:
        return False


def choose(master_addr: str, master_port: int, override: str) -> dict:
    """The interface for the collectives, and why. `override`: "auto" or an interface
    name. A variable the user exported (GLOO_SOCKET_IFNAME) wins over both."""
    for var in ENV:
        if os.environ.get(var):
            return {"interface": os.environ[var], "chosen_by": f"{var} set in the environment"}
    addresses = interface_addresses()
    if override != "auto":
        if override not in addresses:
            from .config import ConfigError
            raise ConfigError(f"dist.interface: no interface {override!r} with an IPv4 address on "
                              f"{socket.gethostname()} (have: {', '.join(sorted(addresses)) or 'none'})")
        return {"interface": override, "address": addresses[override], "chosen_by": "dist.interface"}
    try:
        target = socket.gethostbyname(master_addr)
        source = route_source(target, master_port)
    except OSError as e:
        return {"interface": None, "chosen_by": f"none: cannot route to {master_addr} ({e.strerror or e})"}
    if ipaddress.ip_address(source).is_loopback:
        return {"interface": None, "chosen_by": f"none: the rendezvous host {master_addr} is this machine's "
                                                f"loopback (one host)"}
    name = next((n for n, a in addresses.items() if a == source), None)
    return {"interface": name, "address": source,
            "chosen_by": f"the route to the rendezvous host {master_addr} ({target})"}


def apply(choice: dict) -> None:
    """Tell gloo and NCCL, for this process and the ones it starts."""
    if choice.get("interface"):
        for var in ENV:
            os.environ.setdefault(var, choice["interface"])
