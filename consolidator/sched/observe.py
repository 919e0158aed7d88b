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
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import structlog

from ..errors import ConsolidatorError, QMPError
from ..hostfacts import HostFacts, parse_meminfo
from ..linux import HeldFiles
from ..model import GuestIntent
from .cgroup import CgroupUsage, host_psi
from .ksm import KsmObs, guest_saved
from .ksmfs import KsmSysfs, available as ksm_available, merging_pages

log = structlog.get_logger("observe")
UsageReader = Callable[[str], CgroupUsage]
#: each guest's NIC counters summed, seen from the fabric's side of its veths:
#: (bytes to the guest, bytes from it, packets to it, packets from it)
NetReader = Callable[[], dict[str, tuple[int, int, int, int]]]


class GuestProbe(Protocol):
    """What the loop reads of a running guest (a :class:`consolidator.vm.guest.Guest`)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def balloon_actual(self) -> int | None: ...

    def balloon_range(self, since: float) -> tuple[int, int] | None: ...

    async def guest_stats(self) -> Any: ...

    async def disk_counters(self) -> dict[str, Any]:
        """Each disk's counters (rd_bytes, wr_bytes, rd_ops, wr_ops) since QEMU began."""

    async def ping(self) -> None:
        """One QMP round trip (query-status). Raises QMPError."""


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
    # I/O over the interval (bytes or operations a second), and counters since start
    disk_rd: float | None = None
    disk_wr: float | None = None
    disk_iops: float | None = None
    net_rx: float | None = None           # to the guest
    net_tx: float | None = None           # from the guest
    disk_bytes: tuple[int, int] | None = None     # read, written
    disk_ops: tuple[int, int] | None = None
    net_bytes: tuple[int, int] | None = None      # to, from
    # smallest and largest size the balloon may have had when the stats were taken
    stats_balloon: tuple[int, int] | None = None
    ksm_pages: int | None = None          # its pages KSM merged (None: not known)
    ksm_saved: int | None = None          # bytes of its memory the host does not hold
    unresponsive_s: float | None = None   # QEMU has not answered QMP for this long
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
    disk_bps: float | None = None         # the guests' disks, read and written, in all
    ksm: KsmObs | None = None             # ksmd's settings and counters (None: no KSM)
    ksm_cpu: float | None = None          # cores ksmd used over the interval
    ksm_fleet: int | None = None          # of ksm.saved, the part in the fleet's guests

    @property
    def ksm_saved(self) -> int | None:
        return self.ksm.saved if self.ksm is not None else None


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


_HUNG = object()     # an answer that did not come in time


async def _no_net() -> tuple[None, None]:
    return None, None


def _read_net(net: NetReader | None) -> tuple[dict[str, tuple[int, int, int, int]] | None,
                                               str | None]:
    if net is None:
        return None, None
    try:
        return net(), None
    except (OSError, ConsolidatorError) as e:
        return None, f"NIC counters: {type(e).__name__}: {e}"


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


ANSWER_WITHIN_S = 1.5   # a QEMU that takes longer to answer the loop is unresponsive
QUIET_CPU_S = 0.020     # a guest that ran less since its stats were asked: ask later
IO_QUIET_CPU_S = 0.002  # ... and since its disks were asked: a request costs QEMU more
REFRESH_AFTER_S = 3.0   # ... but no later than this: the policy converges as when asked


class Observer:
    def __init__(self, stale_after: float = 4.0, ncpu: int | None = None,
                 quiet_cpu_s: float = QUIET_CPU_S,
                 refresh_after: float = REFRESH_AFTER_S,
                 ksm: KsmSysfs | None | Literal["probe"] = "probe") -> None:
        # "probe": look for KSM here; None: the caller found none, so none is read
        self.ksm = ksm if ksm != "probe" else (KsmSysfs() if ksm_available() else None)
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
        self.disks_asked = 0
        self._disks: dict[str, tuple[float, int | None, Any]] = {}   # mono, cpu_ns, totals
        self.answer_within = ANSWER_WITHIN_S
        self._hung: dict[str, float] = {}          # guest -> since when it does not answer
        self._pings: dict[str, asyncio.Task[bool]] = {}

    def forget(self, name: str) -> None:
        prev = self._prev.pop(name, None)
        if prev and "pid" in prev:
            self._held.forget(f"/proc/{prev['pid']}/")
        self._failing.pop(name, None)
        self._stats.pop(name, None)
        self._disks.pop(name, None)
        self._hung.pop(name, None)
        ping = self._pings.pop(name, None)
        if ping is not None:
            ping.cancel()

    def close(self) -> None:
        for ping in self._pings.values():
            ping.cancel()
        self._pings.clear()
        self._held.close()

    async def observe(self, guests: list[Tracked], usage: UsageReader | None,
                      net: NetReader | None = None) -> Snapshot:
        now, mono = time.time(), time.monotonic()
        for gone in set(self._prev) - {t.name for t in guests}:
            self.forget(gone)                     # its held files go with it
        host = self._host(mono)
        cgroup = {t.name: self._cgroup(t.name, usage) for t in guests}
        self._hear_pings(mono)
        # a guest that stopped answering is not asked by the loop (each ask would hold
        # the tick for everyone): a ping of its own, off the tick, says when it is back
        for t in guests:
            if t.name in self._hung and t.name not in self._pings:
                self._pings[t.name] = asyncio.ensure_future(self._ping(t.probe))
        due = [t for t in guests if t.name not in self._hung and
               self._stats_due(t.name, cgroup[t.name], t.probe.balloon_actual, mono)]
        disk_due = [t for t in guests if t.intent.drives() and t.name not in self._hung
                    and self._disks_due(t.name, cgroup[t.name], mono)]
        # the NICs' counters are a netlink dump: in a thread (pyroute2's sync socket will
        # not run inside the loop), while the loop asks the QEMUs
        answers, disk_answers, nets = await asyncio.gather(
            asyncio.gather(*(self._guest_stats(t.probe) for t in due)),
            asyncio.gather(*(self._disk_counters(t.probe) for t in disk_due)),
            asyncio.to_thread(_read_net, net) if net is not None else _no_net())
        self.stats_asked += len(due)
        self.disks_asked += len(disk_due)
        disk_errors: dict[str, str] = {}
        for t, (totals, d_err) in zip(disk_due, disk_answers):
            cs = cgroup[t.name]
            if totals is _HUNG:
                self._hang(t.name, mono)
                disk_errors[t.name] = d_err or ""
                continue
            if d_err:
                disk_errors[t.name] = d_err
            else:
                self._disks[t.name] = (mono, cs.cpu_usage_ns if isinstance(cs, CgroupUsage)
                                       else None, totals)
        errors: dict[str, str | None] = {}
        for t, (st, st_err) in zip(due, answers):
            errors[t.name] = st_err
            if st is _HUNG:
                self._hang(t.name, mono)
                continue
            cs = cgroup[t.name]
            self._stats[t.name] = _Asked(mono, now, cs.cpu_usage_ns if isinstance(
                cs, CgroupUsage) else None, t.probe.balloon_actual, st)
        out: dict[str, GuestObs] = {}
        for t in guests:
            o = self._guest(t.name, t.probe, cgroup[t.name],
                            self._stats.get(t.name), errors.get(t.name), now, mono)
            o = self._io(o, self._disks.get(t.name), disk_errors.get(t.name),
                         nets[0].get(t.name) if nets[0] is not None else None, nets[1], mono)
            late: dict[str, Any] = self._merged(t.probe.pid, host.ksm)
            if t.name in self._hung:
                late.update(unresponsive_s=mono - self._hung[t.name], stale=True)
            out[t.name] = dataclasses.replace(o, **late) if late else o
            self._report(t.name, o.errors)
        rates = [o.disk_rd + o.disk_wr for o in out.values()
                 if o.disk_rd is not None and o.disk_wr is not None]
        fleet = sum(o.ksm_saved or 0 for o in out.values()) if host.ksm is not None else None
        host = dataclasses.replace(host, disk_bps=sum(rates) if rates else None,
                                   ksm_fleet=fleet)
        return Snapshot(now, mono, host, out)

    def _merged(self, pid: int | None, ksm: KsmObs | None) -> dict[str, Any]:
        """A guest's merged pages (one pread of its QEMU's counter), and its part of what
        merging saves. Nothing merged anywhere: zero, nothing read."""
        if ksm is None or not pid:
            return {}
        pages = 0 if ksm.pages_shared == 0 else merging_pages(pid, self._held)
        return {} if pages is None else {"ksm_pages": pages,
                                         "ksm_saved": guest_saved(pages, ksm)}

    def _disks_due(self, name: str, cs: CgroupUsage | str | None, mono: float) -> bool:
        """A guest's disks are read when it has run since (QEMU works for every request
        it serves, so a guest that did not run did no I/O) or every ``refresh_after``."""
        last = self._disks.get(name)
        if last is None or last[1] is None or not isinstance(cs, CgroupUsage):
            return True
        return mono - last[0] >= self.refresh_after or \
            cs.cpu_usage_ns - last[1] >= IO_QUIET_CPU_S * 1e9

    async def _disk_counters(self, probe: GuestProbe) -> tuple[Any, str | None]:
        try:
            async with asyncio.timeout(self.answer_within):
                per = await probe.disk_counters()
        except TimeoutError:
            return _HUNG, f"disk counters: no answer within {self.answer_within:g}s"
        except QMPError as e:
            return (_HUNG if e.error_class == "Timeout" else None,
                    f"disk counters: {e.error_class or 'QMPError'}: {e.message}")
        return (sum(c.rd_bytes for c in per.values()), sum(c.wr_bytes for c in per.values()),
                sum(c.rd_ops for c in per.values()), sum(c.wr_ops for c in per.values())), None

    def _io(self, o: GuestObs, disks: tuple[float, int | None, Any] | None,
            disk_error: str | None, net: tuple[int, int, int, int] | None,
            net_error: str | None, mono: float) -> GuestObs:
        """Rates from the counters' last readings: disks as of when they were last asked
        (unchanged since, when not asked: the guest did not run), NICs every tick."""
        prev = self._prev.get(o.name, {})
        cur: dict[str, Any] = {}
        f: dict[str, Any] = {}
        errors = list(o.errors) + [e for e in (disk_error, net_error) if e]
        if disks is not None:
            t_read, _, (rd, wr, rops, wops) = disks
            f.update(disk_bytes=(rd, wr), disk_ops=(rops, wops))
            last = prev.get("disk")               # (time, read, written, ops) before
            if last is None or t_read > last[0]:  # a new reading
                if last is not None and rd >= last[1] and wr >= last[2]:
                    dt = t_read - last[0]
                    f.update(disk_rd=(rd - last[1]) / dt, disk_wr=(wr - last[2]) / dt,
                             disk_iops=(rops + wops - last[3]) / dt)
                cur["disk"] = (t_read, rd, wr, rops + wops)
            else:                                 # not asked: it did not run, so no I/O
                f.update(disk_rd=0.0, disk_wr=0.0, disk_iops=0.0)
        if net is not None:
            f["net_bytes"] = (net[0], net[1])
            cur["net"] = (mono, net[0], net[1])
            if "net" in prev and mono > prev["net"][0] and net[0] >= prev["net"][1] \
                    and net[1] >= prev["net"][2]:
                dt = mono - prev["net"][0]
                f.update(net_rx=(net[0] - prev["net"][1]) / dt,
                         net_tx=(net[1] - prev["net"][2]) / dt)
        self._prev[o.name] = {**prev, **cur}
        return dataclasses.replace(o, errors=tuple(errors), **f)

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

    def _hang(self, name: str, mono: float) -> None:
        if name not in self._hung:
            self._hung[name] = mono
            log.warning("observe.unresponsive", guest=name, within_s=self.answer_within,
                        action="not asked by the loop, left alone; pinged until it answers")

    async def _ping(self, probe: GuestProbe) -> bool:
        try:
            async with asyncio.timeout(self.answer_within):
                await probe.ping()
            return True
        except (TimeoutError, QMPError):
            return False

    def _hear_pings(self, mono: float) -> None:
        """Pings that ended: a guest that answered is asked by the loop again."""
        for name, task in list(self._pings.items()):
            if not task.done():
                continue
            del self._pings[name]
            if not task.cancelled() and task.exception() is None and task.result():
                since = self._hung.pop(name, None)
                log.info("observe.responsive_again", guest=name,
                         after_s=None if since is None else round(mono - since, 1))
                self._stats.pop(name, None)        # asked afresh, not read as stale

    def _report(self, name: str, errors: tuple[str, ...]) -> None:
        """Log a guest's failing readings when they start and when they stop failing."""
        before = self._failing.get(name, ())
        if errors and errors != before:
            log.warning("observe.reading_failed", guest=name, errors=list(errors))
        elif before and not errors:
            log.info("observe.reading_recovered", guest=name)
        self._failing[name] = errors

    async def _guest_stats(self, probe: GuestProbe) -> tuple[Any, str | None]:
        try:
            async with asyncio.timeout(self.answer_within):
                return await probe.guest_stats(), None
        except TimeoutError:
            return _HUNG, f"guest stats: no answer within {self.answer_within:g}s"
        except QMPError as e:
            return (_HUNG if e.error_class == "Timeout" else None,
                    f"guest stats: {e.error_class or 'QMPError'}: {e.message}")

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
        ksm = self.ksm.read(self._held, mono) if self.ksm is not None else None
        ksm_cpu = None
        if ksm is not None and prev.get("ksm") is not None and mono > prev["ksm"].mono:
            ksm_cpu = max(0.0, (ksm.cpu_s - prev["ksm"].cpu_s) / (mono - prev["ksm"].mono))
        self._host_prev = {"total": total, "idle": idle, "ksm": ksm}
        return HostObs(mi.get("MemAvailable", 0), mi.get("MemTotal", 0),
                       mem.get("some_avg10", 0.0), mem.get("full_avg10", 0.0),
                       psi.get("cpu", {}).get("some_avg10", 0.0), busy, ksm=ksm,
                       ksm_cpu=ksm_cpu)

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

