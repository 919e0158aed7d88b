"""The QEMU command line, built by pure functions: launch spec in, argv out.

Choices, each measured on the development hosts (PVM KVM, so TCG; see the README's
performance section and tools/bench/boot.py):

- **Machine.** ``microvm`` boots fastest, alone and 8 at once (12.5 s for all 8 vs 14.3 s
  on ``pc``). Under TCG it used to hang at random: the kernel's quick PIT calibration of
  the TSC fails when emulated PIT reads are slow, and microvm has no HPET or ACPI PM
  timer to fall back on, so the kernel logs "could not calculate TSC khz" and spins.
  Under TCG the guest TSC *is* the host TSC, so we pass the host's rate as
  ``tsc_early_khz`` and calibration is skipped. For the same reason the guest is told the
  TSC is reliable (``tsc=reliable``): when eight TCG guests boot at once on two cores, a
  vCPU is often descheduled between the clocksource watchdog's two reads, the watchdog
  then marks the TSC unstable and the guest falls back to jiffies, which microvm's lack of
  HPET makes final: no high-resolution timers, a tick at HZ, 2.2 % of a host core per idle
  guest instead of 0.4 % (6 of 8 guests of one cold apply, measured 2026-12-03).
  Without a known, constant host TSC rate,
  or for firmware (disk) boot, the machine is ``pc``. Under KVM, microvm is used (the
  guest has kvmclock).
- **CPU.** ``host`` under hardware KVM, else ``qemu64,+arat``: without ARAT an idle
  microvm guest ticks at HZ (see :func:`cpu_model`).
- **Accelerator.** See :mod:`consolidator.vm.accel`. TCG gets a bounded translation
  cache (``tb-size``), which is most of QEMU's RSS otherwise.
- **Escaping.** Every value that goes into a ``key=value,...`` option (names, paths,
  MACs, tap names) passes through :func:`opt_value`, which doubles commas as QEMU's
  option parser requires; no value, whatever its bytes, can add an option.
- **Devices.** ``-nodefaults``; virtio-balloon with ``deflate-on-oom`` and
  ``free-page-reporting``; virtio-net per NIC on a pre-made tap; a virtio-serial port
  ``org.consolidator.agent``; pvpanic with ``-action panic=exit-failure`` so a guest
  panic is a QEMU exit the supervisor sees; the serial console on a socket with a
  logfile; QMP on a unix socket; seccomp sandbox.
- **Nothing by path.** QEMU runs as an unprivileged uid in a jail (see
  :mod:`consolidator.vm.jail`) that holds no file of the guest's. Every file and socket it
  uses is opened by the supervisor and passed as a descriptor (:class:`Handles`): the
  sockets are bound and listening (``fd=``), the serial log and each disk layer go
  through fd sets (``-add-fd``, ``/dev/fdset/N``), the disk chain is spelt out node by
  node with ``-blockdev`` (so QEMU never follows a backing file name), the kernel and
  initrd are ``/proc/self/fd/N``, taps (and vhost) are ``fd=``. So QEMU needs no right on
  any path, and the argv names no path a value could bend.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import throttle
from .accel import Accel

DEFAULT_TB_SIZE_MIB = 64
# QEMU starts with its final credentials (the supervisor drops them before exec), so
# set*id stays denied: an escaped QEMU cannot regain root even where a setuid helper is
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SERIAL_FDSET = 1
UEFI_FDSET = 2                  # code 2, variable store 3
CDROM_FDSET = 4
SEED_FDSET = 5
DISK_FDSET = 10                 # disk layer i is fd set DISK_FDSET + i
DATA_FDSET = 40                 # data disk i is fd set DATA_FDSET + i
AGENT_PORT = "org.consolidator.agent"
QGA_PORT = "org.qemu.guest_agent.0"
NIC_DEVICES = {"e1000": "e1000", "rtl8139": "rtl8139"}      # virtio: per transport
HYPERV = "hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_time"


@dataclass(frozen=True)
class Machine:
    name: str           # "microvm", "pc" (or "q35", for comparisons)
    reason: str

    @property
    def virtio(self) -> str:
        """The virtio transport suffix: MMIO on microvm, PCI elsewhere."""
        return "device" if self.name == "microvm" else "pci"


def choose_machine(accel: Accel, *, tsc_khz: int | None, firmware_boot: bool,
                   wanted: str | None = None, legacy_devices: bool = False) -> Machine:
    """Pure: the inventory's machine (or its OS profile's) if it names one; else microvm
    where it boots reliably, pc otherwise."""
    if wanted:
        return Machine(wanted, f"{wanted}: the inventory's (or its OS profile's) choice")
    if firmware_boot:
        return Machine("pc", "pc: the image boots through firmware from its disk")
    if legacy_devices:
        return Machine("pc", "pc: the guest has devices microvm lacks (an emulated disk "
                             "bus, NIC or screen)")
    if accel.name == "kvm":
        return Machine("microvm", "microvm: fastest boot; KVM gives the guest kvmclock")
    if tsc_khz:
        return Machine("microvm", f"microvm: fastest boot under TCG; host TSC {tsc_khz} kHz "
                                  "passed as tsc_early_khz so calibration cannot hang")
    return Machine("pc", "pc: the host TSC rate is unknown, and microvm under TCG hangs "
                         "calibrating the TSC without it")


@dataclass(frozen=True)
class RunPaths:
    """Where a guest's runtime files live. ``dir`` is 0700 and holds only sockets and pids."""

    dir: Path
    serial_log: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def pidfile(self) -> Path:
        """Written by the supervisor after the spawn (QEMU could not write it: no path)."""
        return self.dir / "qemu.pid"

    @property
    def stderr(self) -> Path:
        return self.dir / "qemu.stderr"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def vnc(self) -> Path:
        """The screen, VNC: the supervisor listens and hands each connection to QEMU."""
        return self.dir / "vnc.sock"

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp, self.console, self.agent, self.vnc)

    @classmethod
    def for_guest(cls, guest_dir: Path) -> "RunPaths":
        return cls(guest_dir / "run", guest_dir / "serial.log")


@dataclass(frozen=True)
class Boot:
    kernel: str | None
    initrd: str | None
    cmdline: str = ""              # the image's own cmdline, appended
    disk: str | None = None        # the guest's overlay (or raw disk)
    disk_format: str = "qcow2"
    builtin: bool = False          # the tiny image: consolidator.* params, READY on serial
    # the disk's chain as read when it was checked: (path, format), the overlay first
    chain: tuple[tuple[str, str], ...] = ()
    firmware: str | None = None    # bios | uefi: boots through firmware (disk or cdrom)
    uefi_code: str | None = None   # OVMF's code, shared and read-only
    uefi_vars: str | None = None   # the guest's own copy of the variable store
    cdrom: str | None = None       # an ISO, read-only
    data: tuple["DataDisk", ...] = ()
    seed: str | None = None        # the cloud-init NoCloud seed (an ISO), read-only


@dataclass(frozen=True)
class DataDisk:
    name: str                      # also the device's serial: /dev/disk/by-id/*-<name>
    path: str                      # a qcow2 of the guest's own
    bus: str


@dataclass(frozen=True)
class TapNic:
    tap: str                       # the tap interface name inside the guest's netns
    mac: str
    cidr: str | None = None        # address/prefix the guest configures
    gateway: str | None = None
    model: str = "virtio"


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    vcpus: int
    memory_mib: int
    boot: Boot
    paths: RunPaths
    accel: Accel
    machine: Machine
    nics: tuple[TapNic, ...] = ()
    tsc_khz: int | None = None
    pvm_host: bool = False         # KVM here is PVM: no -cpu host
    uuid: str | None = None        # the SMBIOS uuid; also how a restarted supervisor knows it
    tb_size_mib: int = DEFAULT_TB_SIZE_MIB
    vhost: bool = False
    disk_bus: str = "virtio"
    display: str = "none"          # none | vga
    rtc: str = "utc"               # utc | localtime
    cpu_model: str | None = None   # the inventory's; None: cpu_model() decides
    hyperv: bool = False           # Hyper-V enlightenments, under KVM
    boot_order: tuple[str, ...] = ()   # of "disk", "cdrom"
    mem_merge: bool = True         # False: guest RAM is never offered to KSM
    # each drive's own limits (vm/throttle.py), by drive node; None: no throttle nodes at
    # all (the bench's baseline), so no limit can be set live
    limits: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] | None = ()
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def agent_port(self) -> str:
        """The tiny image runs consolidator's agent; every other guest qemu-ga."""
        return AGENT_PORT if self.boot.builtin else QGA_PORT


@dataclass(frozen=True)
class DiskLayer:
    fd: int
    format: str                    # as qemu-img detected it: raw, qcow2


@dataclass(frozen=True)
class Handles:
    """Descriptors the supervisor opened for QEMU (numbers as QEMU will see them)."""

    qmp: int
    console: int
    agent: int
    serial_log: int
    kernel: int | None = None
    initrd: int | None = None
    disk: tuple[DiskLayer, ...] = ()   # the guest's overlay first, then its backing chain
    taps: tuple[int, ...] = ()         # one per NIC
    vhost: tuple[int, ...] = ()        # one per NIC, or none
    uefi_code: int | None = None
    uefi_vars: int | None = None
    cdrom: int | None = None
    data: tuple[int, ...] = ()         # one per data disk
    seed: int | None = None

    def fds(self) -> tuple[int, ...]:
        one = (self.qmp, self.console, self.agent, self.serial_log, self.kernel, self.initrd,
               self.uefi_code, self.uefi_vars, self.cdrom, self.seed)
        return tuple(f for f in one if f is not None) + \
            tuple(d.fd for d in self.disk) + self.taps + self.vhost + self.data


def guest_uuid(guest_dir: Path) -> str:
    """A guest's stable UUID: the same for its directory (state dir and name) always."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"consolidator:{guest_dir}"))


def opt_value(value: object) -> str:
    """A value for QEMU's ``key=value,...`` options: a comma is written twice."""
    return str(value).replace(",", ",,")


def name_option(name: str) -> str:
    """``-name``'s value. The guest's name goes under its key: in the implied first
    position a name holding '=' would be read as a key of its own."""
    return f"guest={opt_value(name)},debug-threads=on"


def kernel_cmdline(spec: LaunchSpec) -> str:
    """Pure: the guest kernel command line."""
    # ttyS0 always: the serial log and console depend on it. A user's own console= comes
    # later in the line and so becomes /dev/console for their kernel (the inventory
    # refuses it on the builtin image, whose READY line must reach ttyS0)
    parts: list[str] = ["console=ttyS0"]
    if spec.boot.builtin:
        parts += ["quiet", "panic=-1", f"consolidator.name={spec.name}"]
        for i, nic in enumerate(spec.nics):
            parts.append(f"consolidator.net{i}={nic.mac},{nic.cidr or ''},{nic.gateway or ''}")
        if spec.boot.disk:
            parts.append("consolidator.root=/dev/vda")
    if spec.machine.name == "microvm":
        parts.append("pci=off")
        if spec.accel.name == "tcg" and spec.tsc_khz:
            # the guest TSC is the host's constant TSC: its rate is known, and it is
            # trusted (tsc=reliable), see the module docstring
            parts += [f"tsc_early_khz={spec.tsc_khz}", "tsc=reliable"]
    if spec.boot.cmdline:
        parts.append(spec.boot.cmdline)
    return " ".join(parts)


def cpu_model(spec: LaunchSpec) -> str:
    """Pure: ``host`` under hardware KVM; elsewhere QEMU's default model with ARAT.

    ARAT (the APIC timer keeps running in deep C-states) is what lets an idle guest stop
    ticking. Without it Linux marks the local APIC timer C3STOP and needs a broadcast
    timer for one-shot mode; microvm has none (no HPET, no PIT clockevent), so the guest
    never enters high-resolution or tickless mode and takes HZ (250) timer interrupts a
    second, each emulated: 2.2 % of a host core per idle TCG guest against 0.4 % with ARAT
    (measured here). QEMU's APIC timer is a host timer, so ARAT is true of it."""
    if spec.cpu_model:
        model = opt_value(spec.cpu_model)
    elif spec.accel.name == "kvm" and not spec.pvm_host:
        model = "host"
    else:
        model = "qemu64,+arat"
    if spec.hyperv and spec.accel.name == "kvm":
        model += "," + HYPERV
    return model


def _node(fd: int, fdset: int, node: str, driver: str, *, read_only: bool,
          backing: str | None = None) -> list[str]:
    """Pure: a file on an fd set and its format node (``node``) on top."""
    extra = ",read-only=on" if read_only else ",discard=unmap"
    fmt = f"driver={opt_value(driver)},node-name={node},file={node}-file{extra}"
    if backing:
        fmt += f",backing={backing}"
    return ["-add-fd", f"fd={fd},set={fdset}",
            "-blockdev", f"driver=file,node-name={node}-file,filename=/dev/fdset/{fdset}{extra}",
            "-blockdev", fmt]


def disk_args(layers: tuple[DiskLayer, ...]) -> list[str]:
    """Pure: the disk as a chain of ``-blockdev`` nodes on fd sets, the base first (a node
    must exist before the node that names it as its backing). Layers below the top are
    read-only. The device that shows node ``disk0`` to the guest is added by :class:`Bays`."""
    argv: list[str] = []
    # disk0 and data-<name>: the nodes GuestIntent.drives() names (spelt out here, to keep
    # this module free of the model's imports; tests/unit/test_realos.py holds them equal)
    node = ["disk0" if i == 0 else f"disk0-b{i}" for i in range(len(layers))]
    for i in reversed(range(len(layers))):
        argv += _node(layers[i].fd, DISK_FDSET + i, node[i], layers[i].format,
                      read_only=i > 0, backing=node[i + 1] if i + 1 < len(layers) else None)
    return argv


class Bays:
    """Pure: where each disk and cdrom plugs in, adding controllers on first use.

    virtio: a virtio-blk device of its own. scsi: one virtio-scsi controller. sata: the
    q35's built-in AHCI (ports ide.0-5), or an AHCI controller added to pc. ide: the pc's
    PIIX IDE (two buses, two units each); q35 has none (validation refuses it)."""

    def __init__(self, machine: str, virtio: str) -> None:
        self.machine, self.virtio = machine, virtio
        self.argv: list[str] = []
        self._scsi = self._ahci = False
        self._port = 0
        self._ide = [(0, 0), (0, 1), (1, 0), (1, 1)]

    def attach(self, bus: str, drive: str, *, cdrom: bool = False, serial: str | None = None,
               bootindex: int | None = None) -> None:
        opts = f"drive={drive}"
        if serial:
            opts += f",serial={opt_value(serial)}"
        if bootindex is not None:
            opts += f",bootindex={bootindex}"
        kind = "cd" if cdrom else "hd"
        if bus == "virtio" and not cdrom:
            self.argv += ["-device", f"virtio-blk-{self.virtio},{opts}"]
        elif bus == "scsi":
            if not self._scsi:
                self.argv += ["-device", f"virtio-scsi-{self.virtio},id=scsi0"]
                self._scsi = True
            self.argv += ["-device", f"scsi-{kind},bus=scsi0.0,{opts}"]
        elif bus == "ide" and self.machine == "pc" and self._ide:
            b, unit = self._ide.pop(0)
            self.argv += ["-device", f"ide-{kind},bus=ide.{b},unit={unit},{opts}"]
        else:                                           # sata (and a cdrom on q35)
            if self.machine == "q35":
                port = f"ide.{self._port}"
            else:
                if not self._ahci:
                    self.argv += ["-device", "ahci,id=ahci0"]
                    self._ahci = True
                port = f"ahci0.{self._port}"
            if self._port >= 6:
                raise ValueError("more than 6 SATA devices")
            self._port += 1
            self.argv += ["-device", f"ide-{kind},bus={port},{opts}"]


def throttle_args(drive: str, limits: dict[str, int]) -> list[str]:
    """Pure: ``drive``'s own throttle group and the two filter nodes over it (see
    :mod:`.throttle`); the guest's group is made once, by :func:`storage_args`."""
    return ["-object", throttle.object_arg(throttle.group(drive), limits),
            "-blockdev", f"driver=throttle,node-name={throttle.share_node(drive)},"
                         f"throttle-group={throttle.GUEST_GROUP},file={drive}",
            "-blockdev", f"driver=throttle,node-name={throttle.top_node(drive)},"
                         f"throttle-group={throttle.group(drive)},"
                         f"file={throttle.share_node(drive)}"]


def storage_args(spec: LaunchSpec, h: Handles) -> list[str]:
    """Pure: firmware flash, the disk chain, the data disks and the cdrom, with their
    devices and boot order (``bootindex``: the order of ``spec.boot_order``; "disk" is the
    image's disk, or the first data disk when the image has none). Writable disks go
    under throttle filters unless ``spec.limits`` is None."""
    boot = spec.boot
    argv: list[str] = []
    bays = Bays(spec.machine.name, spec.machine.virtio)
    order = {d: i for i, d in enumerate(spec.boot_order)}
    limits = dict((k, dict(v)) for k, v in spec.limits) if spec.limits is not None else None

    def throttled(drive: str) -> str:
        """The node the device attaches to."""
        nonlocal argv
        if limits is None:
            return drive
        if not any(a.startswith(f"throttle-group,id={throttle.GUEST_GROUP}") for a in argv):
            argv += ["-object", throttle.object_arg(throttle.GUEST_GROUP)]
        argv += throttle_args(drive, limits.get(drive, {}))
        return throttle.top_node(drive)

    if boot.disk:
        if not h.disk:
            raise ValueError("a disk needs its layers' descriptors")
        argv += disk_args(h.disk)
        bays.attach(spec.disk_bus, throttled("disk0"), bootindex=order.get("disk"))
    if len(h.data) != len(boot.data):
        raise ValueError("every data disk needs its descriptor")
    for i, (d, fd) in enumerate(zip(boot.data, h.data)):
        argv += _node(fd, DATA_FDSET + i, f"data-{d.name}", "qcow2", read_only=False)
        first = i == 0 and not boot.disk
        bays.attach(d.bus, throttled(f"data-{d.name}"), serial=d.name,
                    bootindex=order.get("disk") if first else None)
    # cdroms: on the disks' SCSI controller, else IDE on pc and AHCI on q35 (every
    # firmware and OS of the last 25 years boots and reads those)
    cd_bus = "scsi" if spec.disk_bus == "scsi" else \
        ("ide" if spec.machine.name == "pc" else "sata")
    for path, fd, fdset, node, what in ((boot.cdrom, h.cdrom, CDROM_FDSET, "cd0", "cdrom"),
                                        (boot.seed, h.seed, SEED_FDSET, "seed", "seed")):
        if not path:
            continue
        if fd is None:
            raise ValueError(f"the {what} needs its descriptor")
        argv += _node(fd, fdset, node, "raw", read_only=True)
        bays.attach(cd_bus, node, cdrom=True, bootindex=order.get(what))
    return argv + bays.argv


def uefi_args(h: Handles) -> list[str]:
    """Pure: OVMF's code (read-only) and the guest's variable store as pflash nodes."""
    if h.uefi_code is None or h.uefi_vars is None:
        raise ValueError("UEFI needs its code's and variable store's descriptors")
    return (_node(h.uefi_code, UEFI_FDSET, "fw-code", "raw", read_only=True) +
            _node(h.uefi_vars, UEFI_FDSET + 1, "fw-vars", "raw", read_only=False))


def build_argv(spec: LaunchSpec, h: Handles, binary: str = "qemu-system-x86_64") -> list[str]:
    """Pure: the full QEMU argv for ``spec``, its files and sockets the descriptors ``h``."""
    m, v = spec.machine, spec.machine.virtio
    q = opt_value
    uefi = spec.boot.firmware == "uefi"
    if m.name == "microvm":
        machine = "microvm,acpi=on,auto-kernel-cmdline=off,pit=on,pic=on,rtc=on"
    else:
        machine = m.name + (",pflash0=fw-code,pflash1=fw-vars" if uefi else "")
    if not spec.mem_merge:
        machine += ",mem-merge=off"   # no MADV_MERGEABLE on guest RAM: KSM never sees it
    if spec.accel.name == "tcg":
        accel = f"tcg,tb-size={spec.tb_size_mib}"
    else:
        accel = "kvm"
    argv = [binary, "-name", name_option(spec.name),
            "-machine", machine, "-accel", accel,
            "-nodefaults", "-no-user-config", "-display", "none",
            "-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus)]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    argv += ["-cpu", cpu_model(spec)]
    if spec.rtc == "localtime":
        argv += ["-rtc", "base=localtime"]
    if uefi:
        argv += uefi_args(h)
    if spec.boot.kernel:
        if h.kernel is None:
            raise ValueError("a kernel boot needs the kernel's descriptor")
        argv += ["-kernel", f"/proc/self/fd/{h.kernel}", "-append", kernel_cmdline(spec)]
        if spec.boot.initrd:
            if h.initrd is None:
                raise ValueError("an initrd needs its descriptor")
            argv += ["-initrd", f"/proc/self/fd/{h.initrd}"]
    # serial console: a socket for `console`, and everything it prints to the log file
    argv += ["-add-fd", f"fd={h.serial_log},set={SERIAL_FDSET}",
             "-chardev", f"socket,id=ser0,fd={h.console},server=on,wait=off,"
                         f"logfile=/dev/fdset/{SERIAL_FDSET},logappend=on",
             "-serial", "chardev:ser0"]
    argv += ["-chardev", f"socket,id=qmp,fd={h.qmp},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]
    argv += ["-device", f"virtio-serial-{v},id=vser0",
             "-chardev", f"socket,id=agent,fd={h.agent},server=on,wait=off",
             "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={spec.agent_port}"]
    argv += ["-device", f"virtio-balloon-{v},id=balloon0,deflate-on-oom=on,"
                        "free-page-reporting=on"]
    if len(h.taps) != len(spec.nics) or (spec.vhost and len(h.vhost) != len(spec.nics)):
        raise ValueError("every NIC needs its tap's descriptor (and vhost's, with vhost)")
    for i, nic in enumerate(spec.nics):
        vhost = f"vhost=on,vhostfd={h.vhost[i]}" if spec.vhost else "vhost=off"
        model = NIC_DEVICES.get(nic.model, f"virtio-net-{v}")
        argv += ["-netdev", f"tap,id=net{i},fd={h.taps[i]},{vhost}",
                 "-device", f"{model},netdev=net{i},mac={q(nic.mac)}"]
    argv += storage_args(spec, h)
    if spec.display == "vga":
        # a VNC server without a listener: clients come through QMP add_client
        argv += ["-device", "VGA", "-vnc", "none"]
    argv += ["-device", "pvpanic", "-action", "panic=exit-failure"]
    argv += ["-sandbox", SANDBOX]
    argv += list(spec.extra_args)
    return argv
