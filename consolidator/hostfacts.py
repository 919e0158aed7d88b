"""Cheap facts about this host that validation and planning need (no root, no I/O beyond /proc, /sys)."""

from __future__ import annotations

import os
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
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    return out


@dataclass(frozen=True)
class HostFacts:
    cpus: tuple[int, ...]        # online CPU ids
    memory_total: int            # bytes

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
        return cls(cpus=cpus, memory_total=read_meminfo()["MemTotal"])
