"""The rebalancer loop: observe -> decide (pure policies) -> apply only what changed.

Every ``host.rebalance.interval`` (default 1 s), or at once when the host's memory
PSI trigger fires (poll on /proc/pressure/memory), it takes one snapshot
(:mod:`.observe`), runs :func:`.cpu.cpu_policy` and :func:`.memory.memory_policy`, writes
CPU weights through the cgroup driver and balloon targets through QMP where they
changed, and logs each change with the inputs that caused it. The last decision per
guest is kept for ``status --explain``.

Fail-safe: a watchdog checks the loop's heartbeat. When the loop is dead or stalled for
``3 x interval``, it logs it and walks every balloon towards deflated (max), one step a
tick: without a controller a guest must end up with all its memory, never squeezed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable

import structlog

from ..errors import QMPError
from .cpu import CpuInput, cpu_policy
from .memory import HostState, MemHost, MemInput, MemParams, memory_policy
from .observe import Observer, Snapshot

if TYPE_CHECKING:
    from ..supervisor import Supervisor

log = structlog.get_logger("rebalancer")
MiB = 1 << 20


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n // MiB}MiB"


class PsiTrigger:
    """A kernel PSI trigger on /proc/pressure/memory, readable by the event loop."""

    def __init__(self, stall_us: int = 100_000, window_us: int = 1_000_000) -> None:
        self.fd = os.open("/proc/pressure/memory", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        os.write(self.fd, f"some {stall_us} {window_us}\0".encode())
        self.ep = select.epoll()
        self.ep.register(self.fd, select.EPOLLPRI)

    def attach(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        def fired() -> None:
            self.ep.poll(0)
            wake()
        loop.add_reader(self.ep.fileno(), fired)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(Exception):
            loop.remove_reader(self.ep.fileno())
        self.ep.close()
        os.close(self.fd)


class Rebalancer:
    def __init__(self, sup: "Supervisor", params: MemParams = MemParams()) -> None:
        self.sup = sup
        self.params = params
        self.observer = Observer()
        self.estimates: dict[str, float] = {}
        self.holds: dict[str, int] = {}
        self.demand: dict[str, float] = {}
        self.weights: dict[str, int] = {}
        self.requested: dict[str, int] = {}     # balloon targets sent, per guest
        self.host_state = HostState.NORMAL
        self.explain: dict[str, dict[str, Any]] = {}
        self.last: Snapshot | None = None
        self.heartbeat = time.monotonic()
        self.ticks = 0
        self.tick_cpu_s: list[float] = []       # supervisor CPU seconds per tick (bench)
        self.on_tick: list[Callable[[Snapshot, dict[str, Any]], None]] = []
        self._wake = asyncio.Event()
        self._psi: PsiTrigger | None = None
        self.loop_task: asyncio.Task[None] | None = None
        self.watchdog_task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        f = self.sup.fleet
        return f.host.rebalance.interval if f else 1.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._psi = PsiTrigger()
            self._psi.attach(loop, self._wake.set)
        except OSError as e:
            log.warning("rebalancer.no_psi_trigger", error=e.strerror,
                        note="the loop runs on its timer only")
        self.loop_task = asyncio.ensure_future(self._run())
        self.watchdog_task = asyncio.ensure_future(self._watchdog())

    def stop_loop(self) -> None:
        """The loop stops; the watchdog stays (test hook, and what a crash of it looks like)."""
        if self.loop_task is not None:
            self.loop_task.cancel()

    async def close(self) -> None:
        for t in (self.loop_task, self.watchdog_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if self._psi is not None:
            self._psi.close(asyncio.get_running_loop())

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
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

    def _running(self) -> list[tuple[str, Any, Any]]:
        from ..plan import GuestState
        return [(n, rt, rt.guest) for n, rt in self.sup.guests.items()
                if rt.state is GuestState.RUNNING and rt.guest is not None
                and rt.guest.qmp is not None]

    @property
    def active(self) -> bool:
        """False: observe and record only (host.rebalance.enabled: false)."""
        f = self.sup.fleet
        return bool(f and f.host.rebalance.enabled)

    async def tick(self) -> None:
        sup = self.sup
        fleet = sup.fleet
        ex = sup.executor
        if fleet is None or ex is None:
            return
        running = self._running()
        snap = await self.observer.observe([(n, g) for n, _, g in running], ex.cgroups)
        self.last = snap
        self.ticks += 1
        decisions: dict[str, Any] = {}
        if not self.active:
            self._notify(snap, {"budget": fleet.budget, "host_state": "static",
                                "decisions": {}})
            return

        # ---- CPU
        cpu_in = []
        for n, rt, g in running:
            o = snap.guests[n]
            want = o.demand if o.demand is not None else (o.cpu_rate or 0.0)
            prev = self.demand.get(n)
            dem = want if prev is None or want > prev else prev + 0.5 * (want - prev)
            self.demand[n] = dem
            cpu_in.append(CpuInput(n, rt.intent.cpu.shares, rt.intent.cpu.reserve,
                                   rt.intent.vcpus, rt.intent.cpu.pin, dem,
                                   o.cpu_rate or 0.0))
        cpu_out = cpu_policy(cpu_in, host_cpus=tuple(range(self.observer.ncpu)),
                             usable=fleet.usable_cpus, previous=self.weights)
        for d in cpu_out:
            if ex.cgroups is not None and d.changed:
                if await asyncio.to_thread(ex.cgroups.set_shares, d.name, d.weight):
                    log.info("cpu.weight", guest=d.name, old=d.previous, new=d.weight,
                             reason=d.reason)
            self.weights[d.name] = d.weight
            decisions.setdefault(d.name, {})["cpu"] = {"weight": d.weight, "reason": d.reason,
                                                       "demand": round(self.demand[d.name], 3)}

        # ---- memory
        mem_in = []
        for n, rt, g in running:
            o = snap.guests[n]
            actual = o.balloon if o.balloon is not None else rt.intent.memory.max
            mem_in.append(MemInput(n, rt.intent.memory.max, rt.intent.memory_min,
                                   rt.intent.memory.shares, actual, o.total, o.available,
                                   o.major_fault_rate, o.swap_in_rate, o.stale,
                                   self.requested.get(n), o.stats_balloon))
        host = MemHost(fleet.budget, snap.host.mem_available, snap.host.mem_total,
                       snap.host.psi_mem_some10, snap.host.psi_mem_full10)
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
            decisions.setdefault(d.name, {})["memory"] = {
                "target": d.target, "actual": d.actual, "ws": d.ws, "pressure": d.pressure,
                "reason": d.reason}
            if abs(d.target - d.actual) >= self.params.min_change and \
                    self.requested.get(d.name) != d.target:
                sets.append(d)
        g_by = {n: g for n, _, g in running}
        await asyncio.gather(*(self._set_balloon(g_by[d.name], d) for d in sets))
        for n, rt, _ in running:
            self.explain[n] = {"t": snap.t, **decisions.get(n, {})}
        self._notify(snap, {"budget": res.budget, "host_state": res.host_state.value,
                            "decisions": decisions})

    def _notify(self, snap: Snapshot, info: dict[str, Any]) -> None:
        for hook in self.on_tick:
            try:
                hook(snap, info)
            except Exception as e:  # noqa: BLE001 - a recorder failure never stops the loop
                log.warning("rebalancer.hook_failed", error=f"{type(e).__name__}: {e}")

    async def _set_balloon(self, g: Any, d: Any) -> None:
        try:
            await g.qmp.set_balloon(d.target)
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
            for n, rt, g in self._running():
                cur = g.balloon_actual or rt.intent.memory.max
                target = min(rt.intent.memory.max, cur + self.params.stale_step)
                if target > cur:
                    with contextlib.suppress(QMPError):
                        await g.qmp.set_balloon(target)
                        self.requested[n] = target
                        self.explain.setdefault(n, {})["memory"] = {
                            "target": target, "actual": cur, "ws": None, "pressure": False,
                            "reason": "rebalancer stalled: watchdog deflating"}

    def forget(self, name: str) -> None:
        for d in (self.estimates, self.holds, self.demand, self.weights, self.requested,
                  self.explain):
            d.pop(name, None)
        self.observer.forget(name)

    def snapshot_json(self) -> dict[str, Any] | None:
        return asdict(self.last) if self.last else None
