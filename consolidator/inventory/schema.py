"""The inventory schema (pydantic v2). Structural checks only.

Checks that need more than one field or the host (min <= max, IPs in their
subnet, references between sections, files, capacity) live in
:mod:`consolidator.inventory.checks` so that every error is reported at once,
each at its own place. The JSON Schema (``consolidator schema``) is generated
from these models.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      WithJsonSchema)

from ..units import (DNS_LABEL_RE, format_duration, format_rate, format_size, parse_duration,
                     parse_rate, parse_size)

INSTANCE_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KMGTP](iB)?|B)?\s*$"


def _size(v: Any) -> int:
    return parse_size(v)


def _duration(v: Any) -> float:
    return parse_duration(v)


Size = Annotated[
    int,
    BeforeValidator(_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                              {"type": "string", "pattern": SIZE_PATTERN}],
                    "description": "bytes, or a binary size: 512MiB, 1GiB, 1G, 1024M"}),
]
Duration = Annotated[
    float,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0},
                              {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"}],
                    "description": "seconds, or 500ms, 1s, 2m, 1h"}),
]

Rate = Annotated[
    int,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1},
                              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*"
                               r"([KMGT]?bit|[KMGT](iB)?/s|B/s)?\s*$"}],
                    "description": "bytes per second, bits (100Mbit, 1Gbit: decimal) or "
                                   "bytes a second (10MiB/s: binary)"}),
]


def _iops(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected a number of operations per second, got {v!r}")
    if v <= 0:
        raise ValueError(f"{v} operations a second lets nothing through; leave the limit "
                         "out for none")
    return v


Iops = Annotated[int, BeforeValidator(_iops),
                 WithJsonSchema({"type": "integer", "minimum": 1,
                                 "description": "operations per second"})]


def _listen(v: Any) -> str:
    """``127.0.0.1:9477``, ``[::1]:9477``, ``0.0.0.0:9477`` -> normalised ``host:port``."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = f"127.0.0.1:{v}"
    if not isinstance(v, str):
        raise ValueError("expected host:port, such as 127.0.0.1:9477")
    host, sep, port = v.strip().rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"{v!r}: expected an IP address and a port, such as "
                         "127.0.0.1:9477") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{v!r}: the port must be 1-65535")
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


Listen = Annotated[str, BeforeValidator(_listen),
                   WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^.+:\d+$"},
                                             {"type": "integer"}],
                                   "description": "IP:port, or a port on 127.0.0.1"})]


def _cpulist(v: Any) -> tuple[int, ...] | None:
    """``"0-2,5"``, ``3`` or ``[0, 1]`` -> sorted unique tuple of CPU numbers."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError("expected a CPU list such as '0-1,3' or [0, 1]")
    if isinstance(v, int):
        v = [v]
    if isinstance(v, str):
        cpus: set[int] = set()
        for part in v.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"cannot parse CPU list {v!r}: expected e.g. '0-1,3'")
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo:
                raise ValueError(f"CPU range {part!r} runs backwards")
            cpus.update(range(lo, hi + 1))
        return tuple(sorted(cpus))
    if isinstance(v, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v):
            raise ValueError("a CPU list holds non-negative integers")
        if not v:
            raise ValueError("an empty CPU list pins to nothing; leave pin out instead")
        return tuple(sorted(set(v)))
    raise ValueError("expected a CPU list such as '0-1,3' or [0, 1]")


def format_cpulist(cpus: tuple[int, ...]) -> str:
    runs: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        runs.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(runs)


CpuList = Annotated[
    tuple[int, ...] | None,
    BeforeValidator(_cpulist),
    PlainSerializer(lambda v: format_cpulist(v) if v else None, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\d+(-\d+)?(,\d+(-\d+)?)*$"},
                              {"type": "array", "items": {"type": "integer", "minimum": 0}},
                              {"type": "integer", "minimum": 0}, {"type": "null"}],
                    "description": "host CPUs, as '0-1,3' or a list"}),
]


def _mac(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError("a MAC address is a string such as 52:54:00:12:34:56")
    s = v.strip().lower().replace("-", ":")
    if not MAC_RE.match(s):
        raise ValueError(f"{v!r} is not a MAC address such as 52:54:00:12:34:56")
    return s


Mac = Annotated[str | None, BeforeValidator(_mac),
                WithJsonSchema({"anyOf": [{"type": "string", "pattern": MAC_RE.pattern},
                                          {"type": "null"}]})]


def _network(v: Any) -> ipaddress.IPv4Network:
    if isinstance(v, ipaddress.IPv4Network):
        return v
    if not isinstance(v, str):
        raise ValueError("a subnet is a string such as 10.77.0.0/24")
    try:
        net = ipaddress.ip_network(v.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not a subnet such as 10.77.0.0/24") from None
    if net.version != 4:
        raise ValueError("only IPv4 subnets are supported")
    if "/" not in v:
        raise ValueError(f"{v!r} has no prefix length; write e.g. {v}/24")
    if net.network_address != ipaddress.ip_interface(v.strip()).ip:
        raise ValueError(f"{v!r} has host bits set; did you mean {net}?")
    return net  # type: ignore[return-value]


Subnet = Annotated[ipaddress.IPv4Network, BeforeValidator(_network),
                   PlainSerializer(str, return_type=str),
                   WithJsonSchema({"type": "string", "format": "ipv4-network"})]


def _addr(v: Any) -> str | None:
    """Keep the text (``10.0.0.5`` or ``10.0.0.5/24``): checks need the prefix if given."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError("an address is a string such as 10.77.0.10")
    try:
        iface = ipaddress.ip_interface(v.strip())
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None
    if iface.version != 4:
        raise ValueError("only IPv4 addresses are supported")
    return v.strip()


Address = Annotated[str | None, BeforeValidator(_addr),
                    WithJsonSchema({"anyOf": [{"type": "string", "format": "ipv4"},
                                              {"type": "null"}]})]

Cores = Annotated[float, Field(ge=0, le=4096)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              ser_json_inf_nan="strings")


# ----------------------------------------------------------------------------- host

class HostReserve(_Model):
    """What the host keeps for itself; guests are never promised it."""

    cpus: Cores = Field(0.5, description="cores kept for the host")
    memory: Size = Field(1 << 30, description="RAM kept for the host")


class Overcommit(_Model):
    cpus: float = Field(4.0, gt=0, le=64,
                        description="vCPUs allowed per usable core (cores minus reserve)")
    memory: float = Field(1.5, gt=0, le=16,
                          description="sum of memory.max allowed per byte of guest budget")


class Rebalance(_Model):
    enabled: bool = Field(True, description="false: static settings; guests are still "
                                            "observed and their history recorded")
    interval: Duration = Field(1.0, description="how often the rebalancer observes and decides")


class RestartLimits(_Model):
    """How guests with restart: always / on-failure are brought back."""

    max: int = Field(5, ge=1, le=1000, description="restarts allowed within the window")
    window: Duration = Field(300.0, description="sliding window for counting restarts")
    backoff_max: Duration = Field(60.0, description="longest wait before a restart")


class HistoryRetention(_Model):
    """How long the history database keeps each resolution."""

    raw: Duration = Field(3600.0, description="raw samples (one per rebalancer interval)")
    minute: Duration = Field(7 * 86400.0, description="per-minute aggregates")
    hour: Duration = Field(90 * 86400.0, description="per-hour aggregates")


class Metrics(_Model):
    enabled: bool = True
    listen: Listen = Field("127.0.0.1:9477",
                           description="Prometheus endpoint, IP:port (a bare port: on "
                                       "127.0.0.1); loopback unless public is true")
    public: bool = Field(False, description="allow a listen address off loopback: the "
                                            "figures name every guest and its load")


class HostBackup(_Model):
    dir: str | None = Field(
        None, description="where backups are written (absolute; another disk or a mount "
                          "is best); default <state>/backups")


class GuestIds(_Model):
    """The uids (and gids of the same numbers) the supervisor hands to guests' QEMUs."""

    first: int = Field(0x70000000, ge=1000, le=0xFFFFFFFE,
                       description="first uid of the range (default 1879048192, above "
                                   "every range systemd documents)")
    count: int = Field(65536, ge=1, le=1 << 24, description="how many uids the range holds")



class Uefi(_Model):
    """The OVMF build UEFI guests boot: its code (read-only, shared) and the variable store
    template each guest copies once."""

    code: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    vars: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"


class HostIo(_Model):
    """The host's disk budget, divided by io.shares among the guests doing I/O."""

    bps: Literal["auto"] | Rate | None = Field(
        "auto", description="bytes a second the guests' disks may move in all; auto: "
                            "what consolidator doctor --measure-io measured (none until "
                            "it has); null: no budget")
    iops: Literal["auto"] | Iops | None = Field(
        "auto", description="operations a second, as bps")


def _on_off(v: Any) -> Any:
    # YAML 1.1 reads a bare on/off as a boolean: `ksm: off` is false
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


OnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


class HostSpec(_Model):
    reserve: HostReserve = HostReserve()
    memory: Literal["auto"] | Size = Field(
        "auto", description="guest memory budget: auto = RAM minus reserve, or a size")
    overcommit: Overcommit = Overcommit()
    rebalance: Rebalance = Rebalance()
    fabric_netns: str | None = Field(
        None, description="netns holding the bridges; null = the host's root netns")
    runas: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] | None = Field(
        None, description="null: each guest's QEMU runs as a uid of its own from guest_ids, "
                          "jailed; a user name: every guest's QEMU runs as that user; root: "
                          "QEMU keeps root (warned about: a guest that escapes QEMU owns the "
                          "host)")
    guest_ids: GuestIds = GuestIds()
    api_group: str | None = Field(
        None, description="a group whose members may read status, logs and report through "
                          "the supervisor's socket; null: root only")
    image_roots: list[str] = Field(
        default_factory=list, description="directories kernels, initrds and disks may come "
        "from (relative to the inventory); empty: the inventory's directory and the state "
        "dir's images")
    cgroup_parent: str | None = Field(
        None, description="cgroup below which guests go; default: the supervisor's own")
    concurrency: int | Literal["auto"] = Field(
        "auto", description="guests in their host-side start work at once (wiring to "
                            "spawn); auto = host cores; QEMUs then start in parallel")
    restart: RestartLimits = RestartLimits()
    uefi: Uefi = Uefi()
    history: HistoryRetention = HistoryRetention()
    metrics: Metrics = Metrics()
    backup: HostBackup = HostBackup()
    io: HostIo = HostIo()
    ksm: OnOff = Field(
        "auto", description="same-page merging: auto = tuned by memory pressure and what "
                            "it saves; on = always, tuned; off = the host's settings are "
                            "left alone")


# --------------------------------------------------------------------------- images

Firmware = Literal["bios", "uefi"]
DiskBus = Literal["virtio", "scsi", "sata", "ide"]
NicModel = Literal["virtio", "e1000", "rtl8139"]
OsId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
CLONE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?@[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
READY_RE = re.compile(r"^(auto|agent|none|tcp:\d{1,5}|serial:.+)$", re.S)



class ImageSpec(_Model):
    """One of: ``builtin: tiny``; ``kernel`` (+ ``initrd``, ``cmdline``); ``disk``; or
    ``from`` (a guest's disk as a template, booted as that guest boots).

    ``builtin`` may take a ``kernel`` override. ``disk`` may be combined with a
    direct-boot ``kernel`` or with ``builtin`` (the tiny init mounts the disk as root).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              ser_json_inf_nan="strings", populate_by_name=True)

    builtin: Literal["tiny"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disk: str | None = None
    format: Literal["qcow2", "raw"] | None = None
    cdrom: str | None = Field(None, description="an ISO (read-only); alone, or install media "
                                                "beside a disk")
    firmware: Firmware | None = Field(None, description="bios or uefi, for guests booting "
                                                        "the disk or the cdrom; default: the "
                                                        "OS profile's, else bios")
    os: OsId | None = Field(None, description="libosinfo short id of the OS on the disk "
                                              "(debian12, centos7, winxp): its device "
                                              "defaults; a guest's own os wins")
    pvm: bool = Field(False, description="the kernel is known to boot under PVM KVM")
    from_: Annotated[str, Field(pattern=CLONE_RE.pattern)] | None = Field(
        None, alias="from", description="GUEST@SNAPSHOT or GUEST@BACKUP: that guest's "
        "disk as it was then, as a template its guests get linked clones of (an overlay "
        "each); they boot as that guest did")


# ------------------------------------------------------------------------- networks

class NetworkSpec(_Model):
    subnet: Subnet
    gateway: Address = Field(
        None, description="host-side address on the bridge; none = isolated from the host")
    nat: bool = Field(False, description="masquerade the subnet towards the default route")
    forward_to: list[str] = Field(
        default_factory=list, description="networks its guests may open connections to, "
        "routed by the host (both need a gateway); nothing else crosses between networks")
    dhcp: bool = Field(True, description="DHCP (static leases: each NIC's declared address) "
                                         "and DNS (guests by name) from a dnsmasq of its "
                                         "own; isolated networks get it at their last "
                                         "address, which guests may not use")


# --------------------------------------------------------------------------- guests

class CpuSpec(_Model):
    shares: int = Field(1024, ge=2, le=262144, description="relative weight (cgroup v1 units)")
    reserve: Cores = Field(0.0, description="cores guaranteed under contention")
    limit: Annotated[float, Field(gt=0, le=4096)] | None = Field(
        None, description="hard cap in cores")
    pin: CpuList = None
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(
        None, description="QEMU CPU model (qemu64, Nehalem, ...); default: host under "
                          "hardware KVM, else qemu64")


class MemorySpec(_Model):
    max: Size = Field(256 << 20, description="guest RAM; the balloon never gives more")
    min: Size | None = Field(None, description="floor the balloon never goes under; "
                                               "default: max (no ballooning)")
    shares: int = Field(1000, ge=0, le=50000, description="weight when memory is short")
    merge: bool = Field(True, description="false: KSM never merges this guest's memory "
                                          "(for guests that handle secrets: merging opens "
                                          "a timing side channel between guests)")


class IoSpec(_Model):
    shares: int = Field(1000, ge=1, le=10000,
                        description="weight of the guest's disks in the host budget "
                                    "(host.io) while they are busy")


class DiskIo(_Model):
    """Limits of one disk, each a ceiling (QEMU throttling, changed live). ``bps`` limits
    reads and writes together; ``read_bps``/``write_bps`` each direction instead."""

    iops: Iops | None = Field(None, description="operations a second")
    bps: Rate | None = Field(None, description="bytes a second, read and written")
    read_bps: Rate | None = Field(None, description="bytes a second read")
    write_bps: Rate | None = Field(None, description="bytes a second written")
    burst: Size | None = Field(None, description="bytes that may go at once, faster than "
                                                 "the limits, after a quiet spell; at "
                                                 "least one second of the largest")

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.iops, self.bps, self.read_bps, self.write_bps))


class NicSpec(_Model):
    network: str
    ip: Address = None
    mac: Mac = None
    model: NicModel | None = Field(None, description="virtio, or e1000/rtl8139 for an OS "
                                                     "without virtio; default: the OS "
                                                     "profile's, else virtio")
    rate: Rate | None = Field(None, description="ceiling in each direction (to the guest "
                                                "and from it), tc on the guest's links; "
                                                "changed live")
    burst: Size | None = Field(None, description="bytes that may go at once above the "
                                                 "rate; at least one second of it")


class DataDisk(_Model):
    """A disk of the guest's own: a qcow2 in the state dir, kept until --purge."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,19}$")] | None = Field(
        None, description="default data<i>; the guest sees it as serial <name> "
                          "(/dev/disk/by-id/*-<name>)")
    size: Size = Field(description="virtual size; growing it is a live change, shrinking "
                                   "is refused")
    bus: DiskBus | None = Field(None, description="default: the guest's disk_bus")
    io: DiskIo | None = Field(None, description="limits (changed live)")


class CloudInit(_Model):
    """A NoCloud seed (an ISO labelled cidata): meta-data (instance-id, hostname = the
    guest's name), network-config from the inventory, and this user-data."""

    user_data: str | dict[str, Any] | None = Field(
        None, description="a file (relative to the inventory), or the #cloud-config "
                          "itself as a mapping")


class BackupKeep(_Model):
    """Which backups pruning keeps (as Proxmox's keep-last/daily/weekly); the newest
    is always kept."""

    last: int = Field(7, ge=0, le=10000, description="the newest N")
    daily: int = Field(7, ge=0, le=10000, description="the newest of each of N days")
    weekly: int = Field(4, ge=0, le=10000, description="the newest of each of N ISO weeks")


class BackupPolicy(_Model):
    every: Duration | None = Field(
        None, description="the supervisor backs the guest up this often (24h); none: "
                          "only by hand (consolidator backup)")
    keep: BackupKeep = BackupKeep()


class GuestSpec(_Model):
    image: str = "tiny"
    vcpus: int = Field(1, ge=1, le=255)
    cpu: CpuSpec = CpuSpec()
    memory: MemorySpec = MemorySpec()
    nics: list[NicSpec] = Field(default_factory=list)
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    autostart: bool = True
    labels: dict[str, str] = Field(default_factory=dict)
    os: OsId | None = Field(None, description="libosinfo short id (debian12, centos7, "
                                              "winxp): device defaults for that OS")
    firmware: Firmware | None = Field(None, description="bios or uefi (OVMF, with a "
                                                        "variable store of the guest's own)")
    machine: Literal["pc", "q35"] | None = Field(
        None, description="default: the OS profile's; else q35 for uefi, pc for bios; a "
                          "kernel-booted guest gets microvm where it boots reliably")
    disk_bus: DiskBus | None = Field(None, description="bus of the image's disk (and the "
                                                       "default of data disks)")
    display: Literal["none", "vga"] | None = Field(
        None, description="vga: a screen, served as VNC on a unix socket (consolidator "
                          "vnc, screenshot)")
    rtc: Literal["utc", "localtime"] | None = Field(None, description="the guest's clock; "
                                                    "Windows expects localtime")
    cdrom: str | None = Field(None, description="an ISO for this guest (install media), "
                                                "read-only")
    boot: list[Literal["cdrom", "disk"]] | None = Field(
        None, description="boot order; default [disk, cdrom]: an empty disk falls through "
                          "to the cdrom")
    disk_io: DiskIo | None = Field(None, description="limits of the image's disk (changed "
                                                     "live)")
    disks: list[DataDisk] = Field(default_factory=list)
    io: IoSpec = IoSpec()
    cloud_init: CloudInit | None = Field(None, description="attach a cloud-init NoCloud seed")
    backup: BackupPolicy | None = Field(
        None, description="scheduled backups and their retention (host.backup.dir)")
    ready_timeout: Duration | None = Field(
        None, description="how long a start may take to be ready; default 90s for the tiny "
                          "image and kernels, 10m for disk and cdrom boots (a real OS "
                          "under TCG takes minutes)")
    ready: Annotated[str, Field(pattern=READY_RE.pattern)] = Field(
        "auto", description="when the guest counts as up: agent (the QEMU guest agent "
                            "answers), tcp:PORT, serial:REGEX, none; auto: the tiny image's "
                            "READY line, else the agent")


# ------------------------------------------------------------------------ inventory

class Inventory(_Model):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"title": "consolidator inventory"})

    version: Literal[1] = 1
    instance: str = Field("cns", description="prefix of every kernel object; 1-8 of [a-z0-9]")
    host: HostSpec = HostSpec()
    images: dict[str, ImageSpec] = Field(default_factory=dict)
    networks: dict[str, NetworkSpec] = Field(default_factory=dict)
    guests: dict[str, GuestSpec] = Field(default_factory=dict)


BUILTIN_IMAGES: dict[str, ImageSpec] = {"tiny": ImageSpec(builtin="tiny")}


def json_schema() -> dict[str, Any]:
    schema = Inventory.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    for section in ("images", "networks", "guests"):
        schema["properties"][section]["propertyNames"] = {"pattern": DNS_LABEL_RE.pattern}
    schema["properties"]["instance"]["pattern"] = INSTANCE_RE.pattern
    return schema
