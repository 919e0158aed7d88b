"""CPU policy: measured demand + spec -> cgroup weights, with the reason for each. Pure.

Shares are relative weights under contention, a reserve (in cores) is a guarantee, a
limit is a hard cap (a CFS quota, set statically; not this policy's business).

CFS divides a contended CPU pool between *runnable* groups by weight, so a guest can be
held below its reserve when its competitors' weights add up to too much. For every guest
whose demand reaches its reserve while its pool is contended, the policy computes the
weight that guarantees the reserve against the guests actually competing with it (those
with measurable demand, sharing some of its CPUs; idle guests do not count and so do not
dilute anyone), solving all reserved guests of a pool together (a fixed point, so two
reserved guests raise against each other correctly). If the measured usage still falls
short, the weight is raised further by the shortfall. Everyone else keeps their shares.

A weight changes only when it moves by more than ``min_change`` (hysteresis), so noise
in demand does not flap the cgroup files.

Demand is smoothed before the policy sees it (:func:`smooth_demand`): it rises at once
and falls by half the gap a tick, so a guest that pauses for one interval keeps its
reserve's weight rather than losing it and winning it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_WEIGHT, MAX_WEIGHT = 2, 262144


@dataclass(frozen=True)
class CpuInput:
    name: str
    shares: int
    reserve: float              # cores guaranteed under contention
    vcpus: int
    cpus: tuple[int, ...] | None   # pinned CPUs, None: any host CPU
    demand: float               # cores it wants (smoothed usage; busy guests near vcpus)
    usage: float                # cores it got over the last interval


@dataclass(frozen=True)
class CpuDecision:
    name: str
    weight: int
    previous: int | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.previous is None or self.weight != self.previous


@dataclass(frozen=True)
class CpuParams:
    idle: float = 0.05           # cores: below this a guest is not competing
    contended: float = 0.90      # pool demand / capacity above which it is contended
    margin: float = 1.10         # weight headroom over the exact guarantee
    min_change: float = 0.10     # hysteresis: relative change needed to rewrite a weight


def smooth_demand(previous: float | None, measured: float, fall: float = 0.5) -> float:
    """Demand fed to the policy: up at once, down by ``fall`` of the gap each tick."""
    if previous is None or measured > previous:
        return measured
    return previous + fall * (measured - previous)


def _pool(g: CpuInput, host_cpus: tuple[int, ...]) -> frozenset[int]:
    return frozenset(g.cpus) if g.cpus else frozenset(host_cpus)


def _capacity(g: CpuInput, usable: float) -> float:
    return float(len(g.cpus)) if g.cpus else usable


def cpu_policy(guests: list[CpuInput], *, host_cpus: tuple[int, ...], usable: float,
               previous: dict[str, int] | None = None,
               params: CpuParams = CpuParams()) -> list[CpuDecision]:
    prev = previous or {}
    pools = {g.name: _pool(g, host_cpus) for g in guests}
    active = {g.name for g in guests if g.demand >= params.idle}
    weight: dict[str, float] = {g.name: float(g.shares) for g in guests}
    why: dict[str, str] = {g.name: f"shares {g.shares}" for g in guests}

    def competitors(g: CpuInput) -> list[CpuInput]:
        return [o for o in guests if o.name != g.name and o.name in active
                and pools[o.name] & pools[g.name]]

    def contended(g: CpuInput) -> bool:
        cap = _capacity(g, usable)
        load = g.demand + sum(o.demand for o in competitors(g))
        return cap > 0 and load >= cap * params.contended

    wanting = [g for g in guests if g.reserve > 0 and g.name in active
               and g.demand >= g.reserve * 0.9 and contended(g)]
    for _ in range(8):                      # fixed point over the reserved guests
        moved = False
        for g in wanting:
            cap = _capacity(g, usable)
            f = min(0.95, g.reserve / cap)
            others = sum(weight[o.name] for o in competitors(g))
            need = f / (1 - f) * others * params.margin
            if g.usage < g.reserve * 0.95 and g.name in prev:
                # still short: the model missed something (host tasks, pinning); push harder
                need = max(need, prev[g.name] * min(2.0, g.reserve / max(g.usage, 0.01)))
            new = max(float(g.shares), need)
            if abs(new - weight[g.name]) > 0.5:
                weight[g.name] = new
                moved = True
                why[g.name] = (f"shares {g.shares}, raised for reserve {g.reserve:g} cores: demand {g.demand:.2f}, got "
                               f"{g.usage:.2f} of a contended pool of {cap:g} cores, against "
                               f"competitors' weight {others:.0f}")
        if not moved:
            break

    out = []
    for g in guests:
        w = int(min(MAX_WEIGHT, max(MIN_WEIGHT, math.ceil(weight[g.name]))))
        old = prev.get(g.name)
        reason = why[g.name]
        if old is not None and w != old and abs(w - old) <= params.min_change * old:
            # the basis stays in the reason: hysteresis only says why the number held
            reason = f"{reason}; kept {old}, within {params.min_change:.0%} of {w}"
            w = old
        elif g.name not in active and g.reserve > 0:
            reason = f"shares {g.shares}: idle ({g.demand:.2f} cores), reserve not needed"
        out.append(CpuDecision(g.name, w, old, reason))
    return out
