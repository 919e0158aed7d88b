"""Observation: one frozen snapshot per rebalancer interval. All of the loop's reads are here.

Per guest:
- CPU as a rate of cores, from its cgroup; *demand* = time on a CPU + time runnable but
  waiting for one (``run_delay`` in /proc/PID/task/*/schedstat). Under contention usage
  alone understates what a guest wants: a guest held to 1 % by weights looks idle;
- cgroup memory current, the balloon's actual size (kept current from QMP
  BALLOON_CHANGE events, so no query per tick);
- guest stats (available, free, total, disk caches; major faults and swap-in as
  rates). Stats older than ``stale_after`` are *unknown*, never idle.
  With them, the range of sizes the balloon may have had when they were taken.

Host: MemAvailable, PSI for memory and CPU (avg10), CPU busy in cores.

The observer sees guests only through :class:`Tracked` (a name, its intent and a
:class:`GuestProbe`) and cgroups only through a usage reader: it never holds the
supervisor or a QEMU object. A reading that fails is not dropped in silence: it is
named in the guest's ``errors`` (``status`` shows them) and logged when it starts
failing and when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from ..errors import ConsolidatorError, QMPError
from ..hostfacts import HostFacts, read_meminfo
from ..model import GuestIntent
from .cgroup import CgroupUsage, host_psi

log = structlog.get_logger("observe")
UsageReader = Callable[[str], CgroupUsage]


class GuestProbe(Protocol):
    """What the loop reads of a running guest (a :class:`consolidator.vm.guest.Guest`)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def balloon_actual(self) -> int | None: ...

    def balloon_range(self, since: float) -> tuple[int, int] | None: ...

    async def guest_stats(self) -> Any: ...


@dataclass(frozen=True)
class Tracked:
    """A running guest as the rebalancer sees it."""

    name: str
    intent: GuestIntent
    probe: GuestProbe


@dataclass(frozen=True)
class GuestObs:
    name: str
    cpu_rate: float | None = None         # cores used over the interval
    demand: float | None = None           # cores wanted: used + waiting to run
    cgroup_memory: int | None = None
    balloon: int | None = None
    total: int | None = None
    available: int | None = None
    free: int | None = None
    disk_caches: int | None = None
    major_fault_rate: float = 0.0
    swap_in_rate: float = 0.0
    stale: bool = True
    # smallest and largest size the balloon may have had when the stats were taken
    stats_balloon: tuple[int, int] | None = None
    errors: tuple[str, ...] = ()          # readings that failed this tick, and why

    def working_set(self, max_bytes: int) -> int | None:
        """Memory the guest uses, ballooned pages excluded: ``total - available -
        (max - balloon)``, against the balloon's current size (exact once it is still)."""
        if self.total is None or self.available is None or self.balloon is None:
            return None
        return max(0, self.total - self.available - (max_bytes - self.balloon))


@dataclass(frozen=True)
class HostObs:
    mem_available: int
    mem_total: int
    psi_mem_some10: float
    psi_mem_full10: float
    psi_cpu_some10: float
    cpu_busy: float | None                # cores busy over the interval


@dataclass(frozen=True)
class Snapshot:
    t: float                              # wall clock
    mono: float
    host: HostObs
    guests: dict[str, GuestObs]


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting) summed over the process's threads.
    Plain descriptors, no pathlib: this runs for every thread of every guest each tick,
    and was a third of the idle supervisor's busy time."""
    run = wait = 0
    base = f"/proc/{pid}/task/"
    for tid in os.listdir(base):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fd = os.open(base + tid + "/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                fields = os.read(fd, 128).split()
            finally:
                os.close(fd)
            run += int(fields[0])
            wait += int(fields[1])
    return run, wait


def _proc_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts), idle


class Observer:
    def __init__(self, stale_after: float = 4.0, ncpu: int | None = None) -> None:
        self.stale_after = stale_after
        self.ncpu = max(1, ncpu if ncpu is not None else HostFacts.probe().ncpus)
        self._prev: dict[str, dict[str, Any]] = {}
        self._host_prev: dict[str, Any] = {}
        self._failing: dict[str, tuple[str, ...]] = {}

    def forget(self, name: str) -> None:
        self._prev.pop(name, None)
        self._failing.pop(name, None)

    async def observe(self, guests: list[Tracked], usage: UsageReader | None) -> Snapshot:
        now, mono = time.time(), time.monotonic()
        host = self._host(mono)
        stats = await asyncio.gather(*(self._guest_stats(t.probe) for t in guests))
        out: dict[str, GuestObs] = {}
        for t, (st, st_err) in zip(guests, stats):
            out[t.name] = self._guest(t.name, t.probe, usage, st, st_err, now, mono)
            self._report(t.name, out[t.name].errors)
        return Snapshot(now, mono, host, out)

    def _report(self, name: str, errors: tuple[str, ...]) -> None:
        """Log a guest's failing readings when they start and when they stop failing."""
        before = self._failing.get(name, ())
        if errors and errors != before:
            log.warning("observe.reading_failed", guest=name, errors=list(errors))
        elif before and not errors:
            log.info("observe.reading_recovered", guest=name)
        self._failing[name] = errors

    @staticmethod
    async def _guest_stats(probe: GuestProbe) -> tuple[Any, str | None]:
        try:
            return await probe.guest_stats(), None
        except QMPError as e:
            return None, f"guest stats: {e.error_class or 'QMPError'}: {e.message}"

    def _host(self, mono: float) -> HostObs:
        mi = read_meminfo()
        psi = host_psi()
        total, idle = _proc_stat()
        prev = self._host_prev
        busy = None
        if prev:
            dt_ticks = total - prev["total"]
            if dt_ticks > 0:
                busy = (dt_ticks - (idle - prev["idle"])) / dt_ticks * self.ncpu
        mem = psi.get("memory", {})
        self._host_prev = {"total": total, "idle": idle}
        return HostObs(mi.get("MemAvailable", 0), mi.get("MemTotal", 0),
                       mem.get("some_avg10", 0.0), mem.get("full_avg10", 0.0),
                       psi.get("cpu", {}).get("some_avg10", 0.0), busy)

    def _guest(self, name: str, g: GuestProbe, usage: UsageReader | None, st: Any,
               st_error: str | None, now: float, mono: float) -> GuestObs:
        prev = self._prev.get(name, {})
        cur: dict[str, Any] = {"mono": mono}
        fields: dict[str, Any] = {"balloon": g.balloon_actual}
        errors = [st_error] if st_error else []
        dt = mono - prev["mono"] if "mono" in prev else None
        if usage is not None:
            try:
                cs = usage(name)
            except (OSError, ValueError, ConsolidatorError) as e:
                errors.append(f"cgroup usage: {type(e).__name__}: {e}")
            else:
                cur["cpu_ns"] = cs.cpu_usage_ns
                fields["cgroup_memory"] = cs.memory_current
                if dt and "cpu_ns" in prev:
                    fields["cpu_rate"] = max(0.0, (cs.cpu_usage_ns - prev["cpu_ns"]) / 1e9 / dt)
        if g.pid:
            try:
                run, wait = schedstat(g.pid)
                cur["run"], cur["wait"] = run, wait
                if dt and "run" in prev:
                    demand = ((run - prev["run"]) + (wait - prev["wait"])) / 1e9 / dt
                    fields["demand"] = max(0.0, demand)
            except OSError as e:
                errors.append(f"/proc/{g.pid}: {e.strerror or e}")
        if st is not None and st.last_update:
            fields["stale"] = now - st.last_update > self.stale_after or st.available is None
            fields.update(total=st.total, available=st.available, free=st.free,
                          disk_caches=st.disk_caches)
            # QEMU stamps stats in whole seconds and sends BALLOON_CHANGE at most once a
            # second, so the stats were taken at some balloon size seen from a second
            # before their stamp until now
            fields["stats_balloon"] = g.balloon_range(st.last_update - 1.0)
            cur["stats_t"] = st.last_update
            cur["faults"], cur["swin"] = st.major_faults or 0, st.swap_in or 0
            if "stats_t" in prev and st.last_update > prev["stats_t"]:
                sdt = st.last_update - prev["stats_t"]
                fields["major_fault_rate"] = max(0.0, (cur["faults"] - prev["faults"]) / sdt)
                fields["swap_in_rate"] = max(0.0, (cur["swin"] - prev["swin"]) / sdt)
            elif "stats_t" in prev:      # no new stats this tick: keep the last rates
                cur.update({k: prev[k] for k in ("stats_t", "faults", "swin")})
                for k in ("major_fault_rate", "swap_in_rate"):
                    if k in prev:
                        fields[k] = prev[k]
            for k in ("major_fault_rate", "swap_in_rate"):
                if k in fields:
                    cur[k] = fields[k]
        self._prev[name] = {**prev, **cur}
        return GuestObs(name=name, errors=tuple(errors), **fields)

