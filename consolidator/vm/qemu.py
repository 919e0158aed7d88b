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

from .accel import Accel

DEFAULT_TB_SIZE_MIB = 64
# QEMU starts with its final credentials (the supervisor drops them before exec), so
# set*id stays denied: an escaped QEMU cannot regain root even where a setuid helper is
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SERIAL_FDSET = 1
DISK_FDSET = 10                 # disk layer i is fd set DISK_FDSET + i
AGENT_PORT = "org.consolidator.agent"


@dataclass(frozen=True)
class Machine:
    name: str           # "microvm", "pc" (or "q35", for comparisons)
    reason: str

    @property
    def virtio(self) -> str:
        """The virtio transport suffix: MMIO on microvm, PCI elsewhere."""
        return "device" if self.name == "microvm" else "pci"


def choose_machine(accel: Accel, *, tsc_khz: int | None, firmware_boot: bool) -> Machine:
    """Pure: microvm where it boots reliably, pc otherwise."""
    if firmware_boot:
        return Machine("pc", "pc: the image boots through firmware from its disk")
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

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp, self.console, self.agent)

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


@dataclass(frozen=True)
class TapNic:
    tap: str                       # the tap interface name inside the guest's netns
    mac: str
    cidr: str | None = None        # address/prefix the guest configures
    gateway: str | None = None


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
    extra_args: tuple[str, ...] = field(default_factory=tuple)


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

    def fds(self) -> tuple[int, ...]:
        one = (self.qmp, self.console, self.agent, self.serial_log, self.kernel, self.initrd)
        return tuple(f for f in one if f is not None) + \
            tuple(d.fd for d in self.disk) + self.taps + self.vhost


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
    if spec.accel.name == "kvm" and not spec.pvm_host:
        return "host"
    return "qemu64,+arat"


def disk_args(layers: tuple[DiskLayer, ...], bus: str) -> list[str]:
    """Pure: the disk as a chain of ``-blockdev`` nodes on fd sets, the base first (a node
    must exist before the node that names it as its backing). Layers below the top are
    read-only."""
    argv: list[str] = []
    node = ["disk0" if i == 0 else f"disk0-b{i}" for i in range(len(layers))]
    for i in reversed(range(len(layers))):
        layer, fdset = layers[i], DISK_FDSET + i
        top = i == 0
        extra = ",discard=unmap" if top else ",read-only=on"
        fmt = f"driver={opt_value(layer.format)},node-name={node[i]},file={node[i]}-file{extra}"
        if i + 1 < len(layers):
            fmt += f",backing={node[i + 1]}"
        argv += ["-add-fd", f"fd={layer.fd},set={fdset}",
                 "-blockdev", f"driver=file,node-name={node[i]}-file,"
                              f"filename=/dev/fdset/{fdset}{extra}",
                 "-blockdev", fmt]
    if layers:
        argv += ["-device", f"virtio-blk-{bus},drive=disk0"]
    return argv


def build_argv(spec: LaunchSpec, h: Handles, binary: str = "qemu-system-x86_64") -> list[str]:
    """Pure: the full QEMU argv for ``spec``, its files and sockets the descriptors ``h``."""
    m, v = spec.machine, spec.machine.virtio
    q = opt_value
    if m.name == "microvm":
        machine = "microvm,acpi=on,auto-kernel-cmdline=off,pit=on,pic=on,rtc=on"
    else:
        machine = m.name
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
             "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}"]
    argv += ["-device", f"virtio-balloon-{v},id=balloon0,deflate-on-oom=on,"
                        "free-page-reporting=on"]
    if len(h.taps) != len(spec.nics) or (spec.vhost and len(h.vhost) != len(spec.nics)):
        raise ValueError("every NIC needs its tap's descriptor (and vhost's, with vhost)")
    for i, nic in enumerate(spec.nics):
        vhost = f"vhost=on,vhostfd={h.vhost[i]}" if spec.vhost else "vhost=off"
        argv += ["-netdev", f"tap,id=net{i},fd={h.taps[i]},{vhost}",
                 "-device", f"virtio-net-{v},netdev=net{i},mac={q(nic.mac)}"]
    if spec.boot.disk:
        if not h.disk:
            raise ValueError("a disk needs its layers' descriptors")
        argv += disk_args(h.disk, v)
    argv += ["-device", "pvpanic", "-action", "panic=exit-failure"]
    argv += ["-sandbox", SANDBOX]
    argv += list(spec.extra_args)
    return argv
