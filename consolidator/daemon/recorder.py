"""Recording: one history sample per rebalancer tick, downsampling off the loop, and the
guests' serial lines into their event logs.

- :meth:`Recorder.on_tick` is a hook on the rebalancer's tick: the snapshot and the
  decisions become one host row and one row per guest, in one transaction.
- :meth:`Recorder.maintain` aggregates, prunes and checkpoints every 60 s in a worker
  thread, on a connection of its own: the tick only ever pays for its small transaction.
- :meth:`Recorder.tail` copies new serial lines into each guest's ``log.jsonl`` every
  interval (:func:`.guestlog.tail_serial`), so ``logs`` needs no daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any

import structlog

from ..errors import HistoryUnavailable, StateError
from ..report.history import History, Retention, maintain_file
from ..sched.observe import Snapshot
from . import guestlog
from .runtime import Runtime

log = structlog.get_logger("supervisor")
MAINTAIN_EVERY = 60.0    # aggregation is by the minute: more often finds nothing to do


class Recorder:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.history: History | None = None
        self.record_ms: list[float] = []
        self.error: str | None = None         # why nothing is recorded, said once
        self.failing_since: float | None = None
        self.lost = 0                         # samples not recorded since it began failing
        self._retry_at = 0.0

    def _history(self) -> History | None:
        fleet = self.runtime.fleet
        if self.history is None and fleet is not None and time.monotonic() >= self._retry_at:
            h = fleet.host.history
            try:
                self.history = History(self.runtime.state.history_path,
                                       Retention(h.raw, h.minute, h.hour))
            except StateError as e:
                # unavailable for now (a full disk): tried again soon; a file that is not
                # a history: every minute (someone must move it aside)
                again = 2.0 if isinstance(e, HistoryUnavailable) else 60.0
                self._failed(e.message, "history.unusable", count=False, hint=e.hint,
                             note=f"nothing is recorded; tried again every {again:g}s")
                self._retry_at = time.monotonic() + again
                return None
        return self.history

    def _failed(self, msg: str, event: str, count: bool = True, **kw: Any) -> None:
        """A sample not recorded: said once per cause, counted."""
        if self.error != msg:
            log.error(event, error=msg, **kw)
            self.error = msg
        if self.failing_since is None:
            self.failing_since = time.time()
        self.lost += count

    def close(self) -> None:
        if self.history is not None:
            with contextlib.suppress(Exception):
                self.history.close()

    def on_tick(self, snap: Snapshot, info: dict[str, Any]) -> None:
        """One history sample per interval (one transaction)."""
        hist = self._history()
        if hist is None:
            if self.runtime.fleet is not None and self.error is not None:
                self.lost += 1
            return
        t0 = time.perf_counter()
        host = snap.host
        guests = {}
        for n, g in self.runtime.guests.items():
            o = snap.guests.get(n)
            mem = (info.get("decisions", {}).get(n) or {}).get("memory") or {}
            ws = mem.get("ws")
            if ws is None and o is not None:
                ws = o.working_set(g.intent.memory.max)
            guests[n] = {"state": g.state.value,
                         "cpu": o.cpu_rate if o else None, "ws": ws,
                         "available": o.available if o else None,
                         "balloon": o.balloon if o else None,
                         "cgmem": o.cgroup_memory if o else None,
                         "max": g.intent.memory.max,
                         "disk_rd": o.disk_rd if o else None,
                         "disk_wr": o.disk_wr if o else None,
                         "disk_iops": o.disk_iops if o else None,
                         "net_rx": o.net_rx if o else None,
                         "net_tx": o.net_tx if o else None,
                         "ksm_saved": o.ksm_saved if o else None}
        try:
            self._record(hist, snap, host, info, guests)
        except (sqlite3.Error, OSError) as e:
            # a full disk, most likely: said once, counted, retried every tick (the
            # transaction was rolled back: the file holds every sample it had)
            self._failed(f"{type(e).__name__}: {e}", "history.write_failed",
                         note="nothing is recorded until it succeeds again; tried every "
                              "tick")
            return
        if self.failing_since is not None or self.error is not None:
            log.info("history.recording_again", lost_samples=self.lost,
                     failed_for_s=round(time.time() - (self.failing_since or time.time()), 1))
            self.error, self.failing_since, self.lost = None, None, 0
        self.record_ms.append((time.perf_counter() - t0) * 1000)
        del self.record_ms[:-200]

    def state(self) -> dict[str, Any]:
        """For status and the metrics: whether samples are being recorded, and if not,
        why, since when, and how many were lost."""
        return {"recording": self.error is None and self.history is not None,
                "error": self.error, "failing_since": self.failing_since,
                "lost_samples": self.lost}

    @staticmethod
    def _record(hist: History, snap: Snapshot, host: Any, info: dict[str, Any],
                guests: dict[str, Any]) -> None:
        hist.record(snap.t, {"cpu": host.cpu_busy, "mem_available": host.mem_available,
                             "mem_used": host.mem_total - host.mem_available,
                             "psi_mem": host.psi_mem_some10, "psi_cpu": host.psi_cpu_some10,
                             "budget": info.get("budget"), "disk_bps": host.disk_bps,
                             "io_budget": info.get("io_budget"),
                             "ksm_saved": host.ksm_saved,
                             "ksm_shared": host.ksm.pages_shared * 4096 if host.ksm else None,
                             "ksm_cpu": host.ksm_cpu,
                             "ksm_fleet": host.ksm_fleet}, guests, maintain=False)

    async def maintain(self) -> None:
        """Downsampling and retention, forever, off the event loop."""
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            hist = self.history
            if hist is None:
                continue
            try:
                took = await asyncio.to_thread(maintain_file, hist.path, hist.retention)
                if took > 1.0:
                    log.info("history.maintenance_slow", seconds=round(took, 2))
            except Exception as e:  # noqa: BLE001 - history must never stop the supervisor
                log.warning("history.maintenance_failed", error=f"{type(e).__name__}: {e}")

    async def tail(self) -> None:
        """Every interval: the guests' new serial lines into their event logs."""
        state = self.runtime.state
        failing: dict[str, str] = {}          # said once per guest and error
        while True:
            fleet = self.runtime.fleet
            interval = fleet.host.rebalance.interval if fleet else 1.0
            for g in list(self.runtime.guests.values()):
                try:
                    g.serial_offset, g.serial_seen = guestlog.tail_serial(
                        state.guest_dir(g.name) / "serial.log",
                        state.guest_log_path(g.name), g.serial_offset, g.serial_seen)
                except OSError as e:   # the next interval tries again
                    if failing.get(g.name) != str(e):
                        log.warning("serial.tail_failed", guest=g.name, error=str(e),
                                    note="tried every interval; said once")
                        failing[g.name] = str(e)
                    continue
                if failing.pop(g.name, None) is not None:
                    log.info("serial.tail_again", guest=g.name)
            await asyncio.sleep(interval)
