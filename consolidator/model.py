"""The desired fleet, and the lifecycle states of its guests.

A :class:`Fleet` is what ``apply`` wants to be true: a validated inventory
(:mod:`consolidator.inventory`) resolved by :func:`resolve`, with every default filled
in and every reference followed. Each guest carries the definition of its image and,
per NIC, the prefix, gateway and MAC it will get. So a change to a network's gateway
or an image's kernel shows up as a change to the guests that use them, which is what
it is.

:class:`GuestState` is the guest's lifecycle as the planner and the supervisor see it,
with the table of the transitions allowed between states. The planner reads states;
only the supervisor's runtime (:mod:`consolidator.daemon.runtime`) moves a guest from
one to another, through that table.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import os
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from .hostfacts import HostFacts
from .inventory import Inventory, load_inventory, validate
from .inventory.derive import (allocate_addresses, budget, clone_image, derive_mac,
                               guest_devices, image_roots, os_defaults, resolve_path,
                               resolved_image, usable_cpus, user_data_text)
from .inventory.schema import (BUILTIN_IMAGES, BackupPolicy, CpuSpec, DiskIo, GuestSpec,
                               HostSpec, ImageSpec, IoSpec, MemorySpec, NetworkSpec, Size)
from .units import human_size


class GuestState(enum.StrEnum):
    DEFINED = "defined"      # known, never started (or definition changed while stopped)
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"      # clean exit, or stopped by the operator
    CRASHED = "crashed"      # died; the restart policy may bring it back
    FAILED = "failed"        # gave up restarting; waits for apply or start
    ORPHANED = "orphaned"    # a QEMU runs but its QMP could not be reattached

    @property
    def active(self) -> bool:
        """A QEMU process exists (or is being made) for it."""
        return self in (GuestState.STARTING, GuestState.RUNNING, GuestState.STOPPING,
                        GuestState.ORPHANED)

    def may_become(self, new: "GuestState") -> bool:
        return new in TRANSITIONS[self]


_S = GuestState
#: Every move a guest may make. A move not here is a bug, and the runtime refuses it.
#: Reattach after a supervisor restart moves a guest recorded as active to running
#: (adopted), orphaned (QMP lost) or crashed (it vanished).
TRANSITIONS: dict[GuestState, frozenset[GuestState]] = {
    _S.DEFINED: frozenset({_S.DEFINED, _S.STARTING}),
    _S.STARTING: frozenset({_S.RUNNING, _S.STOPPED, _S.CRASHED, _S.ORPHANED}),
    _S.RUNNING: frozenset({_S.RUNNING, _S.STOPPING, _S.STOPPED, _S.CRASHED, _S.ORPHANED}),
    _S.STOPPING: frozenset({_S.RUNNING, _S.STOPPED, _S.CRASHED, _S.ORPHANED}),
    _S.STOPPED: frozenset({_S.DEFINED, _S.STARTING, _S.FAILED}),
    _S.CRASHED: frozenset({_S.DEFINED, _S.STARTING, _S.STOPPED, _S.FAILED}),
    _S.FAILED: frozenset({_S.DEFINED, _S.STARTING, _S.STOPPED}),
    _S.ORPHANED: frozenset({_S.ORPHANED, _S.RUNNING, _S.STOPPED, _S.CRASHED}),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NicIntent(_Frozen):
    network: str
    mac: str
    ip: str | None = None          # address only, no prefix
    prefix: int                     # from the network's subnet
    gateway: str | None = None      # the network's gateway, if any
    model: Literal["virtio", "e1000", "rtl8139"] = "virtio"
    allocated: bool = False         # ip chosen by consolidator (the inventory gave none)
    rate: int | None = None         # bytes/s each way (tc), None: no ceiling
    burst: int | None = None        # bucket bytes above the rate

    @property
    def cidr(self) -> str | None:
        return f"{self.ip}/{self.prefix}" if self.ip else None


BOOT_NODE = "disk0"          # the image's disk (the guest's overlay of it), in QEMU


def data_node(name: str) -> str:
    """Data disk ``name``'s QEMU node, its file's stem and its label in backups."""
    return f"data-{name}"


class Drive(NamedTuple):
    """One writable disk of a guest, as every part names it."""

    node: str                  # QEMU's node: disk0, data-<name>
    file: str                  # in the guest's dir: disk.qcow2, data-<name>.qcow2
    label: str                 # in backup manifests: "disk", data-<name>
    io: DiskIo | None          # its own limits from the inventory


class DiskIntent(_Frozen):
    """A data disk: ``<guest dir>/data-<name>.qcow2``."""

    name: str
    size: Size
    bus: Literal["virtio", "scsi", "sata", "ide"]
    io: DiskIo | None = None


class GuestIntent(_Frozen):
    name: str
    image: str
    image_spec: ImageSpec
    vcpus: int
    cpu: CpuSpec
    memory: MemorySpec              # memory.min is always set here
    nics: tuple[NicIntent, ...] = ()
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    autostart: bool = True
    labels: dict[str, str] = {}
    # devices, resolved: the guest's keys, its image's, its OS profile's, the defaults
    os: str | None = None
    firmware: Literal["bios", "uefi"] | None = None     # None: QEMU loads a kernel
    machine: Literal["pc", "q35"] | None = None         # None: the launcher's choice
    disk_bus: Literal["virtio", "scsi", "sata", "ide"] = "virtio"
    display: Literal["none", "vga"] = "none"
    rtc: Literal["utc", "localtime"] = "utc"
    hyperv: bool = False
    cdrom: str | None = None
    boot: tuple[Literal["cdrom", "disk"], ...] = ()
    disks: tuple[DiskIntent, ...] = ()
    disk_io: DiskIo | None = None    # the image's disk's limits
    io: IoSpec = IoSpec()
    ready: str = "marker"           # marker | agent | none | tcp:PORT | serial:REGEX
    cloud_init: str | None = None   # the seed's user-data (None: no seed)
    ready_timeout: float = 90.0
    backup: BackupPolicy | None = None      # schedule and retention

    @property
    def memory_min(self) -> int:
        assert self.memory.min is not None
        return self.memory.min

    def drives(self) -> tuple[Drive, ...]:
        """The writable disks: the image's disk (its overlay) first, then the data disks.
        The one list launch, throttling, the rebalancer's I/O reads and backups go by."""
        out = [Drive(BOOT_NODE, "disk.qcow2", "disk", self.disk_io)] if self.image_spec.disk \
            else []
        out += [Drive(data_node(d.name), f"{data_node(d.name)}.qcow2", data_node(d.name), d.io)
                for d in self.disks]
        return tuple(out)

    def spec_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))


class Fleet(_Frozen):
    instance: str
    host: HostSpec
    budget: Size                    # guest memory budget in bytes, resolved for this host
    usable_cpus: float              # host cores minus the reserve
    image_roots: tuple[str, ...] = ()   # where image files may be (real paths)
    images: dict[str, ImageSpec]
    networks: dict[str, NetworkSpec]
    guests: dict[str, GuestIntent]

    def fleet_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))

    def summary(self) -> str:
        vcpus = sum(g.vcpus for g in self.guests.values())
        mem = sum(g.memory.max for g in self.guests.values())
        return (f"instance {self.instance}: {len(self.guests)} guests, {len(self.networks)} "
                f"networks, {vcpus} vCPUs, {human_size(mem)} max memory, "
                f"budget {human_size(self.budget)}")


def _hash(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def nic_address(ip: str | None) -> str | None:
    """``10.0.0.5/24`` -> ``10.0.0.5``."""
    return str(ipaddress.ip_interface(ip).ip) if ip else None


def resolve(inv: Inventory, facts: HostFacts, base_dir: Path,
            state_dir: Path | None = None) -> Fleet:
    """The fleet a *validated* inventory describes on this host."""
    images = {n: resolved_image(s, base_dir) for n, s in {**BUILTIN_IMAGES,
                                                          **inv.images}.items()}
    for n, s in images.items():            # a guest's disk as a template: boots as it did
        if s.from_:
            src = inv.guests.get(s.from_.split("@")[0])
            if src is not None:
                images[n] = clone_image(s, images[src.image], state_dir)
    allocated = allocate_addresses(inv.instance, dict(inv.networks), dict(inv.guests),
                                   previous_allocations(state_dir))
    guests = {}
    for name, g in inv.guests.items():
        img = images[g.image]
        dev = guest_devices(g, img, os_defaults(g.os or img.os))
        nics = []
        for i, nic in enumerate(g.nics):
            net = inv.networks[nic.network]
            auto = allocated.get((name, i))
            nics.append(NicIntent(network=nic.network,
                                  mac=nic.mac or derive_mac(inv.instance, name, i),
                                  ip=nic_address(nic.ip) or auto, allocated=bool(auto),
                                  prefix=net.subnet.prefixlen,
                                  gateway=nic_address(net.gateway),
                                  model=dev["nic_models"][i], rate=nic.rate,
                                  burst=nic.burst))
        del dev["nic_models"]
        if g.cdrom:
            dev["cdrom"] = str(resolve_path(g.cdrom, base_dir).resolve())
        disks = tuple(DiskIntent(name=d.name or f"data{i}", size=d.size,
                                 bus=d.bus or dev["disk_bus"], io=_limits(d.io))
                      for i, d in enumerate(g.disks))
        mem = g.memory
        guests[name] = GuestIntent(
            name=name, image=g.image, image_spec=img, vcpus=g.vcpus, cpu=g.cpu,
            memory=mem.model_copy(update={"min": mem.max if mem.min is None else mem.min}),
            nics=tuple(nics), restart=g.restart, autostart=g.autostart, labels=g.labels,
            disks=disks, disk_io=_limits(g.disk_io), io=g.io,
            cloud_init=_user_data(g, base_dir), backup=g.backup,
            ready_timeout=g.ready_timeout or (600.0 if dev["firmware"] else 90.0), **dev)
    return Fleet(instance=inv.instance, host=inv.host, budget=budget(inv.host, facts),
                 usable_cpus=max(usable_cpus(inv.host, facts), 0.0),
                 image_roots=image_roots(inv.host, base_dir, state_dir), images=images,
                 networks=dict(inv.networks), guests=guests)


def previous_allocations(state_dir: Path | None) -> dict[tuple[str, int], str]:
    """The addresses consolidator chose for NICs in the fleet last applied here."""
    if state_dir is None:
        return {}
    try:
        fleet = json.loads((Path(state_dir) / "applied.json").read_text())["fleet"]
        return {(g, i): n["ip"] for g, spec in fleet["guests"].items()
                for i, n in enumerate(spec["nics"]) if n.get("allocated") and n.get("ip")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _limits(io: DiskIo | None) -> DiskIo | None:
    """``io: {}`` limits nothing: the same as none, so writing it changes nothing."""
    return None if io is None or io.empty else io


def _user_data(g: GuestSpec, base_dir: Path) -> str | None:
    """What the seed carries; a seed with no user-data still names and addresses it."""
    if g.cloud_init is None:
        return None
    return user_data_text(g, base_dir) or "#cloud-config\n{}\n"


def parse_fleet(text: str, file: str, facts: HostFacts, base_dir: Path | None = None,
                state_dir: Path | None = None) -> Fleet:
    """Validate inventory ``text`` (named ``file`` in errors) and resolve it. ``state_dir``:
    whose image cache is an image root by default."""
    base = base_dir or Path(".")
    return resolve(validate(text, file, facts, base, state_dir), facts, base, state_dir)


def load_fleet(path: str | os.PathLike[str], facts: HostFacts | None = None,
               state_dir: Path | None = None) -> Fleet:
    """Read, validate and resolve an inventory file. Raises InventoryError."""
    facts = facts or HostFacts.probe()
    return resolve(load_inventory(path, facts, state_dir), facts, Path(path).parent,
                   state_dir)
