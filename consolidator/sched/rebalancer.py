"""The rebalancer loop: observe -> decide (pure policies) -> apply only what changed.

Every ``host.rebalance.interval`` (default 1 s), or at once when the host's memory
PSI trigger fires (poll on /proc/pressure/memory), it takes one snapshot
(:mod:`.observe`), runs :func:`.cpu.cpu_policy` and :func:`.memory.memory_policy`, writes
CPU weights and balloon targets where they changed, and logs each change with the
inputs that caused it. The last decision per guest is kept for ``status --explain``.

Like oVirt MoM's policy engine, it is handed what it may see and what it may move, and
nothing else: the running guests (:class:`~.observe.Tracked`: name, intent, a probe), a
cgroup usage reader, and :class:`Controls`, a weight setter and a balloon setter. It
never sees the supervisor.

While it is active it is the only writer of a running guest's CPU weight: a live
change of a guest's CPU spec comes to it (:meth:`Rebalancer.respec`), which decides
the weight again from the last readings, so an apply never fights it.

Fail-safe: a watchdog checks the loop's heartbeat. When the loop is dead or stalled for
``3 x interval``, it logs it and walks every balloon towards deflated (max), one step a
tick (:func:`.memory.watchdog_target`): without a controller a guest must end up with
all its memory, never squeezed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from ..errors import QMPError
from ..model import GuestIntent
from ..units import MiB
from .cpu import CpuDecision, CpuInput, cpu_policy, smooth_demand
from .memory import (HostState, MemDecision, MemHost, MemInput, MemParams, memory_policy,
                     watchdog_target)
from .io import IoInput, io_policy
from .ksm import KsmDecision, KsmMode, KsmNeed, KsmObs, KsmParams, KsmState, ksm_policy
from .observe import NetReader, Observer, Snapshot, Tracked, UsageReader
from .psi import PsiWatch, watch_memory_pressure

log = structlog.get_logger("rebalancer")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n // MiB}MiB"


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of the fleet, each tick."""

    interval: float
    enabled: bool             # false: observe and record only (host.rebalance.enabled)
    budget: int               # guest memory budget, bytes
    usable_cpus: float
    io_bps: float | None = None       # the host's disk budget (host.io), None: none
    io_iops: float | None = None
    ksm: KsmMode = KsmMode.OFF        # host.ksm


class Controls(Protocol):
    """What the loop may move."""

    async def set_weight(self, name: str, weight: int) -> bool:
        """Write the guest's CPU weight; True when the file changed."""

    async def set_balloon(self, name: str, target: int) -> None:
        """Ask the guest's balloon for ``target`` bytes. Raises QMPError."""

    async def set_io_share(self, name: str, bps: int | None, iops: int | None) -> None:
        """Set the ceiling on the guest's disks together (None: none). Raises QMPError."""

    def set_ksm(self, d: KsmDecision, current: KsmObs) -> bool:
        """Give ksmd the decided settings; False: another supervisor owns KSM here."""

    def release_ksm(self) -> None:
        """Put back KSM's settings as they were found, if they were changed."""

    def ksm_host(self) -> tuple[int, int] | None:
        """(pages_to_scan, sleep_millisecs) the host ran KSM at before this supervisor
        changed it; None: the host had it stopped."""


TickHook = Callable[[Snapshot, dict[str, Any]], None]


class Rebalancer:
    def __init__(self, settings: Callable[[], LoopSettings | None],
                 guests: Callable[[], list[Tracked]], usage: UsageReader | None,
                 controls: Controls, *, params: MemParams = MemParams(),
                 observer: Observer | None = None, net: NetReader | None = None) -> None:
        self.settings = settings
        self.guests = guests
        self.usage = usage
        self.net = net
        self.controls = controls
        self.params = params
        self.observer = observer or Observer()
        self.estimates: dict[str, float] = {}
        self.holds: dict[str, int] = {}
        self.demand: dict[str, float] = {}
        self.weights: dict[str, int] = {}       # the weight last decided, per guest
        self.requested: dict[str, int] = {}     # balloon targets sent, per guest
        self.io_caps: dict[str, tuple[int | None, int | None]] = {}   # share ceilings set
        self.ksm_params = KsmParams()
        self.ksm_state: KsmState | None = None
        self.ksm_explain: dict[str, Any] | None = None
        self.budget_now: int | None = None        # the budget after host pressure
        self.merge_credit = 0.9     # of what KSM saves, counted into the memory budget
        self.host_state = HostState.NORMAL
        self.explain: dict[str, dict[str, Any]] = {}
        self.last: Snapshot | None = None
        self.heartbeat = time.monotonic()
        self.ticks = 0
        self.tick_cpu_s: list[float] = []       # supervisor CPU seconds per tick (bench)
        self.on_tick: list[TickHook] = []
        self._cpu_in: list[CpuInput] = []       # the last tick's CPU inputs (for respec)
        # A CPU decision (a tick's or a respec's) is made whole under this lock, from the
        # intents current at that moment: a tick that began before a live change of shares
        # must not write weights (or explanations) from the old shares after the change.
        self._deciding = asyncio.Lock()
        self.cpu_explain: dict[str, dict[str, Any]] = {}   # the last CPU decision, each
        self._was_active = False
        self._wake = asyncio.Event()
        self._psi: PsiWatch | None = None
        self.loop_task: asyncio.Task[None] | None = None
        self.watchdog_task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        s = self.settings()
        return s.interval if s else 1.0

    @property
    def active(self) -> bool:
        """False: observe and record only (host.rebalance.enabled: false)."""
        s = self.settings()
        return bool(s and s.enabled)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._psi, how = watch_memory_pressure()
            self._psi.attach(loop, self._wake.set)
            log.info("rebalancer.psi", how=how)
        except OSError as e:
            log.warning("rebalancer.no_psi", error=e.strerror,
                        note="the loop runs on its timer only")
        self.loop_task = asyncio.ensure_future(self._run())
        self.watchdog_task = asyncio.ensure_future(self._watchdog())

    def stop_loop(self) -> None:
        """The loop stops; the watchdog stays (test hook, and what a crash of it looks like)."""
        if self.loop_task is not None:
            self.loop_task.cancel()

    @property
    def loop_alive(self) -> bool:
        return self.loop_task is not None and not self.loop_task.done()

    async def close(self) -> None:
        for t in (self.loop_task, self.watchdog_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if self._psi is not None:
            self._psi.close(asyncio.get_running_loop())
        self.observer.close()

    def forget(self, name: str) -> None:
        """A guest (re)starts: its cgroup is new, and what was known of it is gone."""
        for d in (self.estimates, self.holds, self.demand, self.weights, self.requested,
                  self.explain, self.cpu_explain, self.io_caps):
            d.pop(name, None)
        self._cpu_in = [c for c in self._cpu_in if c.name != name]
        self.observer.forget(name)

    def owns_weight(self, name: str) -> bool:
        """Whether the loop, not the apply, writes this guest's CPU weight now."""
        return self.active and name in self.weights

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # a timer that sets the event, not wait_for(): no task made and cancelled each
            # interval (a tenth of an idle supervisor's loop overhead)
            timer = loop.call_later(self.interval, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            c0 = time.process_time()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad tick must not end the loop
                log.warning("rebalancer.tick_failed", error=f"{type(e).__name__}: {e}",
                            exc_info=True)
            self.tick_cpu_s.append(time.process_time() - c0)
            del self.tick_cpu_s[:-200]
            self.heartbeat = time.monotonic()

    async def tick(self) -> None:
        settings = self.settings()
        if settings is None:
            return
        running = self.guests()
        snap = await self.observer.observe(running, self.usage, self.net)
        self.last = snap
        self.ticks += 1
        if not settings.enabled:
            if self._was_active:
                await self._restore_static(running)
            self._ksm_off("host.rebalance.enabled is false: KSM left as the host had it")
            self._was_active = False
            self._notify(snap, {"budget": settings.budget, "host_state": "static",
                                "decisions": {}})
            return
        self._was_active = True
        decisions: dict[str, Any] = {}
        await self._cpu(snap, running, settings, decisions)
        budget = await self._memory(snap, running, settings, decisions)
        self._ksm(snap, running, settings)
        await self._io(snap, running, settings, decisions)
        for t in running:
            self.explain[t.name] = {"t": snap.t, **decisions.get(t.name, {})}
            if t.name in self.cpu_explain and snap.guests[t.name].unresponsive_s is None:
                # a respec may have decided since
                self.explain[t.name]["cpu"] = self.cpu_explain[t.name]
        self.budget_now = budget
        self._notify(snap, {"budget": budget, "host_state": self.host_state.value,
                            "io_budget": settings.io_bps, "decisions": decisions})

    async def _cpu(self, snap: Snapshot, running: list[Tracked], settings: LoopSettings,
                   decisions: dict[str, Any]) -> None:
        async with self._deciding:
            current = {t.name: t.intent for t in self.guests()}    # not the tick's start's
            cpu_in = []
            for t in running:
                o = snap.guests[t.name]
                if o.unresponsive_s is not None:     # left alone: its weight stays
                    decisions.setdefault(t.name, {})["cpu"] = {
                        "weight": self.weights.get(t.name), "demand": None,
                        "reason": "QEMU does not answer: left alone"}
                    continue
                want = o.demand if o.demand is not None else (o.cpu_rate or 0.0)
                self.demand[t.name] = smooth_demand(self.demand.get(t.name), want)
                cpu_in.append(_cpu_input(t.name, current.get(t.name, t.intent),
                                         self.demand[t.name], o.cpu_rate or 0.0))
            self._cpu_in = cpu_in
            for d in await self._decide_weights(settings.usable_cpus):
                decisions.setdefault(d.name, {})["cpu"] = self._explain_cpu(d)

    def _explain_cpu(self, d: CpuDecision) -> dict[str, Any]:
        e = {"weight": d.weight, "reason": d.reason,
             "demand": round(self.demand.get(d.name, 0.0), 3)}
        self.cpu_explain[d.name] = e
        return e

    async def _decide_weights(self, usable: float) -> list[CpuDecision]:
        out = cpu_policy(self._cpu_in, host_cpus=tuple(range(self.observer.ncpu)),
                         usable=usable, previous=self.weights)
        for d in out:
            if d.changed and await self.controls.set_weight(d.name, d.weight):
                log.info("cpu.weight", guest=d.name, old=d.previous, new=d.weight,
                         reason=d.reason)
            self.weights[d.name] = d.weight
        return out

    async def respec(self, name: str, intent: GuestIntent) -> None:
        """A live change of ``name``'s CPU spec (shares, reserve, pin): decide every weight
        again at once, from the last tick's readings, and write what changed."""
        s = self.settings()
        if s is None or not s.enabled:
            return
        async with self._deciding:
            if not any(c.name == name for c in self._cpu_in):
                return
            self._cpu_in = [_cpu_input(name, intent, c.demand, c.usage) if c.name == name
                            else c for c in self._cpu_in]
            for d in await self._decide_weights(s.usable_cpus):
                e = self._explain_cpu(d)
                if d.name in self.explain:
                    self.explain[d.name]["cpu"] = e

    async def _restore_static(self, running: list[Tracked]) -> None:
        """Rebalancing was switched off: every weight goes back to the inventory's shares,
        and no guest's disks keep a share ceiling."""
        for t in running:
            if self.weights.get(t.name) not in (None, t.intent.cpu.shares):
                await self.controls.set_weight(t.name, t.intent.cpu.shares)
            if self.io_caps.get(t.name, (None, None)) != (None, None):
                with contextlib.suppress(QMPError):
                    await self.controls.set_io_share(t.name, None, None)
        self.weights.clear()
        self.io_caps.clear()
        self._cpu_in = []

    async def _memory(self, snap: Snapshot, running: list[Tracked], settings: LoopSettings,
                      decisions: dict[str, Any]) -> int:
        """Balloon targets; returns the budget in force after host pressure."""
        mem_in = []
        for t in running:
            o = snap.guests[t.name]
            m = t.intent.memory
            actual = o.balloon if o.balloon is not None else m.max
            if o.unresponsive_s is not None:
                # left alone, and counted at the size it holds: a size it cannot leave
                mem_in.append(MemInput(t.name, actual, actual, m.shares, actual, stale=True))
                continue
            mem_in.append(MemInput(t.name, m.max, t.intent.memory_min, m.shares, actual,
                                   o.total, o.available, o.major_fault_rate, o.swap_in_rate,
                                   o.stale, self.requested.get(t.name), o.stats_balloon))
        host = MemHost(settings.budget, snap.host.mem_available, snap.host.mem_total,
                       snap.host.psi_mem_some10, snap.host.psi_mem_full10,
                       int((snap.host.ksm_fleet or 0) * self.merge_credit))
        res = memory_policy(mem_in, host, estimates=self.estimates, holds=self.holds,
                            prev_state=self.host_state, params=self.params)
        if res.host_state is not self.host_state:
            log.warning("host.memory_state", old=self.host_state.value,
                        new=res.host_state.value, psi_some10=host.psi_some10,
                        mem_available=_mib(host.mem_available))
        self.host_state = res.host_state
        self.estimates, self.holds = res.estimates, res.holds
        for note in res.notes:
            log.debug("memory.note", note=note)
        sets = []
        for d in res.decisions:
            hung = snap.guests[d.name].unresponsive_s
            decisions.setdefault(d.name, {})["memory"] = {
                "target": d.target, "actual": d.actual, "ws": d.ws, "pressure": d.pressure,
                "reason": d.reason if hung is None else
                f"QEMU has not answered for {hung:.0f}s: left alone at its size"}
            if hung is not None:
                continue
            if abs(d.target - d.actual) >= self.params.min_change and \
                    self.requested.get(d.name) != d.target:
                sets.append(d)
        await asyncio.gather(*(self._set_balloon(d) for d in sets))
        return res.budget

    def _ksm(self, snap: Snapshot, running: list[Tracked], settings: LoopSettings) -> None:
        """ksmd's settings from the host's memory state and what merging buys."""
        obs = snap.host.ksm
        if settings.ksm is KsmMode.OFF or obs is None:
            self._ksm_off("host.ksm is off: the host's settings are left alone"
                          if obs is not None else "KSM is not available on this kernel")
            return
        mergeable = [t for t in running if t.intent.memory.merge]
        need = KsmNeed(self.host_state, sum(t.intent.memory.max for t in running),
                       settings.budget, len(mergeable))
        d = ksm_policy(settings.ksm, obs, need, self.ksm_state, self.ksm_params,
                       host=self.controls.ksm_host())
        assert d is not None
        prev_phase = self.ksm_state.phase if self.ksm_state else None
        self.ksm_state = d.state
        owner = True
        if d.changed(obs):
            owner = self.controls.set_ksm(d, obs)
            if owner:
                log.info("ksm.set", run=d.run, pages_to_scan=d.pages_to_scan,
                         sleep_ms=d.sleep_ms, phase=d.phase, budget=round(d.budget, 3),
                         reason=d.reason)
        elif d.phase != prev_phase:
            log.info("ksm.phase", phase=d.phase, reason=d.reason)
        self.ksm_explain = {
            "mode": settings.ksm.value, "phase": d.phase, "run": d.run,
            "pages_to_scan": d.pages_to_scan if d.run else None,
            "sleep_ms": d.sleep_ms if d.run else None,
            "cpu_budget": round(d.budget, 3), "cpu_predicted": round(d.predicted, 4),
            "cpu": None if snap.host.ksm_cpu is None else round(snap.host.ksm_cpu, 4),
            "saved_bytes": obs.saved, "pay": None if d.state.pay is None
            else round(d.state.pay), "reason": d.reason if owner else
            "another supervisor on this host tunes KSM: counters read only"}

    def _ksm_off(self, reason: str) -> None:
        if self.ksm_state is not None:
            self.controls.release_ksm()
            self.ksm_state = None
        self.ksm_explain = {"mode": "off", "reason": reason}

    async def _io(self, snap: Snapshot, running: list[Tracked], settings: LoopSettings,
                  decisions: dict[str, Any]) -> None:
        """Each busy guest's part of the host's disk budget, by its io.shares."""
        io_in = []
        for t in running:
            if not t.intent.drives() or snap.guests[t.name].unresponsive_s is not None:
                continue
            o = snap.guests[t.name]
            rate = None if o.disk_rd is None or o.disk_wr is None else o.disk_rd + o.disk_wr
            io_in.append(IoInput(t.name, t.intent.io.shares, rate, o.disk_iops,
                                 *_ceilings(t.intent)))
        for d in io_policy(io_in, budget_bps=settings.io_bps, budget_iops=settings.io_iops,
                           previous=self.io_caps):
            decisions.setdefault(d.name, {})["io"] = {"bps": d.bps, "iops": d.iops,
                                                      "reason": d.reason}
            if not d.changed:
                continue
            try:
                await self.controls.set_io_share(d.name, d.bps, d.iops)
            except QMPError as e:
                log.warning("io.set_failed", guest=d.name, error_class=e.error_class)
                continue
            self.io_caps[d.name] = (d.bps, d.iops)
            log.info("io.share", guest=d.name, old=d.previous, bps=d.bps, iops=d.iops,
                     reason=d.reason)

    def _notify(self, snap: Snapshot, info: dict[str, Any]) -> None:
        for hook in self.on_tick:
            try:
                hook(snap, info)
            except Exception as e:  # noqa: BLE001 - a recorder failure never stops the loop
                log.warning("rebalancer.hook_failed", error=f"{type(e).__name__}: {e}")

    async def _set_balloon(self, d: MemDecision) -> None:
        try:
            await self.controls.set_balloon(d.name, d.target)
        except QMPError as e:
            log.warning("balloon.set_failed", guest=d.name, error_class=e.error_class)
            return
        self.requested[d.name] = d.target
        log.info("balloon.set", guest=d.name, **{"from": _mib(d.actual)}, to=_mib(d.target),
                 reason=d.reason, ws=_mib(d.ws), pressure=d.pressure)

    # -------------------------------------------------------------- watchdog
    async def _watchdog(self) -> None:
        stalled = False
        while True:
            await asyncio.sleep(self.interval)
            if not self.active:
                continue
            late = time.monotonic() - self.heartbeat
            if late < 3 * self.interval:
                if stalled:
                    log.info("rebalancer.resumed")
                stalled = False
                continue
            if not stalled:
                log.error("rebalancer.stalled", late_s=round(late, 1),
                          action="walking balloons towards deflated")
                stalled = True
            for t in self.guests():
                cur = t.probe.balloon_actual
                target = watchdog_target(cur, t.intent.memory.max, self.params.stale_step)
                if target is None:
                    continue
                with contextlib.suppress(QMPError):
                    await self.controls.set_balloon(t.name, target)
                    self.requested[t.name] = target
                    self.explain.setdefault(t.name, {})["memory"] = {
                        "target": target, "actual": cur, "ws": None, "pressure": False,
                        "reason": "rebalancer stalled: watchdog deflating"}


def _ceilings(intent: GuestIntent) -> tuple[float | None, float | None]:
    """The most the guest's own limits let its disks move together: the sum over its
    disks, when every disk has one."""
    limits = [intent.disk_io] if intent.image_spec.disk else []
    limits += [d.io for d in intent.disks]
    bps = [None if io is None else (io.bps or (io.read_bps + io.write_bps
                                               if io.read_bps and io.write_bps else None))
           for io in limits]
    iops = [None if io is None else io.iops for io in limits]
    return (sum(bps) if bps and None not in bps else None,  # type: ignore[arg-type]
            sum(iops) if iops and None not in iops else None)  # type: ignore[arg-type]


def _cpu_input(name: str, intent: GuestIntent, demand: float, usage: float) -> CpuInput:
    return CpuInput(name, intent.cpu.shares, intent.cpu.reserve, intent.vcpus,
                    intent.cpu.pin, demand, usage)
