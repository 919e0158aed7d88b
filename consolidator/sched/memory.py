"""Memory policy: guest stats + spec + budget -> balloon targets, with reasons. Pure.

Signals. The working set is what the guest uses minus what the balloon holds:
``ws = (total - available) - (max - actual)``. The stats must be read against the
balloon's size when the guest took them (mixing a fresh balloon size with older stats
reads a shrinking balloon as a shrinking working set, and the reverse). While the balloon
moves, that size is known only within a range, and so is the working set: the estimate
then moves only as far as the range forces it. With ``deflate-on-oom`` (always on
here) Linux counts ballooned pages as used, so they must be taken back out. The guest's
MemAvailable is the signal, not MemFree: page cache is memory it can give back (oVirt
MoM reads MemFree and so counts cache as used).

Per guest, each tick:

- **stale or missing stats**: never shrink a guest we cannot see; drift towards deflated
  (max) one step at a time;
- **working-set estimate**: jumps up at once, decays slowly (EWMA) when the guest frees;
- **want** = estimate + headroom + what the guest kernel keeps (MemTotal is below the RAM
  given), within [min, max]. At that size the guest's MemAvailable is the headroom;
- **pressure** (available under 40 % of the headroom, major faults or swap-in): deflate
  at once, by a large step from where the balloon is going (its last target), doubling
  when the guest is at its ceiling (no MemAvailable left: its demand cannot be seen); the
  guest is never squeezed while it lasts, nor for ``pressure_hold`` ticks after (its stats
  lag, so the news that it no longer needs the memory comes late). The threshold
  sits inside the headroom on purpose: a threshold above it made every target read as
  pressure and the balloon bounce (the simulator showed it);
- **shrinking** is stepwise: at most ``max_step`` a tick, and not at all for less than
  ``min_change`` (no churn).

Then the budget (host RAM minus reserve, or ``host.memory``; tightened by host pressure)
is enforced by reclaiming in tiers, each taking first from the guests that the idle
memory tax (Waldspurger's ESX paper, tau = 0.75) rates lowest, i.e. most idle memory per
share: (1) what is above a guest's working set plus headroom, (2) its headroom, down to
what would read as pressure, (3) below its working set down to its min, (4) the
headroom of guests under (or just out of) pressure. Floors
hold throughout: ``min`` for everyone, and for a guest under pressure or unseen,
``max(min, working set, current size)``. So the targets fit the budget whenever the
floors do, and no pressured guest ever feeds an idle one.

Host pressure (PSI memory, MemAvailable) moves the host between normal, soft and hard,
with hysteresis; soft and hard shrink the budget. Memory KSM merged (``MemHost.merged``,
what the host does not hold twice) is added to it: the budget bounds what the host
spends, and the guests' sizes count merged pages once per guest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..units import MiB


class HostState(enum.StrEnum):
    NORMAL = "normal"
    SOFT = "soft"
    HARD = "hard"


@dataclass(frozen=True)
class MemParams:
    headroom_frac: float = 0.20       # of the working set
    headroom_min: int = 32 * MiB
    pressure_frac: float = 0.40       # available below this share of the headroom: pressure
    pressure_min: int = 16 * MiB
    fault_rate: float = 50.0          # major faults per second that count as pressure
    grow_frac: float = 0.50           # under pressure, deflate by this much of the working set
    grow_min: int = 32 * MiB          # ... and at least this
    trend_ticks: float = 3.0          # headroom covers this many ticks of working-set growth
    max_step: int = 64 * MiB          # largest voluntary shrink per tick
    min_change: int = 8 * MiB         # smaller changes are not made (churn)
    ceiling_avail: int = 8 * MiB      # available below this: the guest is at its ceiling
    pressure_hold: int = 5            # ticks a guest keeps what it got after pressure ends
    decay: float = 0.2                # EWMA weight of a lower working set
    stale_step: int = 32 * MiB        # drift towards max per tick when blind
    tau: float = 0.75                 # idle memory tax rate
    floor_ws: int = 16 * MiB          # a working set is never taken to be smaller
    soft_factor: float = 0.95         # budget multiplier in the soft state
    hard_factor: float = 0.85         # ... and in the hard state


@dataclass(frozen=True)
class MemInput:
    name: str
    max: int
    min: int
    shares: int
    actual: int                      # the balloon's current size (guest RAM it has)
    total: int | None = None         # guest MemTotal (None: no stats)
    available: int | None = None     # guest MemAvailable
    major_fault_rate: float = 0.0
    swap_in_rate: float = 0.0
    stale: bool = False
    target: int | None = None        # the target last set; the balloon may still be moving
    # the balloon's size when the stats were taken, as (smallest, largest) it may have
    # been; None: the current size
    stats_actual: tuple[int, int] | None = None


@dataclass(frozen=True)
class MemHost:
    budget: int                      # bytes for all guests (before host pressure)
    mem_available: int
    mem_total: int
    psi_some10: float = 0.0          # /proc/pressure/memory some avg10 (%)
    psi_full10: float = 0.0
    merged: int = 0                  # bytes of the guests' RAM KSM merged away (credited)


@dataclass(frozen=True)
class MemDecision:
    name: str
    target: int
    actual: int
    reason: str
    pressure: bool = False
    ws: int | None = None
    floor: int = 0

    @property
    def changed(self) -> bool:
        return self.target != self.actual


@dataclass(frozen=True)
class MemResult:
    decisions: list[MemDecision]
    estimates: dict[str, float]      # working-set estimates to feed back next tick
    holds: dict[str, int]            # ticks of hold left after pressure, to feed back
    host_state: HostState
    budget: int                      # the budget in force after host pressure
    feasible: bool                   # the floors fit in the budget
    notes: tuple[str, ...] = field(default_factory=tuple)


def host_state(h: MemHost, prev: HostState) -> HostState:
    """Escalate at once, relax with hysteresis (a lower bar to enter than to leave)."""
    avail = h.mem_available / max(h.mem_total, 1)
    if h.psi_full10 >= 10 or h.psi_some10 >= 40 or avail < 0.05:
        return HostState.HARD
    if prev is HostState.HARD and (h.psi_full10 >= 5 or h.psi_some10 >= 20 or avail < 0.08):
        return HostState.HARD
    if h.psi_some10 >= 10 or avail < 0.10:
        return HostState.SOFT
    if prev is not HostState.NORMAL and (h.psi_some10 >= 5 or avail < 0.15):
        return HostState.SOFT
    return HostState.NORMAL


def _tax(g: MemInput, ws: int, tau: float) -> float:
    """Shares per page, with idle pages costing k = 1/(1-tau) times an active one."""
    k = 1.0 / (1.0 - tau)
    f = min(1.0, ws / max(g.actual, 1))
    return g.shares / (max(g.actual, 1) / MiB * (f + k * (1 - f)))


def memory_policy(guests: list[MemInput], host: MemHost, *,
                  estimates: dict[str, float] | None = None,
                  holds: dict[str, int] | None = None,
                  prev_state: HostState = HostState.NORMAL,
                  params: MemParams = MemParams()) -> MemResult:
    p = params
    est_in = estimates or {}
    hold_in = holds or {}
    hold_out: dict[str, int] = {}
    state = host_state(host, prev_state)
    factor = {HostState.NORMAL: 1.0, HostState.SOFT: p.soft_factor,
              HostState.HARD: p.hard_factor}[state]
    # merged pages are held once for all their guests: what the host spends for the
    # guests is their sizes less that, so the sizes may add up to the budget plus it
    budget = int(host.budget * factor) + max(0, host.merged)
    est_out: dict[str, float] = {}
    rows: dict[str, dict] = {}

    for g in guests:
        if g.stale or g.total is None or g.available is None:
            target = min(g.max, g.actual + p.stale_step)
            rows[g.name] = dict(want=max(target, g.min), floor=max(g.min, min(g.actual, g.max)),
                                ws=None, pressure=False, held=False, headroom=0, kernel=0,
                                threshold=0,
                                reason="stats stale or missing: drifting towards deflated")
            if g.name in est_in:
                est_out[g.name] = est_in[g.name]
            continue
        # stats lag the balloon: take out what was ballooned when they were taken. Where
        # that is known only within a range, so is the working set, and the estimate
        # moves only as far as the range forces it (with none yet: the high end, so that
        # nothing is shrunk on an underestimate)
        lo_b, hi_b = g.stats_actual or (g.actual, g.actual)
        used = g.total - g.available
        ws_lo = max(p.floor_ws, used - max(0, g.max - lo_b))
        ws_hi = max(p.floor_ws, used - max(0, g.max - hi_b))
        # RAM the guest kernel keeps for itself (MemTotal is below the RAM it was given)
        kernel = max(0, g.max - g.total)
        prev = est_in.get(g.name)
        ws = ws_hi if prev is None else int(min(max(prev, ws_lo), ws_hi))
        est = float(ws) if prev is None or ws >= prev else prev + p.decay * (ws - prev)
        est_out[g.name] = est
        growth = max(0.0, ws - prev) if prev is not None else 0.0   # bytes per tick
        headroom = max(p.headroom_min, int(est * p.headroom_frac),
                       int(growth * p.trend_ticks))
        # at this size the guest's MemAvailable is the headroom, well above the threshold
        want = int(est) + headroom + kernel
        threshold = max(p.pressure_min, int(headroom * p.pressure_frac))
        causes = []
        if g.available < threshold:
            causes.append(f"available {g.available // MiB}MiB < {threshold // MiB}MiB")
        if g.major_fault_rate > p.fault_rate:
            causes.append(f"{g.major_fault_rate:.0f} major faults/s")
        if g.swap_in_rate > 0:
            causes.append(f"swapping in {g.swap_in_rate / MiB:.1f}MiB/s")
        pressure = bool(causes)
        if pressure:
            # grow from where the balloon is going, not where it is: a deflation still in
            # flight is never taken back while the guest is short (that made targets bounce)
            base = max(g.actual, g.target or 0)
            step = max(p.grow_min, int(est * p.grow_frac), int(growth * p.trend_ticks))
            if g.available < p.ceiling_avail:
                # at its ceiling the guest's demand cannot be seen, only that it is more
                # than it has: double, as TCP's slow start does, rather than creep
                step = max(step, base)
                causes.append("at its ceiling: doubling")
            want = max(want, base + step)
            reason = "pressure (" + ", ".join(causes) + "): deflating"
            hold_out[g.name] = p.pressure_hold
        elif hold_in.get(g.name, 0) > 0:
            # short a moment ago: its stats lag, so the evidence that it no longer needs
            # what it was given comes late; it keeps it for a few ticks
            hold_out[g.name] = hold_in[g.name] - 1
            want = max(want, min(g.max, max(g.actual, g.target or 0)))
            reason = (f"was under pressure {p.pressure_hold - hold_out[g.name]} tick(s) ago: "
                      "keeps what it was given for now")
        else:
            reason = (f"follows working set {ws // MiB}MiB (estimate {int(est) // MiB}MiB) "
                      f"+ headroom {headroom // MiB}MiB + guest kernel {kernel // MiB}MiB")
        want = max(g.min, min(g.max, want))
        if not pressure and want < g.actual:
            stepped = max(want, g.actual - p.max_step)
            if g.actual - stepped < p.min_change:
                stepped = g.actual
                reason += "; shrink below the minimum change, left as is"
            elif stepped > want:
                reason += f"; shrinking by at most {p.max_step // MiB}MiB a tick"
            want = stepped
        elif want > g.actual and want - g.actual < p.min_change and not pressure:
            want = g.actual
        held = g.name in hold_out
        if pressure or held:
            # never squeezed, and a deflation in flight is not taken back
            floor = max(g.min, min(g.max, max(ws + kernel, g.actual, g.target or 0)))
        else:
            floor = g.min
        rows[g.name] = dict(want=want, floor=floor, ws=ws, pressure=pressure, held=held,
                            headroom=headroom, kernel=kernel, threshold=threshold,
                            reason=reason)

    floors = sum(r["floor"] for r in rows.values())
    feasible = floors <= budget
    notes: list[str] = []
    total = sum(r["want"] for r in rows.values())
    if total > budget:
        by_name = {g.name: g for g in guests}
        order = sorted((n for n in rows), key=lambda n: _tax(by_name[n], rows[n]["ws"] or
                                                             by_name[n].actual, p.tau))

        def tier(level: str, n: str) -> int:
            r = rows[n]
            if r["ws"] is None:                  # unseen: its floor is its current size
                return r["floor"]
            if r["pressure"] or r["held"]:
                return r["floor"] if level == "pressure" else r["want"]
            need = r["ws"] + r["kernel"]          # what the guest uses right now
            # squeezing the headroom stops short of what would read as pressure
            return {"idle": max(r["floor"], min(r["want"], need + r["headroom"])),
                    "headroom": max(r["floor"], min(r["want"], need + r["threshold"] +
                                                    p.min_change)),
                    "below-ws": r["floor"], "pressure": r["floor"]}[level]

        for level in ("idle", "headroom", "below-ws", "pressure"):
            for n in order:
                if total <= budget:
                    break
                r = rows[n]
                lowest = tier(level, n)
                take = min(r["want"] - lowest, total - budget)
                if take > 0:
                    r["want"] -= take
                    total -= take
                    g = by_name[n]
                    r["reason"] = (f"budget pressure ({level}): gave {take // MiB}MiB; idle "
                                   f"{max(0, g.actual - (r['ws'] or g.actual)) // MiB}MiB, "
                                   f"shares {g.shares}")
        if total > budget:
            notes.append(f"budget infeasible: floors need {floors // MiB}MiB, budget is "
                         f"{budget // MiB}MiB")
    _pace_growth(rows, {g.name: g for g in guests}, budget)
    if state is not HostState.NORMAL:
        notes.append(f"host memory {state.value}: budget x{factor:g}")
    if host.merged > 0:
        notes.append(f"budget includes {host.merged // MiB}MiB merged by KSM")

    decisions = []
    for g in guests:
        r = rows[g.name]
        decisions.append(MemDecision(g.name, int(r["want"]), g.actual, r["reason"],
                                     r["pressure"], r["ws"], r["floor"]))
    return MemResult(decisions, est_out, hold_out, state, budget, feasible, tuple(notes))


def _pace_growth(rows: dict[str, dict], by_name: dict[str, MemInput], budget: int) -> None:
    """The budget holds at every instant, not only once the balloons have moved.

    A balloon deflates at once but inflates at the guest's pace, so until a shrinking guest
    has given memory back it still holds it. Growth is granted only within the room the
    guests hold now leaves: guests not under pressure give up theirs first. What is held
    back comes on the next ticks, as the others' balloons inflate.
    """
    holding = sum(max(by_name[n].actual, r["want"]) if r["want"] > by_name[n].actual
                  else by_name[n].actual for n, r in rows.items())
    excess = holding - budget
    if excess <= 0:
        return
    growers = sorted((n for n, r in rows.items() if r["want"] > by_name[n].actual),
                     key=lambda n: (rows[n]["pressure"], n))
    for n in growers:
        if excess <= 0:
            break
        r, g = rows[n], by_name[n]
        cut = min(r["want"] - g.actual, excess)
        r["want"] -= cut
        excess -= cut
        r["reason"] += (f"; {cut // MiB}MiB of it held back until other balloons give "
                        "memory back (budget)")


def watchdog_target(current: int | None, maximum: int, step: int) -> int | None:
    """The fail-safe's step when the loop has stalled: one ``step`` towards deflated
    (``maximum``), never past it. ``None``: nothing to do (already there). An unknown
    size is taken as ``maximum``: with no controller, a guest keeps all its memory."""
    cur = maximum if current is None else current
    target = min(maximum, cur + step)
    return target if target > cur else None
