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
import time
from typing import Any

import structlog

from ..errors import StateError
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
        self._retry_at = 0.0

    def _history(self) -> History | None:
        fleet = self.runtime.fleet
        if self.history is None and fleet is not None and time.monotonic() >= self._retry_at:
            h = fleet.host.history
            try:
                self.history = History(self.runtime.state.history_path,
                                       Retention(h.raw, h.minute, h.hour))
            except StateError as e:
                if e.message != self.error:
                    log.error("history.unusable", error=e.message, hint=e.hint,
                              note="nothing is recorded; tried again every minute")
                self.error = e.message
                self._retry_at = time.monotonic() + 60
                return None
            if self.error:
                log.info("history.recording_again")
            self.error = None
        return self.history

    def close(self) -> None:
        if self.history is not None:
            with contextlib.suppress(Exception):
                self.history.close()

    def on_tick(self, snap: Snapshot, info: dict[str, Any]) -> None:
        """One history sample per interval (one transaction)."""
        hist = self._history()
        if hist is None:
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
        hist.record(snap.t, {"cpu": host.cpu_busy, "mem_available": host.mem_available,
                             "mem_used": host.mem_total - host.mem_available,
                             "psi_mem": host.psi_mem_some10, "psi_cpu": host.psi_cpu_some10,
                             "budget": info.get("budget"), "disk_bps": host.disk_bps,
                             "io_budget": info.get("io_budget"),
                             "ksm_saved": host.ksm_saved,
                             "ksm_shared": host.ksm.pages_shared * 4096 if host.ksm else None,
                             "ksm_cpu": host.ksm_cpu,
                             "ksm_fleet": sum(g.get("ksm_saved") or 0 for g in guests.values())
                             if host.ksm else None}, guests, maintain=False)
        self.record_ms.append((time.perf_counter() - t0) * 1000)
        del self.record_ms[:-200]

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
        while True:
            fleet = self.runtime.fleet
            interval = fleet.host.rebalance.interval if fleet else 1.0
            for g in list(self.runtime.guests.values()):
                try:
                    g.serial_offset, g.serial_seen = guestlog.tail_serial(
                        state.guest_dir(g.name) / "serial.log",
                        state.guest_log_path(g.name), g.serial_offset, g.serial_seen)
                except OSError as e:   # the next interval tries again
                    log.warning("serial.tail_failed", guest=g.name, error=str(e))
            await asyncio.sleep(interval)
