"""Cheap facts about this host that validation and planning need (no root, no I/O beyond /proc, /sys)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the kernel's CPU list format (``0-3,5``)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(cpus))


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as bytes (the kB figures multiplied out)."""
    with open(path) as f:
        return parse_meminfo(f.read())


def parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    return out


#: where QEMU (Debian's build) finds option ROMs, and the VGA BIOS `-device VGA` loads
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")
VGA_BIOS = "vgabios-stdvga.bin"


@dataclass(frozen=True)
class HostFacts:
    cpus: tuple[int, ...]        # online CPU ids
    memory_total: int            # bytes
    screen: bool = True          # QEMU can give a guest a screen: its VGA BIOS is there

    @property
    def ncpus(self) -> int:
        return len(self.cpus)

    @classmethod
    def probe(cls) -> "HostFacts":
        try:
            with open("/sys/devices/system/cpu/online") as f:
                cpus = parse_cpulist(f.read())
        except OSError:
            cpus = tuple(range(os.cpu_count() or 1))
        return cls(cpus=cpus, memory_total=read_meminfo()["MemTotal"],
                   screen=any(os.path.isfile(os.path.join(d, VGA_BIOS)) for d in FIRMWARE_DIRS))


_TSC_KMSG = re.compile(r"tsc: (?:Refined TSC clocksource calibration|Detected): ([\d.]+) MHz")
_MODEL_GHZ = re.compile(r"@ ([\d.]+)GHz")


def parse_tsc_khz(kmsg: str, cpuinfo: str) -> int | None:
    """The host TSC rate in kHz, when the TSC is constant and its rate is known. Pure.

    Sources, best first: the kernel's refined calibration (or detection) line in its
    log; the nominal frequency in the CPU model name; ``cpu MHz`` when running under a
    hypervisor (where it does not scale). Without ``constant_tsc`` there is no answer.
    """
    flags = set()
    model = mhz = None
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(val.split())
        elif key == "model name" and model is None:
            model = val.strip()
        elif key == "cpu MHz" and mhz is None:
            mhz = float(val)
    if "constant_tsc" not in flags:
        return None
    found = _TSC_KMSG.findall(kmsg)
    if found:
        refined = [f for f, line in zip(found, _TSC_KMSG.finditer(kmsg))
                   if "Refined" in line.group(0)]
        return round(float((refined or found)[-1]) * 1000)
    if model and (m := _MODEL_GHZ.search(model)):
        return round(float(m[1]) * 1_000_000)
    if mhz and "hypervisor" in flags:
        return round(mhz * 1000)
    return None


def _read_kmsg(limit: int = 4 << 20) -> str:
    """The kernel log as far as it goes back (needs root; empty otherwise)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    out: list[str] = []
    size = 0
    try:
        while size < limit:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:   # EPIPE: a record was overwritten while reading; go on
                continue
            if not rec:
                break
            size += len(rec)
            out.append(rec.decode("utf-8", "replace").split(";", 1)[-1])
    finally:
        os.close(fd)
    return "".join(out)


def host_tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        return None
    return parse_tsc_khz(_read_kmsg(), cpuinfo)

