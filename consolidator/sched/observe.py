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
  A guest cannot change its memory without running, so a guest is asked again only
  once it has run ``quiet_cpu_s`` of CPU since it was last asked (20 ms: a few MiB of
  page touching under TCG), its balloon has moved, or ``refresh_after`` (3 s) has
  passed; its last answer
  stands meanwhile, judged stale or not as of when it was given. The cgroup is read
  first, so a guest that starts allocating is asked in the very tick it is seen running,
  and a hung guest (no CPU, stats no longer updated) shows stale within ``refresh_after``.
  Each ask is a QMP round trip, about 0.4 ms of supervisor CPU: idle guests were most of
  an idle supervisor's work.

Files read every tick (cgroup counters, each thread's schedstat, meminfo, PSI) are held
open and read with one ``pread`` each (:class:`consolidator.linux.HeldFiles`).

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
from ..hostfacts import HostFacts, parse_meminfo
from ..linux import HeldFiles
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
class _Asked:
    """A guest's last answer to "your stats?", and when it was given."""
    mono: float
    t: float                              # wall clock
    cpu_ns: int | None                    # the guest's CPU counter then
    balloon: int | None                   # the balloon's size then
    stats: Any


@dataclass(frozen=True)
class Snapshot:
    t: float                              # wall clock
    mono: float
    host: HostObs
    guests: dict[str, GuestObs]


def schedstat(pid: int, held: HeldFiles) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting) summed over the process's threads. Each
    thread's file stays open in ``held`` between calls; a thread that ended is let go."""
    run = wait = 0
    base = f"/proc/{pid}/task/"
    seen = set()
    for tid in os.listdir(base):
        path = base + tid + "/schedstat"
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = held.read(path).split()
            seen.add(path)
            run += int(fields[0])
            wait += int(fields[1])
    held.keep_only(base, seen)
    return run, wait


def _proc_stat(held: HeldFiles) -> tuple[int, int]:
    line = held.read("/proc/stat").split(b"\n", 1)[0]
    parts = [int(x) for x in line.split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts), idle


QUIET_CPU_S = 0.020     # a guest that ran less since its stats were asked: ask later
REFRESH_AFTER_S = 3.0   # ... but no later than this: the policy converges as when asked


class Observer:
    def __init__(self, stale_after: float = 4.0, ncpu: int | None = None,
                 quiet_cpu_s: float = QUIET_CPU_S,
                 refresh_after: float = REFRESH_AFTER_S) -> None:
        self.stale_after = stale_after
        self.refresh_after = refresh_after
        self.quiet_cpu_ns = int(quiet_cpu_s * 1e9)
        self.ncpu = max(1, ncpu if ncpu is not None else HostFacts.probe().ncpus)
        self._prev: dict[str, dict[str, Any]] = {}
        self._host_prev: dict[str, Any] = {}
        self._failing: dict[str, tuple[str, ...]] = {}
        self._stats: dict[str, _Asked] = {}
        self._held = HeldFiles()
        self.stats_asked = 0          # guest-stats queries made (bench and tests)

    def forget(self, name: str) -> None:
        prev = self._prev.pop(name, None)
        if prev and "pid" in prev:
            self._held.forget(f"/proc/{prev['pid']}/")
        self._failing.pop(name, None)
        self._stats.pop(name, None)

    def close(self) -> None:
        self._held.close()

    async def observe(self, guests: list[Tracked], usage: UsageReader | None) -> Snapshot:
        now, mono = time.time(), time.monotonic()
        for gone in set(self._prev) - {t.name for t in guests}:
            self.forget(gone)                     # its held files go with it
        host = self._host(mono)
        cgroup = {t.name: self._cgroup(t.name, usage) for t in guests}
        due = [t for t in guests
               if self._stats_due(t.name, cgroup[t.name], t.probe.balloon_actual, mono)]
        answers = await asyncio.gather(*(self._guest_stats(t.probe) for t in due))
        self.stats_asked += len(due)
        errors: dict[str, str | None] = {}
        for t, (st, st_err) in zip(due, answers):
            errors[t.name] = st_err
            cs = cgroup[t.name]
            self._stats[t.name] = _Asked(mono, now, cs.cpu_usage_ns if isinstance(
                cs, CgroupUsage) else None, t.probe.balloon_actual, st)
        out: dict[str, GuestObs] = {}
        for t in guests:
            out[t.name] = self._guest(t.name, t.probe, cgroup[t.name],
                                      self._stats.get(t.name), errors.get(t.name), now, mono)
            self._report(t.name, out[t.name].errors)
        return Snapshot(now, mono, host, out)

    @staticmethod
    def _cgroup(name: str, usage: UsageReader | None) -> CgroupUsage | str | None:
        if usage is None:
            return None
        try:
            return usage(name)
        except (OSError, ValueError, ConsolidatorError) as e:
            return f"cgroup usage: {type(e).__name__}: {e}"

    def _stats_due(self, name: str, cs: CgroupUsage | str | None, balloon: int | None,
                   mono: float) -> bool:
        """Ask a guest for its stats this tick unless it has hardly run since it was
        last asked, that was recently, and its balloon has not moved since (a working set
        is its stats against the balloon they were taken with)."""
        asked = self._stats.get(name)
        if asked is None or asked.stats is None or asked.cpu_ns is None \
                or not isinstance(cs, CgroupUsage) or balloon != asked.balloon:
            return True
        return mono - asked.mono >= self.refresh_after or \
            cs.cpu_usage_ns - asked.cpu_ns >= self.quiet_cpu_ns

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
        mi = parse_meminfo(self._held.read("/proc/meminfo").decode())
        psi = host_psi(self._held)
        total, idle = _proc_stat(self._held)
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

    def _guest(self, name: str, g: GuestProbe, cs: CgroupUsage | str | None,
               asked: _Asked | None, st_error: str | None, now: float, mono: float
               ) -> GuestObs:
        st = asked.stats if asked is not None else None
        prev = self._prev.get(name, {})
        cur: dict[str, Any] = {"mono": mono}
        fields: dict[str, Any] = {"balloon": g.balloon_actual}
        errors = [st_error] if st_error else []
        dt = mono - prev["mono"] if "mono" in prev else None
        if isinstance(cs, str):
            errors.append(cs)
        elif cs is not None:
            cur["cpu_ns"] = cs.cpu_usage_ns
            fields["cgroup_memory"] = cs.memory_current
            if dt and "cpu_ns" in prev:
                fields["cpu_rate"] = max(0.0, (cs.cpu_usage_ns - prev["cpu_ns"]) / 1e9 / dt)
        if g.pid:
            if prev.get("pid") not in (None, g.pid):
                self._held.forget(f"/proc/{prev['pid']}/")
            cur["pid"] = g.pid
            try:
                run, wait = schedstat(g.pid, self._held)
                cur["run"], cur["wait"] = run, wait
                if dt and "run" in prev:
                    demand = ((run - prev["run"]) + (wait - prev["wait"])) / 1e9 / dt
                    fields["demand"] = max(0.0, demand)
            except OSError as e:
                errors.append(f"/proc/{g.pid}: {e.strerror or e}")
        if asked is not None and st is not None and st.last_update:
            # as of when it was asked: a quiet guest's answer stands until it is asked again
            fields["stale"] = asked.t - st.last_update > self.stale_after or \
                st.available is None
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

