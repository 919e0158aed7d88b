"""OS profiles from libosinfo's database (Debian's ``osinfo-db``), as virt-install uses it.

``os: centos7`` in the inventory names a *short id*. Its entry (an XML file under
``/usr/share/osinfo/os``) lists the devices the OS has drivers for, by PCI id, and the
firmware it supports. An entry inherits the devices of the entries it ``derives-from``
and ``clones``; a device marked ``supported="false"`` is taken away. From that set
:func:`device_defaults` picks, as virt-install does, the best device of each kind the OS
can drive: virtio where it can, else the emulated hardware of its day.

Where the database is searched, first match wins: ``$OSINFO_SYSTEM_DIR`` (or
``/usr/share/osinfo``), ``/etc/osinfo``, then the entries shipped in ``osinfo-extra/``
next to this file. Those fill releases the host's database predates (bookworm's
``osinfo-db`` 20221130 has no ``debian12``); each derives from an entry the database has.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# PCI and chipset ids, as libosinfo names devices
PCI = "http://pcisig.com/pci/"
VIRTIO_NET = {PCI + "1af4/1000", PCI + "1af4/1041"}
VIRTIO_BLOCK = {PCI + "1af4/1001", PCI + "1af4/1042"}
VIRTIO_SCSI = {PCI + "1af4/1004", PCI + "1af4/1048"}
E1000 = {PCI + "8086/100e"}
RTL8139 = {PCI + "10ec/8139"}
AHCI = {PCI + "8086/2922"}
Q35 = "http://qemu.org/chipset/x86/q35"
WINDOWS_FAMILIES = {"winnt", "win9x", "win16"}

_SHORT_ID = re.compile(rb"<short-id>([^<]+)</short-id>")
_OS_ID = re.compile(rb'<os\s+id="([^"]+)"')


def db_dirs() -> tuple[Path, ...]:
    system = Path(os.environ.get("OSINFO_SYSTEM_DIR", "/usr/share/osinfo"))
    return (system, Path("/etc/osinfo"), Path(__file__).with_name("osinfo-extra"))


@dataclass(frozen=True)
class OsProfile:
    short_id: str
    id: str
    name: str
    family: str                     # linux, winnt, freebsd, ...
    distro: str
    devices: frozenset[str]
    firmware: frozenset[tuple[str, bool]]   # (type, supported) for x86_64
    source: str                     # the file it came from

    @property
    def windows(self) -> bool:
        return self.family in WINDOWS_FAMILIES


@dataclass(frozen=True)
class DeviceDefaults:
    machine: str                    # pc | q35
    firmware: str                   # bios | uefi
    disk_bus: str                   # virtio | scsi | sata | ide
    nic_model: str                  # virtio | e1000 | rtl8139
    display: str                    # none | vga
    rtc: str                        # utc | localtime
    hyperv: bool                    # Hyper-V enlightenments (used under KVM only)
    reason: str


def device_defaults(p: OsProfile) -> DeviceDefaults:
    """Pure: the devices a guest of profile ``p`` gets when the inventory says nothing."""
    d = p.devices
    machine = "q35" if Q35 in d else "pc"
    if d & VIRTIO_BLOCK:
        bus = "virtio"
    elif d & VIRTIO_SCSI:
        bus = "scsi"
    elif d & AHCI or machine == "q35":
        bus = "sata"
    else:
        bus = "ide"
    if d & VIRTIO_NET:
        nic = "virtio"
    elif d & RTL8139 and not d & E1000:
        nic = "rtl8139"
    else:
        nic = "e1000"               # every x86 OS since the late 1990s has a driver
    # BIOS unless the OS cannot boot from it (libvirt's rule too)
    firmware = "uefi" if ("bios", False) in p.firmware and ("efi", True) in p.firmware \
        else "bios"
    win = p.windows
    return DeviceDefaults(
        machine=machine, firmware=firmware, disk_bus=bus, nic_model=nic,
        display="vga" if win else "none", rtc="localtime" if win else "utc", hyperv=win,
        reason=f"{p.short_id} ({p.name}, {os.path.basename(p.source)})")


@functools.lru_cache(maxsize=4)
def _index(dirs: tuple[Path, ...]) -> tuple[dict[str, Path], dict[str, Path]]:
    """(short id -> file, os id -> file), first directory winning."""
    shorts: dict[str, Path] = {}
    ids: dict[str, Path] = {}
    for base in dirs:
        root = base / "os" if (base / "os").is_dir() else base
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*.xml")):
            if any(part.endswith(".d") for part in f.relative_to(root).parts):
                continue                    # <os>.d/: install drivers, not OS entries
            try:
                head = f.read_bytes()
            except OSError:
                continue
            m = _OS_ID.search(head)
            if not m:
                continue
            ids.setdefault(m.group(1).decode(), f)
            for s in _SHORT_ID.findall(head):
                shorts.setdefault(s.decode().strip(), f)
    return shorts, ids


def short_ids(dirs: tuple[Path, ...] | None = None) -> list[str]:
    return sorted(_index(dirs or db_dirs())[0])


def available(dirs: tuple[Path, ...] | None = None) -> bool:
    return bool(_index(dirs or db_dirs())[0])


class UnknownOs(LookupError):
    def __init__(self, short_id: str, suggestions: list[str], empty: bool) -> None:
        self.short_id, self.suggestions, self.empty = short_id, suggestions, empty
        if empty:
            msg = f"no OS database found, so {short_id!r} cannot be looked up"
        else:
            msg = f"unknown OS {short_id!r}"
            if suggestions:
                msg += "; did you mean " + " or ".join(repr(s) for s in suggestions) + "?"
        super().__init__(msg)


def suggest(short_id: str, dirs: tuple[Path, ...] | None = None) -> list[str]:
    known = short_ids(dirs)
    close = difflib.get_close_matches(short_id, known, n=3, cutoff=0.75)
    if not close:
        stem = re.sub(r"[\d.]+$", "", short_id)
        close = [k for k in known if stem and k.startswith(stem)][-3:]
    return close


def lookup(short_id: str, dirs: tuple[Path, ...] | None = None) -> OsProfile:
    """The profile of ``short_id``. Raises :class:`UnknownOs` with suggestions."""
    dirs = dirs or db_dirs()
    shorts, ids = _index(dirs)
    f = shorts.get(short_id)
    if f is None:
        raise UnknownOs(short_id, suggest(short_id, dirs), empty=not shorts)
    os_el = _os_element(f)
    devices, firmware = _devices(os_el, ids, set())
    return OsProfile(
        short_id=short_id, id=os_el.get("id", ""), name=_text(os_el, "name") or short_id,
        family=_text(os_el, "family") or _inherited_text(os_el, ids, "family") or "",
        distro=_text(os_el, "distro") or "", devices=frozenset(devices),
        firmware=frozenset(firmware), source=str(f))


@functools.lru_cache(maxsize=256)
def _os_element(f: Path) -> ET.Element:
    el = ET.parse(f).getroot().find("os")
    if el is None:
        raise LookupError(f"{f}: no <os> element")
    return el


def _text(el: ET.Element, tag: str) -> str | None:
    for child in el.findall(tag):
        if not child.attrib:                # the untranslated one
            return (child.text or "").strip()
    return None


def _parents(el: ET.Element) -> list[str]:
    return [p.get("id", "") for tag in ("derives-from", "clones") for p in el.findall(tag)]


def _inherited_text(el: ET.Element, ids: dict[str, Path], tag: str) -> str | None:
    for pid in _parents(el):
        if pid in ids:
            parent = _os_element(ids[pid])
            found = _text(parent, tag) or _inherited_text(parent, ids, tag)
            if found:
                return found
    return None


def _devices(el: ET.Element, ids: dict[str, Path], seen: set[str]
             ) -> tuple[set[str], set[tuple[str, bool]]]:
    """Devices and x86_64 firmware of ``el`` with those it inherits; its own marks win."""
    seen.add(el.get("id", ""))
    devices: set[str] = set()
    firmware: set[tuple[str, bool]] = set()
    for pid in _parents(el):
        if pid in ids and pid not in seen:
            d, fw = _devices(_os_element(ids[pid]), ids, seen)
            devices |= d
            firmware |= fw
    for dev in el.findall("devices/device"):
        did = dev.get("id", "")
        if dev.get("supported") == "false":
            devices.discard(did)
        else:
            devices.add(did)
    own = {(fw.get("type", ""), fw.get("supported") != "false")
           for fw in el.findall("firmware") if fw.get("arch") in ("x86_64", None)}
    if own:
        types = {t for t, _ in own}
        firmware = {f for f in firmware if f[0] not in types} | own
    return devices, firmware
