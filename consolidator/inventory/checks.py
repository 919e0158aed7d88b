"""Checks of meaning: names, references, addresses, files and capacity.

They run on every section that parsed, even when others did not, so one run reports
everything. Sums used by the capacity checks only grow as more guests parse, so a
capacity error found on a subset is a true error. Each rule reports under its code
(:mod:`.codes`). The checks only find problems; the fleet is built from the values
they checked by :func:`consolidator.model.resolve`, with the same helpers (:mod:`.derive`).
"""

from __future__ import annotations

import difflib
import grp
import contextlib
import json
import ipaddress
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import osinfo
from ..hostfacts import HostFacts
from ..units import format_rate, human_rate, human_size
from .derive import budget as derive_budget
from .derive import (derive_mac, disk_format, firmware_boot, guest_devices, image_roots,
                     memory_room, os_defaults, resolve_path, service_address, template_path,
                     usable_cpus, user_data_text)
from .files import disk_problems, inside, regular_file
from .reporter import Reporter, dotted
from .schema import (BUILTIN_IMAGES, DNS_LABEL_RE, INSTANCE_RE, DiskIo, GuestSpec, HostSpec,
                     ImageSpec, NetworkSpec, format_cpulist)

EPS = 1e-9
NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CGROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")
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


def run(rep: Reporter, raw: dict[str, Any], p: Parsed, facts: HostFacts,
        base_dir: Path, state_dir: Path | None = None) -> None:
    _names(rep, raw, p)
    roots = image_roots(p.host or HostSpec(), base_dir, state_dir)
    for name, img in p.images.items():
        if img is not None:
            _image(rep, name, img, base_dir, roots)
        if img is not None and img.from_:
            _clone(rep, name, img.from_, p, state_dir)
    for name, net in p.networks.items():
        if net is not None:
            _network(rep, name, net)
    _overlaps(rep, p.networks)
    _forwarding(rep, p.networks)
    instance = p.instance if isinstance(p.instance, str) and INSTANCE_RE.match(p.instance) \
        else "cns"
    _guests(rep, raw, p, facts, instance, base_dir, roots)
    if p.host is not None:
        _capacity(rep, p.host, p.guests, facts)


# ------------------------------------------------------------------------- names

def _names(rep: Reporter, raw: dict[str, Any], p: Parsed) -> None:
    inst = p.instance
    if isinstance(inst, str) and not INSTANCE_RE.match(inst):
        rep.value("N001", ("instance",), f"{inst!r} is not a valid instance name: 1 to 8 "
                  "characters of a-z and 0-9, starting with a letter",
                  "it prefixes interface names, which Linux limits to 15 bytes")
    for section in ("images", "networks", "guests"):
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for name in entries:
            if not DNS_LABEL_RE.match(str(name)):
                fixed = re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")[:63]
                rep.key("N002", (section, name), f"{name!r} is not a DNS label: use 1 to 63 "
                        "characters of a-z, 0-9 and '-', not starting or ending with '-'",
                        f"try {fixed!r}" if fixed and DNS_LABEL_RE.match(fixed) else None)
    if p.host is not None and p.host.fabric_netns is not None \
            and (not NETNS_RE.match(p.host.fabric_netns) or
                 p.host.fabric_netns in (".", "..")):
        rep.value("N003", ("host", "fabric_netns"), f"{p.host.fabric_netns!r} is not a usable "
                  "netns name: letters, digits, '_', '.', '-', and not '.' or '..'")
    metrics = p.host.metrics if p.host is not None else None
    if metrics is not None and metrics.enabled and not metrics.public and \
            not ipaddress.ip_address(metrics.listen.rpartition(":")[0].strip("[]")).is_loopback:
        rep.value("H001", ("host", "metrics", "listen"), f"{metrics.listen} is not a loopback "
                  "address", "say host.metrics.public: true to serve the figures there")
    group = p.host.api_group if p.host is not None else None
    if group is not None and not _known(grp.getgrnam, group):
        rep.value("H002", ("host", "api_group"), f"no group {group!r} on this host",
                  f"groupadd {group}, or leave api_group out (root only)")
    ids = p.host.guest_ids if p.host is not None else None
    if ids is not None and ids.first + ids.count > 0xFFFFFFFF:
        rep.value("H003", ("host", "guest_ids", "count"), f"the range {ids.first} + "
                  f"{ids.count} runs past uid 4294967294", "lower first or count")
    runas = p.host.runas if p.host is not None else None
    if runas is not None and not _known(pwd.getpwnam, runas):
        rep.value("H004", ("host", "runas"), f"no user {runas!r} on this host",
                  f"useradd --system {runas}, or leave runas out (a uid per guest)")
    bdir = p.host.backup.dir if p.host is not None else None
    if bdir is not None and (not os.path.isabs(bdir) or "\0" in bdir):
        rep.value("H005", ("host", "backup", "dir"), f"{bdir!r} is not an absolute path",
                  "name the backup directory from /, e.g. /srv/backups/consolidator")
    parent = p.host.cgroup_parent if p.host is not None else None
    if parent is not None and not cgroup_parent_ok(parent):
        rep.value("N005", ("host", "cgroup_parent"), f"{parent!r} must be a relative path of "
                  "cgroup names (no '..', '.', empty parts or leading '/')",
                  "it is taken below the supervisor's own cgroup, e.g. machines/consolidator")
    for gname, g in p.guests.items():
        if g is None:
            continue
        for key in g.labels:
            if not LABEL_KEY_RE.match(key):
                rep.key("N004", ("guests", gname, "labels", key), f"label key {key!r} must be "
                        "1 to 63 characters of letters, digits, '.', '_', '/', '-'")


def _known(lookup: Callable[[str], object], name: str) -> bool:
    """Whether the host's user or group database has ``name``."""
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def cgroup_parent_ok(parent: str) -> bool:
    parts = parent.split("/")
    return all(CGROUP_NAME_RE.match(x) and x not in (".", "..") for x in parts)


# ------------------------------------------------------------------------ images

def reserved_param(token: str, builtin: bool) -> bool:
    """A kernel parameter the supervisor sets itself: every ``consolidator.*`` one, and on
    the builtin image ``console=`` (its READY line must reach ttyS0)."""
    key = token.split("=", 1)[0]
    return key.startswith("consolidator.") or (builtin and key == "console")


def _image(rep: Reporter, name: str, img: ImageSpec, base_dir: Path,
           roots: tuple[str, ...]) -> None:
    loc = ("images", name)
    if img.from_:
        given = [k for k in ("builtin", "kernel", "initrd", "cmdline", "disk", "format",
                             "cdrom") if getattr(img, k)]
        if given:
            rep.value("I018", loc + (given[0],), f"{given[0]} with from: an image of a guest's "
                      "disk boots as that guest did", "leave only from (and os, firmware)")
        return
    if not (img.builtin or img.kernel or img.disk or img.cdrom):
        rep.key("I001", loc, "an image needs one of builtin, kernel, disk or cdrom",
                "for the built-in guest write: builtin: tiny")
    if img.firmware and (img.builtin or img.kernel):
        rep.value("I014", loc + ("firmware",), "firmware applies to a disk or cdrom boot; "
                  "this image's kernel is loaded by QEMU")
    if img.os:
        _os(rep, loc + ("os",), img.os)
    if img.initrd and img.builtin:
        rep.value("I002", loc + ("initrd",), "a builtin image builds its own initrd; drop initrd")
    elif img.initrd and not img.kernel:
        rep.value("I003", loc + ("initrd",), "initrd needs a kernel")
    if img.cmdline and not (img.kernel or img.builtin):
        rep.value("I004", loc + ("cmdline",), "cmdline needs a kernel (or builtin)")
    owned = [t for t in (img.cmdline or "").split() if reserved_param(t, bool(img.builtin))]
    if owned:
        rep.value("I010", loc + ("cmdline",), f"{', '.join(owned)}: set by the supervisor, "
                  "not the inventory", "consolidator.* parameters come from the guest's "
                  "entry (name, NICs, disk); the builtin image's console is ttyS0")
    if img.format and not img.disk:
        rep.value("I005", loc + ("format",), "format applies only to a disk")
    if img.disk and disk_format(img) is None:
        rep.value("I006", loc + ("disk",), f"cannot tell the format of {img.disk!r}",
                  "add format: qcow2 or format: raw")
    for f in ("kernel", "initrd", "disk", "cdrom"):
        _file(rep, loc, f, getattr(img, f), base_dir, roots,
              disk_format(img) if f == "disk" else None)


def _booted_as(p: Parsed, img: ImageSpec | None) -> ImageSpec | None:
    """The image a guest boots as: a clone's is its source guest's (with a disk)."""
    seen: set[str] = set()
    while img is not None and img.from_ and img.from_ not in seen:
        seen.add(img.from_)
        src = p.guests.get(img.from_.split("@")[0])
        if src is None:
            return None
        img = p.images.get(src.image) or BUILTIN_IMAGES.get(src.image)
        if img is not None and not img.from_:
            return img.model_copy(update={"disk": img.disk or "template", "format": "qcow2"})
    return img


def _clone(rep: Reporter, name: str, ref: str, p: Parsed, state_dir: Path | None) -> None:
    """``from: GUEST@REF``: a guest of the inventory with a disk, and a snapshot or backup
    REF of it (looked for in the state dir, when there is one)."""
    loc = ("images", name, "from")
    guest, _, tag = ref.partition("@")
    g = p.guests.get(guest)
    src = (p.images.get(g.image) if g.image in p.images else BUILTIN_IMAGES.get(g.image)) \
        if g is not None else None
    if g is None:
        rep.value("I017", loc, f"no guest {guest!r} in the inventory",
                  _suggest(guest, list(p.guests)))
        return
    if src is None or not (src.disk or src.from_):
        rep.value("I017", loc, f"guest {guest}'s image has no disk to make a template of")
        return
    if state_dir is None or template_path(state_dir, ref).exists():
        return
    gdir = state_dir / "guests" / guest
    snaps = set()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        snaps = {s["tag"] for s in json.loads((gdir / "snapshots.json").read_text())
                 ["snapshots"]}
    bdir = Path(p.host.backup.dir) if p.host is not None and p.host.backup.dir else \
        state_dir / "backups"
    if tag not in snaps and not (bdir / guest / tag / "manifest.json").exists():
        rep.value("I019", loc, f"guest {guest} has no snapshot or backup {tag!r}",
                  f"consolidator snapshot list {guest}; consolidator backup list {guest}")


def _file(rep: Reporter, loc: tuple, f: str, v: str | None, base_dir: Path,
          roots: tuple[str, ...], fmt: str | None = None) -> None:
    """A file the guest boots from: there, regular, readable, inside the image roots."""
    if v:
        path = resolve_path(v, base_dir)
        if not path.exists():
            rep.value("I007", loc + (f,), f"no such file: {path}")
        elif not regular_file(path):
            rep.value("I008", loc + (f,), f"not a regular file: {path}")
        elif not os.access(path, os.R_OK):
            rep.value("I008", loc + (f,), f"not readable: {path}")
        elif not inside(path, roots):
            link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
            rep.value("I011", loc + (f,), f"{path}{link} is outside the image roots: "
                      f"{', '.join(roots)}", "move it under a root, or list its directory "
                      "in host.image_roots")
        elif f == "disk" and fmt:
            for code, message in disk_problems(path, fmt, roots):
                rep.value(code, loc + (f,), message)


def _os(rep: Reporter, loc: tuple, short_id: str) -> None:
    try:
        osinfo.lookup(short_id)
    except osinfo.UnknownOs as e:
        hint = ("install osinfo-db (Debian's libosinfo database)" if e.empty else
                f"did you mean {' or '.join(repr(s) for s in e.suggestions)}?"
                if e.suggestions else "`consolidator os list` shows the known ids")
        rep.value("I015", loc, f"unknown OS {short_id!r}" if not e.empty else str(e), hint)


# ---------------------------------------------------------------------- networks

def _network(rep: Reporter, name: str, net: NetworkSpec) -> None:
    loc = ("networks", name)
    if net.subnet.prefixlen > 30:
        rep.value("A001", loc + ("subnet",), f"{net.subnet} is too small: use a /30 or larger")
    if net.gateway:
        _address_in(rep, loc + ("gateway",), ipaddress.ip_interface(net.gateway), net)
    if net.nat and not net.gateway:
        rep.value("A006", loc + ("nat",), "nat needs a gateway on the host side",
                  f"add gateway: {next(net.subnet.hosts(), '')}")


def _address_in(rep: Reporter, loc: tuple, iface: ipaddress.IPv4Interface | Any,
                net: NetworkSpec) -> bool:
    ip = iface.ip
    if iface.network.prefixlen not in (net.subnet.prefixlen, 32):
        rep.value("A002", loc, f"prefix /{iface.network.prefixlen} differs from the subnet's "
                  f"/{net.subnet.prefixlen}", f"write {ip} or {ip}/{net.subnet.prefixlen}")
        return False
    if ip not in net.subnet:
        rep.value("A003", loc, f"{ip} is outside the subnet {net.subnet}")
        return False
    if ip == net.subnet.network_address:
        rep.value("A004", loc, f"{ip} is the network address of {net.subnet}")
        return False
    if ip == net.subnet.broadcast_address:
        rep.value("A005", loc, f"{ip} is the broadcast address of {net.subnet}")
        return False
    return True


def _overlaps(rep: Reporter, nets: dict[str, NetworkSpec | None]) -> None:
    routed = [(n, s) for n, s in nets.items() if s is not None and s.gateway]
    for i, (n1, s1) in enumerate(routed):
        for n2, s2 in routed[:i]:
            if s1.subnet.overlaps(s2.subnet):
                rep.value("A007", ("networks", n1, "subnet"), f"{s1.subnet} overlaps network "
                          f"{n2!r} ({s2.subnet}); both have a gateway on the host, so routing "
                          "would be ambiguous")


def _forwarding(rep: Reporter, nets: dict[str, NetworkSpec | None]) -> None:
    for name, spec in nets.items():
        if spec is None:
            continue
        for i, other in enumerate(spec.forward_to):
            loc = ("networks", name, "forward_to", i)
            if other not in nets:
                rep.value("A014", loc, f"{other!r} is not a declared network",
                          _suggest(other, [n for n in nets if n != name]))
            elif other == name:
                rep.value("A015", loc, "a network does not forward to itself: its guests "
                          "share a bridge already")
            elif not spec.gateway or (nets[other] is not None and
                                      not nets[other].gateway):   # type: ignore[union-attr]
                bare = name if not spec.gateway else other
                rep.value("A015", loc, f"forwarding goes through the host, and network "
                          f"{bare!r} has no gateway on it", f"give {bare!r} a gateway")


# ------------------------------------------------------------------------ guests

def _limits(rep: Reporter, loc: tuple[str | int, ...], io: DiskIo | None) -> None:
    """A disk's limits: QEMU limits either the total or each direction, and a burst is
    what may pass faster than the limits, so it holds at least a second of them."""
    if io is None:
        return
    if io.bps is not None and (io.read_bps is not None or io.write_bps is not None):
        rep.value("G016", loc + ("bps",), "bps limits reads and writes together; "
                  "read_bps and write_bps limit each direction instead: set one or the other")
    byte_limits = [v for v in (io.bps, io.read_bps, io.write_bps) if v is not None]
    if io.burst is not None and not byte_limits:
        rep.value("G016", loc + ("burst",), "a burst qualifies the byte limits: set bps, "
                  "read_bps or write_bps too")
    elif io.burst is not None and io.burst < max(byte_limits):
        rep.value("G016", loc + ("burst",), f"burst {human_size(io.burst)} is below the "
                  f"limit {human_rate(max(byte_limits))}: a burst holds at least one second "
                  "of it", "raise burst, or leave it out")


def _guests(rep: Reporter, raw: dict[str, Any], p: Parsed, facts: HostFacts,
            instance: str, base_dir: Path, roots: tuple[str, ...]) -> None:
    raw_images = set(raw.get("images", {}) or {}) | set(BUILTIN_IMAGES)
    raw_nets = set((raw.get("networks") or {}) if isinstance(raw.get("networks"), dict) else {})
    ips: dict[tuple[str, str], str] = {}
    macs: dict[str, str] = {}
    for gname, g in p.guests.items():
        if g is None:
            continue
        loc = ("guests", gname)
        if g.image not in raw_images:
            rep.value("I009", loc + ("image",), f"undeclared image {g.image!r}",
                      _suggest(g.image, sorted(raw_images)))
        _cpu(rep, loc, g, facts)
        img = _booted_as(p, p.images.get(g.image) or BUILTIN_IMAGES.get(g.image))
        if img is not None:
            _devices(rep, loc, g, img, p.host or HostSpec(), base_dir, roots, facts)
        mem = g.memory
        if mem.max < MIN_GUEST_MEMORY:
            rep.value("G001", loc + ("memory", "max"), f"{human_size(mem.max)} is too little "
                      f"for a guest; the least is {human_size(MIN_GUEST_MEMORY)}")
        elif mem.max % (1 << 20):
            rep.value("G002", loc + ("memory", "max"), f"{mem.max} bytes is not a whole number "
                      "of MiB, which QEMU needs")
        if mem.min is not None and mem.min > mem.max:
            rep.value("G003", loc + ("memory", "min"), f"min {human_size(mem.min)} is more "
                      f"than max {human_size(mem.max)}")
        _limits(rep, loc + ("disk_io",), g.disk_io)
        for i, d in enumerate(g.disks):
            _limits(rep, loc + ("disks", i, "io"), d.io)
        for i, nic in enumerate(g.nics):
            nloc = loc + ("nics", i)
            net = p.networks.get(nic.network)
            if nic.burst is not None and nic.rate is None:
                rep.value("G016", nloc + ("burst",), "a burst above no rate: set rate too")
            elif nic.burst is not None and nic.rate is not None and nic.burst < nic.rate:
                rep.value("G016", nloc + ("burst",), f"burst {human_size(nic.burst)} is below "
                          f"the rate {format_rate(nic.rate)}: a burst holds at least one "
                          "second of it", "raise burst, or leave it out for the smallest "
                          "bucket that keeps the rate")
            if nic.network not in raw_nets:
                rep.value("A008", nloc + ("network",), f"undeclared network {nic.network!r}",
                          _suggest(nic.network, sorted(raw_nets)))
            if nic.ip and net is not None:
                iface = ipaddress.ip_interface(nic.ip)
                if _address_in(rep, nloc + ("ip",), iface, net):
                    ip = str(iface.ip)
                    if net.gateway and iface.ip == ipaddress.ip_interface(net.gateway).ip:
                        rep.value("A009", nloc + ("ip",), f"{ip} is the gateway of network "
                                  f"{nic.network!r}")
                    elif net.dhcp and not net.gateway and ip == service_address(net):
                        rep.value("A016", nloc + ("ip",), f"{ip} is where isolated network "
                                  f"{nic.network!r} serves DHCP and DNS",
                                  "use another address, or dhcp: false on the network")
                    elif (nic.network, ip) in ips:
                        rep.value("A010", nloc + ("ip",), f"{ip} is already used by "
                                  f"{ips[(nic.network, ip)]}")
                    else:
                        ips[(nic.network, ip)] = dotted(nloc)
            mac = nic.mac or derive_mac(instance, gname, i)
            if nic.mac:
                if int(mac[:2], 16) & 1:
                    rep.value("A011", nloc + ("mac",), f"{mac} is a multicast MAC",
                              "clear the lowest bit of the first byte, e.g. 52:54:00:...")
                elif mac == "00:00:00:00:00:00":
                    rep.value("A012", nloc + ("mac",), f"{mac} is not a usable MAC")
            if mac in macs:
                rep.value("A013", nloc + ("mac",) if nic.mac else nloc,
                          f"MAC {mac} is already used by {macs[mac]}",
                          None if nic.mac else "set mac explicitly on one of them")
            else:
                macs[mac] = dotted(nloc)
        gateways = {n for n, net in p.networks.items() if net is not None and net.gateway}
        if g.ready.startswith("tcp:") and not any(
                nic.ip and nic.network in gateways for nic in g.nics):
            rep.value("G013", loc + ("ready",), "ready: tcp needs a NIC with an address on a "
                      "network with a gateway (the supervisor connects from there)")


def _devices(rep: Reporter, loc: tuple, g: GuestSpec, img: ImageSpec, host: HostSpec,
             base_dir: Path, roots: tuple[str, ...], facts: HostFacts) -> None:
    """Firmware, boot media, buses and probes: what QEMU and the firmware can do."""
    if g.os:
        _os(rep, loc + ("os",), g.os)
    _file(rep, loc, "cdrom", g.cdrom, base_dir, roots)
    fw_boot = firmware_boot(img, g.cdrom)
    if g.firmware and not fw_boot:
        rep.value("I014", loc + ("firmware",), "firmware applies to a disk or cdrom boot; "
                  f"image {g.image!r} has its kernel loaded by QEMU")
    dev = guest_devices(g, img, os_defaults(g.os or img.os))
    if dev["firmware"] == "uefi":
        for what in ("code", "vars"):
            path = getattr(host.uefi, what)
            if not regular_file(Path(path)):
                where = ("firmware",) if g.firmware else ()
                rep.value("I016", loc + where, f"UEFI firmware {what} {path} is not "
                          "installed", "apt-get install ovmf (or set host.uefi)")
                break
    if dev["display"] == "vga" and not facts.screen:
        rep.value("G015", loc + (("display",) if g.display else ("os",)), "display: vga, "
                  "but QEMU cannot show a screen on this host: its VGA BIOS "
                  "(vgabios-stdvga.bin) is missing", "apt-get install seabios, or display: "
                  "none")
    if dev["machine"] == "q35":
        if dev["disk_bus"] == "ide" and (img.disk or g.disks):
            rep.value("G010", loc + (("disk_bus",) if g.disk_bus else ()), "q35 has no IDE "
                      "controller", "use disk_bus: sata (AHCI), or machine: pc")
        for i, d in enumerate(g.disks):
            if d.bus == "ide":
                rep.value("G010", loc + ("disks", i, "bus"), "q35 has no IDE controller",
                          "use bus: sata (AHCI), or machine: pc")
    present = {"disk": bool(img.disk or g.disks), "cdrom": bool(dev["cdrom"])}
    if g.boot:
        seen: set[str] = set()
        for i, b in enumerate(g.boot):
            if not present[b]:
                rep.value("G011", loc + ("boot", i), f"boot names {b}, but the guest has none")
            elif b in seen:
                rep.value("G011", loc + ("boot", i), f"{b} is named twice")
            seen.add(b)
        if not fw_boot:
            rep.value("G011", loc + ("boot",), f"image {g.image!r} has its kernel loaded by "
                      "QEMU: there is no boot order")
    names: dict[str, int] = {}
    for i, d in enumerate(g.disks):
        name = d.name or f"data{i}"
        if name in names:
            rep.value("G012", loc + ("disks", i, "name" if d.name else "size"),
                      f"a second disk named {name!r}")
        names[name] = i
        if d.size < 1 << 20 or d.size % (1 << 20):
            rep.value("G012", loc + ("disks", i, "size"), f"{d.size} bytes: a data disk is "
                      "a whole number of MiB, at least 1MiB")
    if g.cloud_init is not None:
        if not fw_boot:
            rep.value("G014", loc + ("cloud_init",), f"image {g.image!r} has its kernel "
                      "loaded by QEMU; a cloud-init seed is for disk images")
        try:
            user_data_text(g, base_dir)
        except (OSError, ValueError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            rep.value("G014", loc + ("cloud_init", "user_data"), f"user-data: {msg}")
    kind, _, arg = g.ready.partition(":")
    if kind == "tcp" and not 1 <= int(arg) <= 65535:
        rep.value("G013", loc + ("ready",), f"port {arg} is out of range 1-65535")
    elif kind == "serial":
        try:
            re.compile(arg)
        except re.error as e:
            rep.value("G013", loc + ("ready",), f"not a regular expression: {e}")
    elif kind == "agent" and (img.builtin or img.kernel) and not fw_boot:
        pass                # a user's kernel and initrd may well run an agent


def _cpu(rep: Reporter, loc: tuple, g: GuestSpec, facts: HostFacts) -> None:
    cpu = g.cpu
    if g.vcpus > facts.ncpus:
        rep.value("G004", loc + ("vcpus",), f"{g.vcpus} vCPUs is more than this host's "
                  f"{facts.ncpus} CPUs", "vCPU threads beyond host CPUs only contend")
    if cpu.limit is not None and cpu.reserve > cpu.limit + EPS:
        rep.value("G005", loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores is more "
                  f"than limit {cpu.limit:g}")
    if cpu.reserve > g.vcpus + EPS:
        rep.value("G006", loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores is more "
                  f"than the guest's {g.vcpus} vCPUs can use")
    if cpu.limit is not None and cpu.limit > g.vcpus + EPS:
        rep.value("G007", loc + ("cpu", "limit"), f"limit {cpu.limit:g} cores is more than the "
                  f"guest's {g.vcpus} vCPUs can use", f"raise vcpus or set limit <= {g.vcpus}")
    if cpu.pin:
        missing = [c for c in cpu.pin if c not in facts.cpus]
        if missing:
            rep.value("G008", loc + ("cpu", "pin"), f"CPUs {format_cpulist(tuple(missing))} are "
                      f"not online here; this host has {format_cpulist(facts.cpus)}")
        elif cpu.reserve > len(cpu.pin) + EPS:
            rep.value("G009", loc + ("cpu", "reserve"), f"reserve {cpu.reserve:g} cores does not "
                      f"fit in the {len(cpu.pin)} pinned CPUs")


# ---------------------------------------------------------------------- capacity

def _capacity(rep: Reporter, host: HostSpec, guests: dict[str, GuestSpec | None],
              facts: HostFacts) -> None:
    usable = usable_cpus(host, facts)
    if usable <= EPS:
        rep.value("C001", ("host", "reserve", "cpus"), f"reserve {host.reserve.cpus:g} cores "
                  f"leaves nothing of this host's {facts.ncpus} CPUs for guests")
    room = memory_room(host, facts)
    if room <= 0:
        rep.value("C002", ("host", "reserve", "memory"), f"reserve "
                  f"{human_size(host.reserve.memory)} is all of this host's "
                  f"{human_size(facts.memory_total)}")
    budget = derive_budget(host, facts)
    if host.memory != "auto" and budget > room:
        rep.value("C003", ("host", "memory"), f"budget {human_size(budget)} is more than RAM "
                  f"{human_size(facts.memory_total)} minus reserve "
                  f"{human_size(host.reserve.memory)} = {human_size(max(room, 0))}")
    ok = [(n, g) for n, g in guests.items() if g is not None]

    def crossing(code: str, values: list[float], limit: float, loc_tail: tuple, message: str,
                 hint: str) -> None:
        """Report at the guest whose value first takes the running sum past ``limit``."""
        total = 0.0
        for (name, _), v in zip(ok, values):
            total += v
            if total > limit + EPS:
                rep.value(code, ("guests", name) + loc_tail, message, hint)
                return

    u = max(usable, 0.0)
    reserves = [g.cpu.reserve for _, g in ok]
    crossing("C004", reserves, usable, ("cpu", "reserve"),
             f"cpu reserves add up to {sum(reserves):g} cores, beyond the {u:g} usable "
             f"({facts.ncpus} host CPUs - {host.reserve.cpus:g} reserve)",
             "lower some cpu.reserve or host.reserve.cpus")
    mins = [float(g.memory.max if g.memory.min is None else g.memory.min) for _, g in ok]
    crossing("C005", mins, budget, ("memory", "min"),
             f"memory minimums add up to {human_size(sum(mins))}, beyond the guest budget "
             f"{human_size(budget)}", "lower some memory.min (it defaults to max)")
    vcpus = [float(g.vcpus) for _, g in ok]
    ocpu = host.overcommit.cpus * u
    crossing("C006", vcpus, ocpu, ("vcpus",),
             f"vCPUs add up to {sum(vcpus):g}, beyond overcommit {host.overcommit.cpus:g} x "
             f"{u:g} usable cores = {ocpu:g}", "raise host.overcommit.cpus or use fewer vCPUs")
    maxes = [float(g.memory.max) for _, g in ok]
    omem = host.overcommit.memory * budget
    crossing("C007", maxes, omem, ("memory", "max"),
             f"memory maximums add up to {human_size(sum(maxes))}, beyond overcommit "
             f"{host.overcommit.memory:g} x budget {human_size(budget)} = {human_size(omem)}",
             "raise host.overcommit.memory or lower some memory.max")
