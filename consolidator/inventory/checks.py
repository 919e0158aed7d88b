"""Checks of meaning: references, addresses, files and capacity.

They run on every section that parsed, even when others did not, so one run
reports everything. Sums used by the capacity checks only grow as more guests
parse, so a capacity error found on a subset is a true error.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hostfacts import HostFacts
from ..model import Fleet, GuestIntent, NicIntent, nic_address
from ..net.names import derive_mac
from ..units import human_size
from .schema import (BUILTIN_IMAGES, DNS_LABEL_RE, INSTANCE_RE, GuestSpec, HostSpec, ImageSpec,
                     MemorySpec, NetworkSpec, format_cpulist)

if TYPE_CHECKING:
    from .load import Reporter

EPS = 1e-9
NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
MIN_GUEST_MEMORY = 32 << 20


@dataclass
class Parsed:
    instance: Any
    host: HostSpec | None
    images: dict[str, ImageSpec | None]
    networks: dict[str, NetworkSpec | None]
    guests: dict[str, GuestSpec | None]


def _suggest(name: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"declared: {', '.join(sorted(choices))}" if choices else None


def run(rep: "Reporter", raw: dict[str, Any], p: Parsed, facts: HostFacts,
        base_dir: Path) -> Fleet | None:
    _names(rep, raw, p)
    images = dict(BUILTIN_IMAGES)
    images.update({n: s for n, s in p.images.items() if s is not None})
    for name, img in p.images.items():
        if img is not None:
            _image(rep, name, img, base_dir)
    for name, net in p.networks.items():
        if net is not None:
            _network(rep, name, net)
    _overlaps(rep, p.networks)
    instance = p.instance if isinstance(p.instance, str) and INSTANCE_RE.match(p.instance) else "cns"
    # paths are made absolute before guests take their images: the supervisor that runs
    # them does not share the CLI's working directory
    images = {n: _resolved_image(s, base_dir) for n, s in images.items()}
    intents = _guests(rep, raw, p, images, facts, instance)
    host = p.host
    if host is None:
        return None
    budget, usable = _capacity(rep, host, p.guests, facts)
    if rep.problems:
        return None
    return Fleet(instance=instance, host=host, budget=budget, usable_cpus=usable,
                 images=images,
                 networks={n: s for n, s in p.networks.items() if s is not None},
                 guests={i.name: i for i in intents})


# ------------------------------------------------------------------------- names

def _names(rep: "Reporter", raw: dict[str, Any], p: Parsed) -> None:
    inst = p.instance
    if isinstance(inst, str) and not INSTANCE_RE.match(inst):
        rep.value(("instance",), f"{inst!r} is not a valid instance name: 1 to 8 characters "
                  "of a-z and 0-9, starting with a letter",
                  "it prefixes interface names, which Linux limits to 15 bytes")
    elif inst is not None and not isinstance(inst, str):
        pass  # pydantic reported the type
    for section in ("images", "networks", "guests"):
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for name in entries:
            if not DNS_LABEL_RE.match(str(name)):
                fixed = re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")[:63]
                rep.key((section, name), f"{name!r} is not a DNS label: use 1 to 63 characters "
                        "of a-z, 0-9 and '-', not starting or ending with '-'",
                        f"try {fixed!r}" if fixed and DNS_LABEL_RE.match(fixed) else None)
    if p.host is not None and p.host.fabric_netns is not None \
            and not NETNS_RE.match(p.host.fabric_netns):
        rep.value(("host", "fabric_netns"), f"{p.host.fabric_netns!r} is not a usable netns "
                  "name: letters, digits, '_', '.', '-'")
    for gname, g in p.guests.items():
        if g is None:
            continue
        for key in g.labels:
            if not LABEL_KEY_RE.match(key):
                rep.key(("guests", gname, "labels", key), f"label key {key!r} must be 1 to 63 "
                        "characters of letters, digits, '.', '_', '/', '-'")


# ------------------------------------------------------------------------ images

def _disk_format(img: ImageSpec) -> str | None:
    if img.format:
        return img.format
    if img.disk:
        ext = os.path.splitext(img.disk)[1].lower()
        return {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}.get(ext)
    return None


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _resolved_image(img: ImageSpec, base_dir: Path) -> ImageSpec:
    """Paths made absolute and the disk format filled in, so the fleet does not depend on cwd."""
    upd: dict[str, Any] = {}
    for f in ("kernel", "initrd", "disk"):
        v = getattr(img, f)
        if v:
            upd[f] = str(_resolve(v, base_dir).resolve())
    if img.disk:
        upd["format"] = _disk_format(img)
    return img.model_copy(update=upd) if upd else img


def _image(rep: "Reporter", name: str, img: ImageSpec, base_dir: Path) -> None:
    loc = ("images", name)
    if not (img.builtin or img.kernel or img.disk):
        rep.key(loc, "an image needs one of builtin, kernel or disk",
                "for the built-in guest write: builtin: tiny")
    if img.initrd and img.builtin:
        rep.value(loc + ("initrd",), "a builtin image builds its own initrd; drop initrd")
    elif img.initrd and not img.kernel:
        rep.value(loc + ("initrd",), "initrd needs a kernel")
    if img.cmdline and not (img.kernel or img.builtin):
        rep.value(loc + ("cmdline",), "cmdline needs a kernel (or builtin)")
    if img.format and not img.disk:
        rep.value(loc + ("format",), "format applies only to a disk")
    if img.disk and _disk_format(img) is None:
        rep.value(loc + ("disk",), f"cannot tell the format of {img.disk!r}",
                  "add format: qcow2 or format: raw")
    for f in ("kernel", "initrd", "disk"):
        v = getattr(img, f)
        if not v:
            continue
        path = _resolve(v, base_dir)
        if not path.exists():
            rep.value(loc + (f,), f"no such file: {path}")
        elif not path.is_file():
            rep.value(loc + (f,), f"not a regular file: {path}")
        elif not os.access(path, os.R_OK):
            rep.value(loc + (f,), f"not readable: {path}")


# ---------------------------------------------------------------------- networks

def _network(rep: "Reporter", name: str, net: NetworkSpec) -> None:
    loc = ("networks", name)
    if net.subnet.prefixlen > 30:
        rep.value(loc + ("subnet",), f"{net.subnet} is too small: use a /30 or larger")
    if net.gateway:
        gw = ipaddress.ip_interface(net.gateway)
        _address_in(rep, loc + ("gateway",), gw, net)
    if net.nat and not net.gateway:
        rep.value(loc + ("nat",), "nat needs a gateway on the host side",
                  f"add gateway: {next(net.subnet.hosts(), '')}")


def _address_in(rep: "Reporter", loc: tuple, iface: ipaddress.IPv4Interface | Any,
                net: NetworkSpec) -> bool:
    ip = iface.ip
    if "/" in str(iface.with_prefixlen) and iface.network.prefixlen != net.subnet.prefixlen \
            and iface.network.prefixlen != 32:
        rep.value(loc, f"prefix /{iface.network.prefixlen} differs from the subnet's "
                  f"/{net.subnet.prefixlen}", f"write {ip} or {ip}/{net.subnet.prefixlen}")
        return False
    if ip not in net.subnet:
        rep.value(loc, f"{ip} is outside the subnet {net.subnet}")
        return False
    if ip == net.subnet.network_address:
        rep.value(loc, f"{ip} is the network address of {net.subnet}")
        return False
    if ip == net.subnet.broadcast_address:
        rep.value(loc, f"{ip} is the broadcast address of {net.subnet}")
        return False
    return True


def _overlaps(rep: "Reporter", nets: dict[str, NetworkSpec | None]) -> None:
    routed = [(n, s) for n, s in nets.items() if s is not None and s.gateway]
    for i, (n1, s1) in enumerate(routed):
        for n2, s2 in routed[:i]:
            if s1.subnet.overlaps(s2.subnet):
                rep.value(("networks", n1, "subnet"), f"{s1.subnet} overlaps network {n2!r} "
                          f"({s2.subnet}); both have a gateway on the host, so routing would be "
                          "ambiguous")


# ------------------------------------------------------------------------ guests

def _guests(rep: "Reporter", raw: dict[str, Any], p: Parsed, images: dict[str, ImageSpec],
            facts: HostFacts, instance: str) -> list[GuestIntent]:
    raw_images = set(raw.get("images", {}) or {}) | set(BUILTIN_IMAGES)
    raw_nets = set((raw.get("networks") or {}) if isinstance(raw.get("networks"), dict) else {})
    ips: dict[tuple[str, str], str] = {}
    macs: dict[str, str] = {}
    out: list[GuestIntent] = []
    for gname, g in p.guests.items():
        if g is None:
            continue
        loc = ("guests", gname)
        if g.image not in raw_images:
            rep.value(loc + ("image",), f"undeclared image {g.image!r}",
                      _suggest(g.image, sorted(raw_images)))
        _cpu(rep, loc, g, facts)
        mem = g.memory
        if mem.max < MIN_GUEST_MEMORY:
            rep.value(loc + ("memory", "max"), f"{human_size(mem.max)} is too little for a "
                      f"guest; the least is {human_size(MIN_GUEST_MEMORY)}")
        elif mem.max % (1 << 20):
            rep.value(loc + ("memory", "max"), f"{mem.max} bytes is not a whole number of MiB, "
                      "which QEMU needs")
        if mem.min is not None and mem.min > mem.max:
            rep.value(loc + ("memory", "min"), f"min {human_size(mem.min)} is more than max "
                      f"{human_size(mem.max)}")
        nics: list[NicIntent] = []
        for i, nic in enumerate(g.nics):
            nloc = loc + ("nics", i)
            net = p.networks.get(nic.network)
            if nic.network not in raw_nets:
                rep.value(nloc + ("network",), f"undeclared network {nic.network!r}",
                          _suggest(nic.network, sorted(raw_nets)))
            ip = None
            if nic.ip and net is not None:
                iface = ipaddress.ip_interface(nic.ip)
                if _address_in(rep, nloc + ("ip",), iface, net):
                    ip = str(iface.ip)
                    if net.gateway and iface.ip == ipaddress.ip_interface(net.gateway).ip:
                        rep.value(nloc + ("ip",), f"{ip} is the gateway of network "
                                  f"{nic.network!r}")
                    elif (nic.network, ip) in ips:
                        rep.value(nloc + ("ip",), f"{ip} is already used by "
                                  f"{ips[(nic.network, ip)]}")
                    else:
                        ips[(nic.network, ip)] = _dotted(nloc)
            mac = nic.mac or derive_mac(instance, gname, i)
            if nic.mac:
                first = int(mac[:2], 16)
                if first & 1:
                    rep.value(nloc + ("mac",), f"{mac} is a multicast MAC",
                              "clear the lowest bit of the first byte, e.g. 52:54:00:...")
                elif mac == "00:00:00:00:00:00":
                    rep.value(nloc + ("mac",), f"{mac} is not a usable MAC")
            if mac in macs:
                rep.value(nloc + ("mac",) if nic.mac else nloc,
                          f"MAC {mac} is already used by {macs[mac]}",
                          None if nic.mac else "set mac explicitly on one of them")
            else:
                macs[mac] = _dotted(nloc)
            if net is not None:
                nics.append(NicIntent(network=nic.network, mac=mac, ip=nic_address(ip),
                                      prefix=net.subnet.prefixlen,
                                      gateway=nic_address(net.gateway)))
        img = images.get(g.image)
        if img is not None:
            out.append(GuestIntent(
                name=gname, image=g.image, image_spec=img, vcpus=g.vcpus, cpu=g.cpu,
                memory=MemorySpec(max=mem.max, min=mem.max if mem.min is None else mem.min,
                                  shares=mem.shares),
                nics=tuple(nics), restart=g.restart, autostart=g.autostart, labels=g.labels))
    return out


def _dotted(loc: tuple) -> str:
    from .load import dotted
    return dotted(loc)


def _cpu(rep: "Reporter", loc: tuple, g: GuestSpec, facts: HostFacts) -> None:
    cpu = g.cpu
    if g.vcpus > facts.ncpus:
        rep.value(loc + ("vcpus",), f"{g.vcpus} vCPUs is more than this host's "
                  f"{facts.ncpus} CPUs", "vCPU threads beyond host CPUs only contend")
    if cpu.limit is not None and cpu.reserve > cpu.limit + EPS:
        rep.value(loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores is more than "
                  f"limit {cpu.limit:g}")
    if cpu.reserve > g.vcpus + EPS:
        rep.value(loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores is more than the "
                  f"guest's {g.vcpus} vCPUs can use")
    if cpu.limit is not None and cpu.limit > g.vcpus + EPS:
        rep.value(loc + ("cpu", "limit"), f"limit {cpu.limit:g} cores is more than the "
                  f"guest's {g.vcpus} vCPUs can use", f"raise vcpus or set limit <= {g.vcpus}")
    if cpu.pin:
        missing = [c for c in cpu.pin if c not in facts.cpus]
        if missing:
            rep.value(loc + ("cpu", "pin"), f"CPUs {format_cpulist(tuple(missing))} are not "
                      f"online here; this host has {format_cpulist(facts.cpus)}")
        elif cpu.reserve > len(cpu.pin) + EPS:
            rep.value(loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores does not fit in "
                      f"the {len(cpu.pin)} pinned CPUs")


# ---------------------------------------------------------------------- capacity

def _capacity(rep: "Reporter", host: HostSpec, guests: dict[str, GuestSpec | None],
              facts: HostFacts) -> tuple[int, float]:
    usable = facts.ncpus - host.reserve.cpus
    if usable <= EPS:
        rep.value(("host", "reserve", "cpus"), f"reserve {host.reserve.cpus:g} cores leaves "
                  f"nothing of this host's {facts.ncpus} CPUs for guests")
    room = facts.memory_total - host.reserve.memory
    if room <= 0:
        rep.value(("host", "reserve", "memory"), f"reserve {human_size(host.reserve.memory)} "
                  f"is all of this host's {human_size(facts.memory_total)}")
    if host.memory == "auto":
        budget = max(room, 0)
    else:
        budget = int(host.memory)
        if budget > room:
            rep.value(("host", "memory"), f"budget {human_size(budget)} is more than RAM "
                      f"{human_size(facts.memory_total)} minus reserve "
                      f"{human_size(host.reserve.memory)} = {human_size(max(room, 0))}")
    ok = [(n, g) for n, g in guests.items() if g is not None]

    def crossing(values: list[float], limit: float, loc_tail: tuple, message: str,
                 hint: str) -> None:
        """Report at the guest whose value first takes the running sum past ``limit``."""
        total = 0.0
        for (name, _), v in zip(ok, values):
            total += v
            if total > limit + EPS:
                rep.value(("guests", name) + loc_tail, message, hint)
                return

    u = max(usable, 0.0)
    reserves = [g.cpu.reserve for _, g in ok]
    crossing(reserves, usable, ("cpu", "reserve"),
             f"cpu reserves add up to {sum(reserves):g} cores, beyond the {u:g} usable "
             f"({facts.ncpus} host CPUs - {host.reserve.cpus:g} reserve)",
             "lower some cpu.reserve or host.reserve.cpus")
    mins = [float(g.memory.max if g.memory.min is None else g.memory.min) for _, g in ok]
    crossing(mins, budget, ("memory", "min"),
             f"memory minimums add up to {human_size(sum(mins))}, beyond the guest budget "
             f"{human_size(budget)}", "lower some memory.min (it defaults to max)")
    vcpus = [float(g.vcpus) for _, g in ok]
    ocpu = host.overcommit.cpus * u
    crossing(vcpus, ocpu, ("vcpus",),
             f"vCPUs add up to {sum(vcpus):g}, beyond overcommit {host.overcommit.cpus:g} x "
             f"{u:g} usable cores = {ocpu:g}", "raise host.overcommit.cpus or use fewer vCPUs")
    maxes = [float(g.memory.max) for _, g in ok]
    omem = host.overcommit.memory * budget
    crossing(maxes, omem, ("memory", "max"),
             f"memory maximums add up to {human_size(sum(maxes))}, beyond overcommit "
             f"{host.overcommit.memory:g} x budget {human_size(budget)} = {human_size(omem)}",
             "raise host.overcommit.memory or lower some memory.max")
    return budget, max(usable, 0.0)
