"""Capacity maths: how many more guests of a shape fit, and why not more. Pure.

The question Ganeti's ``hspace`` answers for clusters, for one host, counted two ways:

- **guarantees**: what the fleet has promised. CPU reserves against usable cores
  (host cores minus the host reserve), memory minimums against the guest budget, and the
  overcommit ratios: vCPUs against ``overcommit.cpus x usable cores``, memory maximums
  against ``overcommit.memory x budget``;
- **observed**: what the fleet actually uses at p95 over the report's window, with
  headroom kept free. A new guest of the shape is assumed to use what the fleet's guests
  of that shape use at p95, or its own floor (``min`` memory, its reserve or 0.1 core)
  when no such guest runs yet. The overcommit ratios still apply.

Disk counts too, when the shape has one (``disk=`` on ``--shape``, or the disks of the
fleet's guests of that shape): by guarantees, the free space of the state dir's
filesystem less what the fleet's thin disks may still grow into, per whole disk of the
shape; observed, that free space with headroom, per the space guests of the shape hold.

Each count names its binding resource: ``FAILMEM`` (memory), ``FAILCPU`` (CPU cores),
``FAILVCPU`` (the vCPU overcommit ratio), ``FAILDISK`` (disk space). ``tiered()`` shrinks the shape along the
resource that failed and keeps counting, like hspace's tiered allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..units import MiB, format_size, human_size

INF = 10 ** 9


@dataclass(frozen=True)
class Shape:
    vcpus: int
    memory: int            # max, bytes
    min: int               # bytes
    reserve: float = 0.0   # cores
    disk: int = 0          # virtual size of its disks, bytes

    def label(self) -> str:
        s = f"vcpus={self.vcpus},memory={format_size(self.memory)}"
        if self.min != self.memory:
            s += f",min={format_size(self.min)}"
        if self.reserve:
            s += f",reserve={self.reserve:g}"
        if self.disk:
            s += f",disk={format_size(self.disk)}"
        return s


@dataclass(frozen=True)
class Committed:
    vcpus: int
    reserve: float
    memory_max: int
    memory_min: int
    disk_virtual: int = 0       # what the fleet's disks may grow to, bytes
    disk_allocated: int = 0     # what they hold now


@dataclass(frozen=True)
class Capacity:
    usable_cpus: float          # host cores minus the host reserve
    budget: int                 # guest memory budget, bytes
    overcommit_cpus: float
    overcommit_memory: float
    disk_free: int | None = None    # free bytes on the state dir's filesystem


@dataclass(frozen=True)
class Observed:
    cpu_p95: float              # cores the fleet uses at p95
    memory_p95: int             # bytes the fleet's guests hold at p95 (balloon sizes)


@dataclass(frozen=True)
class Fit:
    count: int
    binding: str                # FAILMEM, FAILCPU, FAILVCPU or FAILDISK
    limits: dict[str, int]      # count allowed by each constraint
    detail: str


def _floor_div(room: float, per: float) -> int:
    if per <= 0:
        return INF
    return max(0, math.floor(room / per + 1e-9))


def _pick(limits: dict[str, tuple[int, str]]) -> Fit:
    name = min(limits, key=lambda k: limits[k][0])
    count, why = limits[name]
    code = {"cpu_reserve": "FAILCPU", "cpu_used": "FAILCPU", "vcpu_overcommit": "FAILVCPU",
            "memory_min": "FAILMEM", "memory_overcommit": "FAILMEM",
            "memory_used": "FAILMEM", "disk_guaranteed": "FAILDISK",
            "disk_used": "FAILDISK"}[name]
    return Fit(count, code, {k: v[0] for k, v in limits.items()}, why)


def by_guarantees(shape: Shape, cap: Capacity, used: Committed) -> Fit:
    vroom = cap.overcommit_cpus * cap.usable_cpus - used.vcpus
    mroom = cap.overcommit_memory * cap.budget - used.memory_max
    limits = {
        "cpu_reserve": (_floor_div(cap.usable_cpus - used.reserve, shape.reserve),
                        f"{cap.usable_cpus - used.reserve:.2f} cores unreserved"),
        "vcpu_overcommit": (_floor_div(vroom, shape.vcpus),
                            f"{vroom:g} vCPUs left under overcommit "
                            f"{cap.overcommit_cpus:g}"),
        "memory_min": (_floor_div(cap.budget - used.memory_min, shape.min),
                       f"{(cap.budget - used.memory_min) // MiB} MiB of budget not "
                       "guaranteed to anyone"),
        "memory_overcommit": (_floor_div(mroom, shape.memory),
                              f"{mroom // MiB:.0f} MiB of max left under overcommit "
                              f"{cap.overcommit_memory:g}"),
    }
    if shape.disk and cap.disk_free is not None:
        droom = cap.disk_free - max(0, used.disk_virtual - used.disk_allocated)
        limits["disk_guaranteed"] = (_floor_div(droom, shape.disk),
                                     f"{human_size(max(droom, 0))} free once the fleet's "
                                     f"disks are full, {human_size(shape.disk)} each")
    return _pick(limits)


def by_observed(shape: Shape, cap: Capacity, used: Committed, obs: Observed, *,
                per_guest_cpu: float, per_guest_memory: int, headroom: float = 0.15,
                per_guest_disk: int = 0) -> Fit:
    cpu_room = cap.usable_cpus * (1 - headroom) - obs.cpu_p95
    mem_room = cap.budget * (1 - headroom) - obs.memory_p95
    vroom = cap.overcommit_cpus * cap.usable_cpus - used.vcpus
    limits = {
        "cpu_used": (_floor_div(cpu_room, max(per_guest_cpu, 0.01)),
                     f"{max(cpu_room, 0):.2f} cores free at p95 with {headroom:.0%} "
                     f"headroom, {per_guest_cpu:.2f} each"),
        "memory_used": (_floor_div(mem_room, max(per_guest_memory, MiB)),
                        f"{max(mem_room, 0) // MiB:.0f} MiB free at p95 with "
                        f"{headroom:.0%} headroom, {per_guest_memory // MiB} MiB each"),
        "vcpu_overcommit": (_floor_div(vroom, shape.vcpus),
                            f"{vroom:g} vCPUs left under overcommit "
                            f"{cap.overcommit_cpus:g}"),
    }
    if per_guest_disk and cap.disk_free is not None:
        droom = cap.disk_free * (1 - headroom)
        limits["disk_used"] = (_floor_div(droom, per_guest_disk),
                               f"{human_size(droom)} free with {headroom:.0%} headroom, "
                               f"{human_size(per_guest_disk)} held each")
    return _pick(limits)


@dataclass(frozen=True)
class Tier:
    shape: Shape
    count: int
    binding: str


def tiered(shape: Shape, cap: Capacity, used: Committed, *, max_tiers: int = 8,
           min_memory: int = 64 * MiB) -> list[Tier]:
    """Allocate as many as fit, shrink the shape along the binding resource, repeat."""
    tiers: list[Tier] = []
    cur_shape, cur_used = shape, used
    for _ in range(max_tiers):
        fit = by_guarantees(cur_shape, cap, cur_used)
        n = min(fit.count, 10000)
        if n:
            tiers.append(Tier(cur_shape, n, fit.binding))
            cur_used = Committed(cur_used.vcpus + n * cur_shape.vcpus,
                                 cur_used.reserve + n * cur_shape.reserve,
                                 cur_used.memory_max + n * cur_shape.memory,
                                 cur_used.memory_min + n * cur_shape.min,
                                 cur_used.disk_virtual + n * cur_shape.disk,
                                 cur_used.disk_allocated)
        nxt = _shrink(cur_shape, fit.binding, min_memory)
        if nxt is None or nxt == cur_shape:
            break
        cur_shape = nxt
    return tiers


def _shrink(s: Shape, binding: str, min_memory: int) -> Shape | None:
    if binding == "FAILMEM":
        if s.min <= min_memory and s.memory <= min_memory:
            return None
        return replace(s, memory=max(min_memory, s.memory // 2 // MiB * MiB),
                       min=max(min_memory // 2, s.min // 2 // MiB * MiB))
    if binding == "FAILVCPU":
        return replace(s, vcpus=s.vcpus - 1) if s.vcpus > 1 else None
    if binding == "FAILDISK":
        return replace(s, disk=s.disk // 2) if s.disk > 1 << 30 else None
    if binding == "FAILCPU":
        if s.reserve <= 0:
            return None
        return replace(s, reserve=round(s.reserve / 2, 3) if s.reserve > 0.05 else 0.0)
    return None


def recommend_memory(max_bytes: int, min_bytes: int, ws_p95: float | None,
                     kernel: int = 40 * MiB) -> tuple[int | None, int | None, str]:
    """Right-size: max about twice the p95 working set, min a little above it, both in
    round steps; None when there is no data."""
    if ws_p95 is None:
        return None, None, "no history yet"
    need = ws_p95 + kernel
    rec_max = max(128 * MiB, math.ceil(need * 2 / (128 * MiB)) * 128 * MiB)
    rec_min = max(64 * MiB, math.ceil(need * 1.1 / (64 * MiB)) * 64 * MiB)
    rec_min = min(rec_min, rec_max)
    reason = (f"p95 working set {human_size(ws_p95)} of {human_size(max_bytes)}")
    if rec_max < max_bytes * 0.75 or rec_min < min_bytes * 0.75:
        reason += f": set max {human_size(rec_max)}, min {human_size(rec_min)}"
    elif need > max_bytes * 0.9:
        reason += f": it runs near max; raise max to {human_size(rec_max)}"
    else:
        reason += ": sized about right"
    return rec_max, rec_min, reason


def recommend_cpu(vcpus: int, reserve: float, cpu_p95: float | None) -> str:
    if cpu_p95 is None:
        return "no history yet"
    if cpu_p95 < 0.5 * (vcpus - 1) and vcpus > 1:
        return f"p95 CPU {cpu_p95:.2f} cores of {vcpus} vCPUs: {max(1, math.ceil(cpu_p95 * 1.5))} vCPUs would do"
    if reserve > 0 and cpu_p95 < reserve * 0.5:
        return f"p95 CPU {cpu_p95:.2f} cores, reserve {reserve:g}: lower the reserve"
    if cpu_p95 > vcpus * 0.9:
        return f"p95 CPU {cpu_p95:.2f} cores: busy on all {vcpus} vCPUs; consider more"
    return f"p95 CPU {cpu_p95:.2f} cores of {vcpus} vCPUs: sized about right"
