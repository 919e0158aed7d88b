"""Policy simulator: replay memory demand through our policy and two baselines.

A guest is modelled by its working set ``ws(t)`` (anonymous memory it must keep), its
page cache ``cache(t)`` (reclaimable), and the RAM its balloon leaves it, ``size(t)``.
Each simulated second:

- the guest is **under pressure** when ``ws > 0.9 x size`` (it is reclaiming hard);
- an **OOM** happens when ``ws > size``: the allocation cannot be met. Our real guests
  also have ``deflate-on-oom`` as a last resort; the simulator does not count on it, so
  an OOM here means the policy was too slow or too stingy;
- a balloon moves towards its target at ``balloon_rate`` per second (inflating and
  deflating take time in a real guest).

The guest's view, as each policy reads it: MemAvailable = size - ws (cache is
reclaimable); MemFree = size - ws - cache (what MoM reads, so page cache looks "used").

Policies, each on its own interval:

- **ours**: :func:`consolidator.sched.memory.memory_policy`, every 1 s, with guest stats
  that lag one second (QEMU polls the balloon stats once a second);
- **MoM** (oVirt's balloon rules): every 10 s, on a 10-sample average of MemFree; when the
  host is under pressure (host free < 20 %), guests with more than 20 % free shrink by 5 %
  of their size; a guest with less than 5 % free grows by 5 %; no host pressure: guests
  grow by 5 % towards max;
- **Proxmox autoballoon**: every 10 s, target 80 % host use; above it, shrink guests
  (weighted by shares, never under min), below it grow them (towards max), at most
  100 MiB per VM per cycle.

Reported per policy and trace: guest-seconds under pressure, OOM events, time to react
to a burst (from its start to the first deflation of that guest), idle memory reclaimed
(mean over time of max - size summed over the guests not busy), and balloon changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..units import MiB
from .memory import HostState, MemHost, MemInput, MemParams, memory_policy

Trace = Callable[[float], tuple[float, float]]     # t -> (ws, cache) in MiB


@dataclass
class SimGuest:
    name: str
    max: int                 # MiB
    min: int                 # MiB
    shares: int
    trace: Trace
    busy_from: float | None = None   # when this guest's burst starts (reaction metric)
    size: float = 0.0        # MiB it has now
    target: float = 0.0
    history: list[tuple[float, float, float]] = field(default_factory=list)  # (ws,cache,size)

    def __post_init__(self) -> None:
        self.size = self.target = float(self.max)


@dataclass
class Scenario:
    name: str
    guests: list[SimGuest]
    host_total: int                      # MiB
    budget: int                          # MiB for guests
    duration: int = 600
    outside: Callable[[float], float] = lambda t: 0.0   # MiB the host uses outside guests
    description: str = ""


@dataclass
class Result:
    pressure_s: float = 0.0
    ooms: int = 0
    reaction_s: float | None = None
    reclaimed_mib: float = 0.0
    changes: int = 0


BALLOON_RATE = 256.0     # MiB/s a balloon moves in the guest (measured order under TCG)


class Policy:
    name = "policy"
    interval = 1
    min_change = 1.0         # MiB: smaller moves are not made

    def decide(self, t: float, guests: list[SimGuest], host_free: float, budget: float,
               host: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
        """``host_free``: budget not handed out; ``host``: the host's (MemTotal,
        MemAvailable), what our loop reads from /proc/meminfo."""
        raise NotImplementedError


class Ours(Policy):
    name = "consolidator"
    interval = 1
    min_change = MemParams().min_change / MiB   # the real loop's rule

    def __init__(self) -> None:
        self.est: dict[str, float] = {}
        self.holds: dict[str, int] = {}
        self.state = HostState.NORMAL

    def decide(self, t, guests, host_free, budget, host=(0.0, 0.0)):
        inputs = []
        for g in guests:
            # guest stats lag a poll (1 s); the balloon's size is current (QMP events), and
            # the loop knows the target it set last
            ws, cache, size = g.history[-2] if len(g.history) > 1 else g.history[-1]
            # what the real observer knows of the balloon's size when they were taken:
            # only a range, the sizes seen from a second before them until now
            sizes = [h[2] for h in g.history[-3:]]
            seen = (int(min(sizes) * MiB), int(max(sizes) * MiB))
            total = g.max - 38
            inflated = g.max - size
            used = ws + inflated          # ballooned pages count as used (deflate-on-oom)
            avail = max(0.0, total - used)
            inputs.append(MemInput(g.name, int(g.max * MiB), int(g.min * MiB), g.shares,
                                   int(g.size * MiB), int(total * MiB), int(avail * MiB),
                                   target=int(g.target * MiB),
                                   stats_actual=seen))
        mh = MemHost(int(budget * MiB), int(host[1] * MiB), int(host[0] * MiB))
        res = memory_policy(inputs, mh, estimates=self.est, holds=self.holds,
                            prev_state=self.state)
        self.est, self.holds, self.state = res.estimates, res.holds, res.host_state
        return {d.name: d.target / MiB for d in res.decisions}


class MoM(Policy):
    name = "oVirt MoM"
    interval = 10

    def __init__(self) -> None:
        self.free: dict[str, list[float]] = {}

    def decide(self, t, guests, host_free, budget, host=(0.0, 0.0)):
        out = {}
        host_pressure = host_free < 0.20 * budget
        for g in guests:
            ws, cache, size = g.history[-1]
            samples = self.free.setdefault(g.name, [])
            samples.extend(max(0.0, h[2] - h[0] - h[1]) for h in g.history[-10:])
            del samples[:-10]
            free_frac = (sum(samples) / len(samples)) / max(size, 1)
            new = size
            if host_pressure and free_frac > 0.20:
                new = size * 0.95
            elif free_frac < 0.05:
                new = size * 1.05
            elif not host_pressure:
                new = size * 1.05
            out[g.name] = max(g.min, min(g.max, new))
        return out


class Proxmox(Policy):
    name = "Proxmox autoballoon"
    interval = 10
    step = 100.0

    def decide(self, t, guests, host_free, budget, host=(0.0, 0.0)):
        used = budget - host_free
        goal = 0.80 * budget
        out = {g.name: g.size for g in guests}
        if used > goal:
            excess = used - goal
            total_shares = sum(g.shares for g in guests) or 1
            for g in guests:
                share = excess * (1 - g.shares / total_shares) / max(len(guests) - 1, 1) \
                    if len(guests) > 1 else excess
                out[g.name] = max(g.min, g.size - min(self.step, share))
        else:
            room = goal - used
            for g in guests:
                out[g.name] = min(g.max, g.size + min(self.step, room / len(guests)))
        return out


def run(scenario: Scenario, policy: Policy) -> Result:
    r = Result()
    guests = [SimGuest(g.name, g.max, g.min, g.shares, g.trace, g.busy_from)
              for g in scenario.guests]
    reacted: dict[str, bool] = {}
    idle_samples = []
    for t in range(scenario.duration):
        outside = scenario.outside(t)
        budget = scenario.budget - outside
        for g in guests:
            ws, cache = g.trace(t)
            # the balloon moves towards the target at a finite rate
            if g.target > g.size:
                g.size = min(g.target, g.size + BALLOON_RATE)
            elif g.target < g.size:
                g.size = max(g.target, g.size - BALLOON_RATE)
            g.history.append((ws, cache, g.size))
            if ws > g.size:
                r.ooms += 1
            if ws > 0.9 * g.size:
                r.pressure_s += 1
        # what the host has handed out is what the balloons leave the guests
        host_free = max(0.0, budget - sum(g.size for g in guests))
        # the host: its RAM, less what runs outside the guests and what the guests hold
        host = (float(scenario.host_total),
                max(0.0, scenario.host_total - outside - sum(g.size for g in guests)))
        if t % policy.interval == 0:
            targets = policy.decide(t, guests, host_free, budget, host)
            for g in guests:
                new = targets.get(g.name, g.target)
                if abs(new - g.target) >= policy.min_change:
                    r.changes += 1
                    if g.busy_from is not None and t >= g.busy_from and new > g.size and \
                            not reacted.get(g.name):
                        reacted[g.name] = True
                        lag = t - g.busy_from
                        r.reaction_s = lag if r.reaction_s is None else max(r.reaction_s, lag)
                    g.target = new
        idle_samples.append(sum(g.max - g.size for g in guests
                                if g.busy_from is None or t < g.busy_from))
    r.reclaimed_mib = sum(idle_samples) / max(len(idle_samples), 1)
    return r


# ------------------------------------------------------------------- the traces

def steady(ws: float, cache: float = 20) -> Trace:
    return lambda t: (ws, cache)


def burst(before: float, after: float, at: float, ramp: float = 3) -> Trace:
    """A JVM start: the working set jumps within ``ramp`` seconds."""
    def f(t: float) -> tuple[float, float]:
        if t < at:
            return before, 20
        return before + (after - before) * min(1.0, (t - at) / ramp), 20
    return f


def leak(start: float, per_s: float, cap: float) -> Trace:
    return lambda t: (min(cap, start + per_s * t), 20)


def diurnal(low: float, high: float, period: float = 300) -> Trace:
    return lambda t: (low + (high - low) * (0.5 - 0.5 * math.cos(2 * math.pi * t / period)),
                      30)


def cache_heavy(ws: float, cache: float) -> Trace:
    return lambda t: (ws, cache)


def scenarios() -> list[Scenario]:
    def idle(name: str) -> SimGuest:
        return SimGuest(name, 1024, 128, 1000, steady(100))
    return [
        Scenario("steady", [SimGuest("a", 1024, 128, 1000, steady(300)), idle("b"),
                            idle("c")], 8192, 3072, description="three steady guests"),
        Scenario("burst", [SimGuest("jvm", 1024, 128, 1000, burst(100, 700, 120), 120),
                           idle("b"), idle("c")], 8192, 1536,
                 description="a JVM starts at t=120: 100 -> 700 MiB in 3 s"),
        Scenario("leak", [SimGuest("leaky", 1024, 128, 1000, leak(100, 1.5, 900), 0),
                          idle("b"), idle("c")], 8192, 1536,
                 description="a slow leak, 1.5 MiB/s"),
        Scenario("diurnal", [SimGuest("web", 1024, 128, 1000, diurnal(150, 700)),
                             SimGuest("batch", 1024, 128, 1000,
                                      lambda t: diurnal(150, 600)(t + 150))], 8192, 1536,
                 description="two guests with opposite daily cycles (5 min period)"),
        Scenario("cache", [SimGuest("files", 1024, 128, 1000, cache_heavy(150, 600)),
                           idle("b"), idle("c")], 8192, 1536,
                 description="a file server: 150 MiB used, 600 MiB page cache"),
        Scenario("host-pressure", [SimGuest("a", 1024, 128, 1000, steady(250)), idle("b"),
                                   idle("c")], 4096, 2048,
                 outside=lambda t: 0 if t < 200 else 1024,
                 description="at t=200 the host itself takes 1 GiB"),
    ]


POLICIES: list[Callable[[], Policy]] = [Ours, MoM, Proxmox]


def table() -> list[dict[str, object]]:
    rows = []
    for sc in scenarios():
        for make in POLICIES:
            pol = make()
            r = run(sc, pol)
            rows.append({"trace": sc.name, "policy": pol.name,
                         "pressure_s": r.pressure_s, "ooms": r.ooms,
                         "reaction_s": r.reaction_s, "reclaimed_mib": round(r.reclaimed_mib),
                         "changes": r.changes})
    return rows
