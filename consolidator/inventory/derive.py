"""Values the inventory implies, computed one way for its checks and for the model.

Pure: the checks use these to find problems, :func:`consolidator.model.resolve` to
build the fleet, so what was validated is exactly what runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Any

import yaml

from ..hostfacts import HostFacts
from ..osinfo import DeviceDefaults, device_defaults, lookup
from .schema import GuestSpec, HostSpec, ImageSpec, NetworkSpec

DISK_FORMATS = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}


def derive_mac(instance: str, guest: str, index: int) -> str:
    """A locally administered unicast MAC (52:54:xx:xx:xx:xx) stable per instance/guest/NIC."""
    h = hashlib.sha256(f"{instance}/{guest}/{index}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in h[:4])


def disk_format(img: ImageSpec) -> str | None:
    """The disk's format: given, or told by its extension (None: cannot tell)."""
    if img.format:
        return img.format
    if img.disk:
        return DISK_FORMATS.get(os.path.splitext(img.disk)[1].lower())
    return None


def resolve_path(path: str, base_dir: Path) -> Path:
    """A path of the inventory, relative to the inventory's directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def resolved_image(img: ImageSpec, base_dir: Path) -> ImageSpec:
    """Paths made absolute and the disk format filled in: the supervisor that runs the
    guests does not share the CLI's working directory."""
    upd: dict[str, Any] = {}
    for f in ("kernel", "initrd", "disk", "cdrom"):
        v = getattr(img, f)
        if v:
            upd[f] = str(resolve_path(v, base_dir).resolve())
    if img.disk:
        upd["format"] = disk_format(img)
    return img.model_copy(update=upd) if upd else img


def template_path(state_dir: Path, ref: str) -> Path:
    """Where the template of an image ``from: GUEST@REF`` is kept (made on first use)."""
    return state_dir / "images" / "templates" / f"{ref}.qcow2"


def clone_image(img: ImageSpec, source: ImageSpec, state_dir: Path | None) -> ImageSpec:
    """An image ``from: GUEST@REF`` boots as GUEST's image does, from the template."""
    if state_dir is None or img.from_ is None:
        return img
    return source.model_copy(update={"disk": str(template_path(state_dir, img.from_)),
                                     "format": "qcow2", "from_": img.from_})


def image_roots(host: HostSpec, base_dir: Path, state_dir: Path | None) -> tuple[str, ...]:
    """Where image files may be, as real absolute paths: ``host.image_roots`` (relative
    to the inventory's directory), or by default that directory and the state dir's
    image cache."""
    if host.image_roots:
        roots = [resolve_path(r, base_dir) for r in host.image_roots]
    else:
        roots = [base_dir] + ([state_dir / "images"] if state_dir is not None else [])
    if state_dir is not None:              # templates of clones are made there
        roots.append(state_dir / "images" / "templates")
    return tuple(os.path.realpath(r) for r in roots)


def usable_cpus(host: HostSpec, facts: HostFacts) -> float:
    """Cores left to guests: the host's CPUs minus its reserve (may be <= 0: invalid)."""
    return facts.ncpus - host.reserve.cpus


def memory_room(host: HostSpec, facts: HostFacts) -> int:
    """RAM minus the host's reserve (may be <= 0: invalid)."""
    return facts.memory_total - host.reserve.memory


def budget(host: HostSpec, facts: HostFacts) -> int:
    """The guests' memory budget: ``host.memory``, or RAM minus the reserve for auto."""
    if host.memory == "auto":
        return max(memory_room(host, facts), 0)
    return int(host.memory)


def service_address(net: NetworkSpec) -> str:
    """Where a network's DHCP and DNS answer: its gateway, or (isolated) its last usable
    address, which validation keeps from guests."""
    if net.gateway:
        return str(ipaddress.ip_interface(net.gateway).ip)
    return str(net.subnet.broadcast_address - 1)


def firmware_boot(img: ImageSpec, guest_cdrom: str | None = None) -> bool:
    """The guest boots through firmware (from a disk or a cdrom), not a kernel QEMU loads."""
    return not (img.builtin or img.kernel) and bool(img.disk or img.cdrom or guest_cdrom)


def os_id(g: GuestSpec, img: ImageSpec) -> str | None:
    return g.os or img.os


def os_defaults(short_id: str | None) -> DeviceDefaults | None:
    """The device defaults of an OS profile (None: no profile, or one validation refused)."""
    if not short_id:
        return None
    try:
        return device_defaults(lookup(short_id))
    except (LookupError, OSError):          # UnknownOs is a LookupError
        return None


def guest_devices(g: GuestSpec, img: ImageSpec, profile: DeviceDefaults | None
                  ) -> dict[str, Any]:
    """Pure: the devices of guest ``g``: its own keys, then its image's, then the OS
    profile's defaults, then the project's. ``nic_models`` has one entry per NIC."""
    fw_boot = firmware_boot(img, g.cdrom)
    p = profile
    firmware = (g.firmware or img.firmware or (p.firmware if p else "bios")) if fw_boot \
        else None
    if g.machine:
        machine: str | None = g.machine
    elif fw_boot:
        machine = p.machine if p else ("q35" if firmware == "uefi" else "pc")
    else:
        machine = None                # a kernel boot: the launcher picks (microvm or pc)
    disk_bus = g.disk_bus or (p.disk_bus if p else "virtio")
    if machine == "q35" and disk_bus == "ide" and not g.disk_bus:
        disk_bus = "sata"             # a profile's IDE is the q35's AHCI
    cdrom = g.cdrom or img.cdrom
    has_disk = bool(img.disk or g.disks)
    present = [d for d in ("disk", "cdrom") if d == "disk" and has_disk or d == "cdrom" and cdrom]
    ready = g.ready
    if ready == "auto":
        ready = "marker" if img.builtin else ("agent" if fw_boot else "none")
    return {
        "os": os_id(g, img), "firmware": firmware, "machine": machine, "disk_bus": disk_bus,
        "display": g.display or (p.display if p else "none"),
        "rtc": g.rtc or (p.rtc if p else "utc"), "hyperv": bool(p and p.hyperv),
        # a kernel QEMU loads boots first (it takes bootindex 0): no order to give
        "cdrom": cdrom, "boot": (tuple(g.boot) if g.boot else tuple(present)) if fw_boot
        else (),
        "ready": ready,
        "nic_models": tuple(n.model or (p.nic_model if p else "virtio") for n in g.nics),
    }


def user_data_text(g: GuestSpec, base_dir: Path) -> str | None:
    """The user-data a guest's seed carries: the mapping as #cloud-config, or the file's
    text. Raises OSError (unreadable file) or ValueError (a #cloud-config that is no
    YAML mapping)."""
    ci = g.cloud_init
    if ci is None or ci.user_data is None:
        return None
    if isinstance(ci.user_data, dict):
        return "#cloud-config\n" + yaml.safe_dump(ci.user_data, sort_keys=False)
    text = resolve_path(ci.user_data, base_dir).read_text()
    if len(text) > 16 << 10:
        raise ValueError("user-data is over 16 KiB")
    if text.startswith("#cloud-config"):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ValueError(f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if doc is not None and not isinstance(doc, dict):
            raise ValueError("a #cloud-config must be a YAML mapping")
    elif not text.startswith(("#!", "#include", "#cloud-boothook", "Content-Type:")):
        raise ValueError("user-data starts with #cloud-config, #! (a script), #include "
                         "or a MIME header")
    return text


def allocate_addresses(instance: str, networks: dict[str, NetworkSpec],
                       guests: dict[str, GuestSpec],
                       previous: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    """Pure: an address for each NIC that declares none, on a network with DHCP, so its
    MAC gets a lease like the others. A NIC keeps the address it had (``previous``, from
    the fleet last applied) while that is free; a new one starts at a place its own name
    fixes (a hash) and takes the next free address, in name order: so adding or removing
    other guests never moves it."""
    taken: dict[str, set[str]] = {}
    for name, net in networks.items():
        t = {str(net.subnet.network_address), str(net.subnet.broadcast_address)}
        if net.gateway:
            t.add(str(ipaddress.ip_interface(net.gateway).ip))
        if net.dhcp:
            t.add(service_address(net))
        taken[name] = t
    wanted: list[tuple[str, int, str]] = []
    for g in sorted(guests):
        for i, nic in enumerate(guests[g].nics):
            if nic.network not in networks:
                continue
            if nic.ip:
                taken[nic.network].add(str(ipaddress.ip_interface(nic.ip).ip))
            elif networks[nic.network].dhcp:
                wanted.append((g, i, nic.network))
    out: dict[tuple[str, int], str] = {}
    for g, i, net in wanted:                    # kept addresses first: they never move
        prev = previous.get((g, i))
        if prev and prev not in taken[net] and \
                ipaddress.ip_address(prev) in networks[net].subnet:
            out[(g, i)] = prev
            taken[net].add(prev)
    for g, i, net in wanted:
        if (g, i) in out:
            continue
        subnet = networks[net].subnet
        size = subnet.num_addresses
        start = int.from_bytes(hashlib.sha256(f"{instance}/{g}/{i}".encode()).digest()[:4],
                               "big") % size
        for k in range(size):
            ip = str(subnet.network_address + (start + k) % size)
            if ip not in taken[net]:
                out[(g, i)] = ip
                taken[net].add(ip)
                break
    return out
