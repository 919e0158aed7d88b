"""DHCP and DNS for a network: one dnsmasq each, as libvirt runs them.

Where it listens:

- a network with a gateway: on its bridge in the fabric netns, at the gateway address;
- an isolated network: in a service netns of its own (``{inst}-{net}.dhcp``), joined to
  the bridge by a veth (``{inst}-{net}.d``), at the network's *service address* (its
  last usable address, which no guest may take). The host gets no address on it.

What it serves, all from the inventory:

- static leases only (``dhcp-range=...,static``): each NIC's MAC gets its declared
  address, and nothing else gets one;
- DNS: each guest's name and ``name.<network>`` for its address on that network, and,
  for a network with ``nat: true``, everything else forwarded to the host's resolvers
  (no forwarding elsewhere: an isolated network's guests learn nothing of the world);
- a default route only where there is a gateway.

The host table is on its command line (``--dhcp-host``, ``--host-record``): a change
restarts it, which costs guests nothing (their leases are static and last). dnsmasq
runs as the ``dnsmasq`` user (Debian's, else ``nobody``): it opens its sockets and its
lease file as root and drops to that user before it reads a packet. It stays in the
foreground as the supervisor's child, in a cgroup of the instance (:func:`cgroup_name`),
so a supervisor that starts finds and stops what an earlier one left, and ``destroy``
and ``gc`` remove it with the guests. Its leases and its log are in the state dir.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import linux
from ..inventory.derive import service_address
from ..inventory.schema import NetworkSpec
from . import names
from .netns import path as netns_path

LEASE_TIME = "1h"


@dataclass(frozen=True)
class Host:
    name: str
    mac: str
    ip: str


@dataclass(frozen=True)
class Service:
    """One network's dnsmasq: where it runs and what it serves (pure data)."""

    network: str
    netns: str | None            # the fabric netns (None: the root netns) or a service netns
    interface: str               # the bridge, or the service veth's inner end
    address: str                 # where guests find it (DHCP server, DNS)
    subnet: str
    gateway: str | None
    forward: bool                # DNS: forward unknown names to the host's resolvers
    hosts: tuple[Host, ...] = field(default=())


def service_netns(instance: str, network: str) -> str:
    return f"{instance}-{network}.dhcp"


def service_port(instance: str, network: str) -> str:
    """The fabric-side end of an isolated network's service veth (a bridge port)."""
    return names.fit(f"{instance}-", f"{network}.d")


SERVICE_PEER = "dhcp0"


def service(instance: str, fabric_netns: str | None, network: str, spec: NetworkSpec,
            hosts: list[Host]) -> Service:
    """Pure: the dnsmasq of ``network``."""
    isolated = not spec.gateway
    return Service(
        network=network,
        netns=service_netns(instance, network) if isolated else fabric_netns,
        interface=SERVICE_PEER if isolated else names.bridge(instance, network),
        address=service_address(spec), subnet=str(spec.subnet),
        gateway=None if isolated else service_address(spec), forward=spec.nat,
        hosts=tuple(sorted(hosts, key=lambda h: h.name)))


def run_user() -> str:
    for user in ("dnsmasq", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    return "nobody"


def argv(s: Service, leases: Path, binary: str = "dnsmasq") -> list[str]:
    """Pure: dnsmasq's command line for ``s``, its lease file ``leases``."""
    net = ipaddress.ip_network(s.subnet)
    a = [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
         f"--user={run_user()}", "--group=nogroup",
         f"--interface={s.interface}", "--bind-interfaces", "--except-interface=lo",
         f"--listen-address={s.address}",
         f"--dhcp-range={net.network_address},static,{net.netmask},{LEASE_TIME}",
         f"--dhcp-leasefile={leases}", "--dhcp-authoritative",
         f"--domain={s.network}", f"--local=/{s.network}/", "--domain-needed",
         "--bogus-priv", "--no-hosts", "--log-facility=-", "--log-dhcp",
         f"--dhcp-option=option:dns-server,{s.address}"]
    if s.gateway:
        a.append(f"--dhcp-option=option:router,{s.gateway}")
    else:
        a.append("--dhcp-option=option:router")       # none: no default route
    a += ["--resolv-file=/etc/resolv.conf"] if s.forward else ["--no-resolv"]
    for h in s.hosts:
        a += [f"--dhcp-host={h.mac},{h.ip},{h.name},infinite",
              f"--host-record={h.name}.{s.network},{h.name},{h.ip}"]
    return a


def cgroup_name(network: str) -> str:
    """The cgroup (in the instance's ``guests/`` tree) a network's dnsmasq runs in: a dot
    no guest name can hold, so it never collides with a guest. Being in the instance's
    tree is what lets ``destroy``, ``gc`` and a new supervisor find it: dnsmasq drops to
    its own user, which clears ``PR_SET_PDEATHSIG``, so it outlives a supervisor that
    dies."""
    return f"dhcp.{network}"


def spawn(s: Service, leases: Path, log: Path, procs: list[Path]) -> subprocess.Popen[bytes]:
    """Start dnsmasq for ``s`` in its netns and in the cgroup whose ``cgroup.procs``
    files are ``procs``, logging to ``log``. Blocking (short)."""
    binary = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if binary is None:
        raise FileNotFoundError("dnsmasq is not installed (apt-get install dnsmasq-base)")
    target = os.open(netns_path(s.netns), os.O_RDONLY | os.O_CLOEXEC)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                  0o600)
    groups = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in procs]

    def enter() -> None:              # in the child, before exec: syscalls only
        for fd in groups:
            os.write(fd, b"0")
        linux.setns(target, linux.CLONE_NEWNET)
        # cleared again when dnsmasq drops to its user; until then it holds
        linux.parent_death_signal(signal.SIGTERM)

    try:
        return subprocess.Popen(argv(s, leases, binary), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, preexec_fn=enter, close_fds=True)
    finally:
        for fd in [target, out, *groups]:
            os.close(fd)
