"""Same-page merging (KSM) policy: host memory state + ksmd's counters -> its settings. Pure.

KSM trades CPU for memory: ksmd scans the pages QEMU marked mergeable, ``pages_to_scan``
of them every ``sleep_millisecs``, and merges identical ones copy-on-write. Guests of
one image share kernels, libraries and zeroed pages, so it saves much; but the scan costs
CPU whether or not it finds anything, and once merged the savings stop growing while the
scanning goes on. So, like oVirt MoM's KSM controller and ksmtuned, the scanner is run
only when memory is short, and here also only while it pays:

- **need**: the host's memory state from the memory policy (normal / soft / hard) and
  whether the fleet is *overcommitted* (the running guests' ``memory.max`` add up to
  more than the guest budget: the balloons must hold some of them back). Memory that
  is neither short nor promised away gains nothing from merging, so ``auto`` stops the
  scanner there (``on`` keeps it at the steady rate);
- **merge**: while memory is short, ksmd may spend up to a CPU budget that grows with
  the need (overcommitted, soft, hard). The policy measures what it buys: pages_sharing
  gained per CPU-second of ksmd over a window of at least ``window_s`` seconds and
  ``window_scans`` full scans (KSM merges a page on the second scan that finds it
  unchanged, so a shorter window reads a scan still in progress as "does not pay");
- **steady**: when a window buys less than ``min_pay``, the savings have stopped growing.
  The scanner drops to the steady budget, enough to re-merge what copy-on-write breaks
  and to merge new guests' pages slowly; or stops, when merging saved almost nothing.
  It merges hard again when the need rises, when a guest is added, when the savings fall
  by ``refall`` from their peak, or every ``reprobe_s`` (to see whether it pays again).

The CPU a setting costs is predicted from ksmd's measured cost per page scanned
(``pages_scanned`` against its CPU time), an EWMA, with a prior until measured: scanning
``p`` pages costs ``p * cost`` seconds and is followed by ``s`` ms of sleep, so the duty
cycle is ``p*c / (p*c + s/1000)``. The settings aim at ``aim`` (70 %) of the budget:
the estimate misses part of the fixed cost of each wake-up (measured: 10-15 %).

Every decision carries its reason, and the state the next tick needs (:class:`KsmState`)
is handed back, as the memory policy does with its estimates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .memory import HostState

PAGE = 4096


class KsmMode(enum.StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Need(enum.IntEnum):
    """How short memory is, lowest first."""
    NONE = 0           # the fleet's maxima fit in the budget, host memory normal
    OVERCOMMITTED = 1  # the fleet's maxima exceed the budget: balloons hold memory back
    SOFT = 2           # host memory state soft
    HARD = 3           # ... hard


@dataclass(frozen=True)
class KsmParams:
    # ksmd's CPU budget while merging, in cores, by need (mode on merges at least at
    # the overcommitted rate)
    cpu_overcommitted: float = 0.10
    cpu_soft: float = 0.20
    cpu_hard: float = 0.40
    cpu_steady: float = 0.02         # once merging no longer pays
    aim: float = 0.7                 # settings aim at this share of the budget
    min_pay: float = 2000.0          # pages_sharing gained per ksmd CPU-second that pays
    window_s: float = 10.0
    window_scans: int = 2
    min_saved: int = 1024            # pages: saved less, at steady state the scanner stops
    refall: float = 0.10             # savings falling this far from their peak: merge again
    reprobe_s: float = 600.0
    cost_prior: float = 1.5e-6       # seconds of ksmd CPU per page scanned, until measured
    cost_weight: float = 0.3         # EWMA weight of a new cost measurement
    cost_min_pages: int = 2000       # a measurement needs this many pages scanned
    cost_scans: int = 9              # ... and this many full scans (smart_scan's cycle)
    sleep_ms: int = 20               # the scanner's period while merging
    sleep_slow_ms: int = 100         # ... under ``slow_below`` cores: fewer wake-ups, whose
    slow_below: float = 0.05         # fixed cost the per-page estimate does not see
    sleep_max_ms: int = 1000
    pages_min: int = 16
    pages_max: int = 20000


@dataclass(frozen=True)
class KsmObs:
    """ksmd as read this tick (/sys/kernel/mm/ksm and ksmd's own CPU counter)."""
    mono: float
    run: int
    pages_to_scan: int
    sleep_ms: int
    pages_shared: int
    pages_sharing: int
    full_scans: int
    cpu_s: float                     # ksmd's CPU seconds since boot
    pages_scanned: int | None = None  # absent on kernels before 6.9
    advisor: bool = False            # advisor_mode scan-time: the kernel sets pages_to_scan

    @property
    def saved(self) -> int:
        """Bytes merging saves now: every page sharing a KSM page is one not held."""
        return self.pages_sharing * PAGE


@dataclass(frozen=True)
class KsmNeed:
    host_state: HostState
    committed: int                   # the running mergeable guests' memory.max, bytes
    budget: int                      # the guest memory budget (before merging's credit)
    guests: int                      # running guests that may merge

    @property
    def level(self) -> Need:
        if self.host_state is HostState.HARD:
            return Need.HARD
        if self.host_state is HostState.SOFT:
            return Need.SOFT
        return Need.OVERCOMMITTED if self.committed > self.budget else Need.NONE


@dataclass(frozen=True)
class KsmState:
    """What the policy carries from one tick to the next."""
    phase: str = "idle"              # idle | merge | steady
    since: float = 0.0               # when the phase began (monotonic)
    base: KsmObs | None = None       # the start of the current judging window
    last: KsmObs | None = None       # the previous tick's reading
    peak: int = 0                    # pages_sharing at its highest in this phase
    need: Need = Need.NONE           # the need when the phase began
    guests: int = 0                  # mergeable guests when the phase began
    cost: float | None = None        # measured seconds per page scanned (EWMA)
    cost_base: KsmObs | None = None  # where the cost's next sample started
    pay: float | None = None         # the last window's pages gained per CPU-second


@dataclass(frozen=True)
class KsmDecision:
    run: bool
    pages_to_scan: int
    sleep_ms: int
    budget: float                    # cores ksmd may use in this phase
    predicted: float                 # cores these settings should cost
    phase: str
    reason: str
    state: KsmState

    def changed(self, obs: KsmObs) -> bool:
        if not self.run:
            return obs.run != 0
        return (obs.run, obs.pages_to_scan, obs.sleep_ms) != \
            (1, self.pages_to_scan, self.sleep_ms)


def predicted_cpu(pages: int, sleep_ms: int, cost: float) -> float:
    """Cores ksmd uses scanning ``pages`` every ``sleep_ms`` at ``cost`` s a page."""
    busy = pages * cost
    return busy / (busy + sleep_ms / 1000.0)


def settings_for(budget: float, cost: float, p: KsmParams = KsmParams()) -> tuple[int, int]:
    """(pages_to_scan, sleep_ms) costing at most ``budget * aim`` cores at ``cost``."""
    b = max(1e-6, min(budget * p.aim, 0.95))
    sleep = p.sleep_ms if budget >= p.slow_below else p.sleep_slow_ms
    pages = int(b * sleep / 1000.0 / (cost * (1 - b)))
    if pages < p.pages_min:           # a tiny budget: sleep longer, scan the minimum
        pages = p.pages_min
        sleep = min(p.sleep_max_ms, int(pages * cost * (1 - b) / b * 1000.0) + 1)
        if predicted_cpu(pages, sleep, cost) > b:
            return 0, sleep           # cannot be that cheap: do not scan
    return min(pages, p.pages_max), sleep


def merge_budget(level: Need, p: KsmParams = KsmParams()) -> float:
    """Cores ksmd may use while merging pays, by how short memory is."""
    return {Need.NONE: p.cpu_overcommitted, Need.OVERCOMMITTED: p.cpu_overcommitted,
            Need.SOFT: p.cpu_soft, Need.HARD: p.cpu_hard}[level]


def _cost(prev: KsmState, obs: KsmObs, p: KsmParams) -> tuple[float | None, KsmObs | None]:
    """ksmd's seconds per page scanned, from the pages and CPU since ``cost_base``, taken
    once ``cost_scans`` full scans have ended since then and enough pages were scanned.

    A page does not cost the same in every scan. With ``smart_scan`` (Linux 6.7 and
    later) ksmd passes over a page that stays unmerged for more scans as it ages, up to
    8, then looks at it once more, and counts the pages passed over as scanned. Measured
    here: 0.3 us a page in 8 scans, then one that passes over none at 1.5-2 us a page. A
    sample per tick, or per scan, chased that cycle and the settings with it (steady
    ksmd at 0.005 to 0.06 of a core, against 0.014 aimed at); a sample over 9 scans is
    the cycle's average.
    """
    base = prev.cost_base
    if obs.pages_scanned is None:
        return prev.cost, None
    if base is None or base.pages_scanned is None or obs.pages_scanned < base.pages_scanned \
            or obs.cpu_s < base.cpu_s or obs.full_scans < base.full_scans:
        return prev.cost, obs
    pages = obs.pages_scanned - base.pages_scanned
    cpu = obs.cpu_s - base.cpu_s
    if pages < p.cost_min_pages or obs.full_scans - base.full_scans < p.cost_scans:
        return prev.cost, base
    if cpu <= 0:
        return prev.cost, obs
    sample = cpu / pages
    cost = sample if prev.cost is None else prev.cost + p.cost_weight * (sample - prev.cost)
    return cost, obs


def ksm_policy(mode: KsmMode, obs: KsmObs, need: KsmNeed, prev: KsmState | None = None,
               params: KsmParams = KsmParams(),
               host: tuple[int, int] | None = None) -> KsmDecision | None:
    """The settings ksmd should have now. None: leave them alone (mode off).

    ``host``: ``(pages_to_scan, sleep_millisecs)`` when the host already ran KSM before
    the supervisor touched it (``run`` 1 found). ksmd serves the whole host, not only the
    fleet, so the policy never scans slower than that: where it would stop the scanner
    or scan less, it keeps the host's own settings, and says so."""
    if mode is KsmMode.OFF:
        return None
    p = params
    prev = prev or KsmState()
    cost, cost_base = _cost(prev, obs, p)
    c = cost if cost is not None else p.cost_prior
    level = need.level
    st = replace(prev, last=obs, cost=cost, cost_base=cost_base)

    def out(run: bool, budget: float, phase: str, reason: str, s: KsmState) -> KsmDecision:
        d = settle(run, budget, phase, reason, s)
        if not (d.run and obs.advisor):
            return d
        # the kernel's own advisor tunes the rate (6.8+, advisor_mode scan-time, bounded
        # by advisor_max_cpu): only run is the policy's, the rate stays the advisor's
        return replace(d, pages_to_scan=obs.pages_to_scan, sleep_ms=obs.sleep_ms,
                       predicted=predicted_cpu(obs.pages_to_scan, obs.sleep_ms, c),
                       reason=d.reason + "; the kernel's scan-time advisor sets the rate")

    def settle(run: bool, budget: float, phase: str, reason: str, s: KsmState) -> KsmDecision:
        pages = 0
        if run:
            pages, sleep = settings_for(budget, c, p)
            if pages == 0:
                reason += f"; no setting costs under {budget:.3f} cores"
        if host is not None and \
                (pages == 0 or predicted_cpu(pages, sleep, c) < predicted_cpu(*host, c)):
            return KsmDecision(True, host[0], host[1], budget, predicted_cpu(*host, c), phase,
                               reason + f"; the host ran KSM before this supervisor "
                               f"({host[0]} pages every {host[1]} ms): kept at that rate",
                               s)
        if pages == 0:
            return KsmDecision(False, obs.pages_to_scan, obs.sleep_ms, budget if run else 0.0,
                               0.0, phase, reason + (": stopped" if run else ""), s)
        return KsmDecision(True, pages, sleep, budget, predicted_cpu(pages, sleep, c), phase,
                           reason, s)

    def begin(phase: str) -> KsmState:
        return replace(st, phase=phase, since=obs.mono, base=obs, peak=obs.pages_sharing,
                       need=level, guests=need.guests, pay=None if phase == "merge"
                       else st.pay)

    if need.guests == 0:
        return out(False, 0.0, "idle", "no running guest may merge: scanner stopped",
                   begin("idle"))
    if level is Need.NONE and mode is KsmMode.AUTO:
        return out(False, 0.0, "idle",
                   f"memory is not short (host {need.host_state.value}, guests' max "
                   f"{need.committed >> 20} MiB within the budget {need.budget >> 20} MiB): "
                   "merging would cost CPU for nothing; scanner stopped", begin("idle"))

    if need.guests < prev.guests:
        # a guest went, and its merged pages with it: that fall is no reason to merge
        # again, and a guest added later is counted from here
        prev = replace(prev, guests=need.guests, peak=obs.pages_sharing)
        st = replace(st, guests=need.guests, peak=obs.pages_sharing)
    # ------------------------------------------------------------- phase changes
    rising = level > prev.need
    added = need.guests > prev.guests
    if prev.phase == "idle" or rising or added or \
            (prev.phase == "steady" and obs.mono - prev.since >= p.reprobe_s) or \
            (prev.phase == "steady" and prev.peak and
             obs.pages_sharing < prev.peak * (1 - p.refall)):
        why = ("memory short" if prev.phase == "idle" else
               "need rose" if rising else "a guest was added" if added else
               "periodic probe" if obs.mono - prev.since >= p.reprobe_s else
               "savings fell from their peak")
        st = begin("merge")
        budget = merge_budget(level, p)
        return out(True, budget, "merge",
                   f"{why} ({_need_text(level, need)}): merging at up to {budget:.2f} cores",
                   st)
    if prev.phase == "merge":
        budget = merge_budget(level, p)
        base = prev.base or obs
        scans = obs.full_scans - base.full_scans
        dt = obs.mono - base.mono
        if dt < p.window_s or scans < p.window_scans:
            st = replace(st, peak=max(prev.peak, obs.pages_sharing))
            return out(True, budget, "merge",
                       f"merging ({_need_text(level, need)}) at up to {budget:.2f} cores; "
                       f"judging after {p.window_scans} full scans and {p.window_s:g}s "
                       f"({scans} and {dt:.0f}s so far)", st)
        cpu = obs.cpu_s - base.cpu_s
        gained = obs.pages_sharing - base.pages_sharing
        pay = gained / cpu if cpu > 0 else 0.0
        if pay >= p.min_pay:
            st = replace(st, base=obs, peak=max(prev.peak, obs.pages_sharing), pay=pay)
            return out(True, budget, "merge",
                       f"merging pays: {gained:+d} pages shared for {cpu:.2f} CPU-s "
                       f"({pay:.0f}/CPU-s >= {p.min_pay:.0f}); going on at up to "
                       f"{budget:.2f} cores", st)
        st = replace(begin("steady"), pay=pay)
        return _steady(out, obs, p, st,
                       f"savings stopped growing ({gained:+d} pages for {cpu:.2f} CPU-s, "
                       f"{pay:.0f}/CPU-s < {p.min_pay:.0f})")
    # steady
    st = replace(st, peak=max(prev.peak, obs.pages_sharing))
    return _steady(out, obs, p, st, f"steady since {obs.mono - prev.since:.0f}s")


def _steady(out, obs: KsmObs, p: KsmParams, st: KsmState, why: str) -> KsmDecision:
    if obs.pages_sharing < p.min_saved:
        return out(False, 0.0, "steady",
                   f"{why}; merging saves only {obs.saved >> 20} MiB here: scanner stopped "
                   "(merged pages stay merged)", st)
    return out(True, p.cpu_steady, "steady",
               f"{why}; {obs.saved >> 20} MiB saved: scanning at the steady "
               f"{p.cpu_steady:.2f} cores to keep it", st)


def _need_text(level: Need, need: KsmNeed) -> str:
    if level is Need.OVERCOMMITTED:
        return (f"guests' max {need.committed >> 20} MiB over the budget "
                f"{need.budget >> 20} MiB")
    if level is Need.NONE:
        return "memory not short; host.ksm on"
    return f"host memory {need.host_state.value}"


def guest_saved(merging_pages: int, obs: KsmObs) -> int:
    """A guest's part of what merging saves, in bytes: its merged pages, less its share
    of the KSM pages that hold them (each shared page is held once, by all its users)."""
    users = obs.pages_shared + obs.pages_sharing
    if users <= 0 or merging_pages <= 0:
        return 0
    return int(merging_pages * obs.pages_sharing / users) * PAGE
