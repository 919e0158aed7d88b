"""The supervisor's Prometheus endpoint: live figures, names after Prometheus' conventions.

Served on ``host.metrics.listen`` (loopback by default) by a small HTTP/1.0 responder on the
supervisor's event loop (prometheus-client renders the text format), so an idle endpoint
costs no thread and no wake-up. The collector is handed a reader of plain figures (:class:`Reading`, made by
:func:`reading` at scrape time) and nothing else. The fleet's instance goes in a
``fleet`` label: ``instance`` is the label Prometheus attaches to every scrape target. A
port already taken is logged and the supervisor runs on without it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily)

from ..inventory.schema import Metrics
from ..model import GuestIntent, GuestState
from ..sched.observe import Snapshot
from ..sched.rebalancer import Rebalancer
from .runtime import Runtime

log = structlog.get_logger("metrics")
STATES = tuple(s.value for s in GuestState)


@dataclass(frozen=True)
class GuestReading:
    name: str
    state: str
    intent: GuestIntent
    restarts: int
    balloon: int | None


@dataclass(frozen=True)
class Reading:
    instance: str
    budget: int | None
    guests: tuple[GuestReading, ...]
    snapshot: Snapshot | None
    weights: dict[str, int]
    host_state: str | None             # None: no rebalancer
    ticks: int
    backups: dict[str, Any] | None = None   # Backups.figures()
    now: float = 0.0
    history: dict[str, Any] | None = None   # Recorder.state()


def reading(runtime: Runtime, rb: Rebalancer | None,
            backups: dict[str, Any] | None = None,
            history: dict[str, Any] | None = None) -> Reading:
    """The figures of this instant, copied out of the runtime and the rebalancer."""
    fleet = runtime.fleet
    return Reading(
        instance=fleet.instance if fleet else "", budget=fleet.budget if fleet else None,
        guests=tuple(GuestReading(n, g.state.value, g.intent, g.restart_count,
                                  g.guest.balloon_actual if g.guest else None)
                     for n, g in sorted(runtime.guests.items())),
        snapshot=rb.last if rb else None, weights=dict(rb.weights) if rb else {},
        host_state=rb.host_state.value if rb else None, ticks=rb.ticks if rb else 0,
        backups=backups, now=time.time(), history=history)


class FleetCollector:
    def __init__(self, read: Callable[[], Reading]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        r = self.read()
        fleet = r.instance
        snap = r.snapshot
        L = ["fleet", "guest"]

        def g(name: str, help_: str, labels: list[str] = L) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_, labels=labels)

        up = g("consolidator_guest_up", "1 when the guest's QEMU runs.")
        hung = g("consolidator_guest_unresponsive",
                 "1 while the guest's QEMU does not answer QMP (hung or stopped).")
        state = g("consolidator_guest_state", "The guest's state (1 for the current one).",
                  L + ["state"])
        cpu = g("consolidator_guest_cpu_cores", "CPU used over the last interval, in cores.")
        demand = g("consolidator_guest_cpu_demand_cores",
                   "CPU wanted (used + waiting to run) over the last interval, in cores.")
        weight = g("consolidator_guest_cpu_weight", "The cgroup CPU weight the rebalancer set.")
        ws = g("consolidator_guest_memory_working_set_bytes",
               "Guest memory in use, ballooned memory excluded.")
        avail = g("consolidator_guest_memory_available_bytes", "Guest MemAvailable.")
        balloon = g("consolidator_guest_balloon_bytes", "Guest RAM the balloon leaves it.")
        mmax = g("consolidator_guest_memory_max_bytes", "memory.max from the inventory.")
        mmin = g("consolidator_guest_memory_min_bytes", "memory.min from the inventory.")
        cg = g("consolidator_guest_cgroup_memory_bytes", "Memory charged to the guest's cgroup.")
        restarts = CounterMetricFamily("consolidator_guest_restarts",
                                       "Automatic restarts by the restart policy.", labels=L)
        for gr in r.guests:
            name = gr.name
            lab = [fleet, name]
            running = gr.state == "running"
            up.add_metric(lab, 1.0 if running else 0.0)
            for s in STATES:
                state.add_metric(lab + [s], 1.0 if gr.state == s else 0.0)
            mmax.add_metric(lab, gr.intent.memory.max)
            mmin.add_metric(lab, gr.intent.memory_min)
            restarts.add_metric(lab, gr.restarts)
            if gr.balloon and running:
                balloon.add_metric(lab, gr.balloon)
            o = snap.guests.get(name) if snap else None
            if o is not None and running:
                hung.add_metric(lab, 0.0 if o.unresponsive_s is None else 1.0)
                if o.cpu_rate is not None:
                    cpu.add_metric(lab, o.cpu_rate)
                if o.demand is not None:
                    demand.add_metric(lab, o.demand)
                if o.available is not None:
                    avail.add_metric(lab, o.available)
                if o.cgroup_memory is not None:
                    cg.add_metric(lab, o.cgroup_memory)
                w = o.working_set(gr.intent.memory.max)
                if w is not None:
                    ws.add_metric(lab, w)
            if name in r.weights and running:
                weight.add_metric(lab, r.weights[name])
        yield from (up, hung, state, cpu, demand, weight, ws, avail, balloon, mmax, mmin, cg,
                    restarts)
        if snap is not None:
            h = snap.host
            for name, help_, v in (
                    ("consolidator_host_memory_available_bytes", "Host MemAvailable.",
                     h.mem_available),
                    ("consolidator_host_cpu_busy_cores", "Host CPU busy, in cores.", h.cpu_busy),
                    ("consolidator_host_psi_memory_some_avg10",
                     "Host memory pressure (PSI some, avg10, %).", h.psi_mem_some10),
                    ("consolidator_host_psi_cpu_some_avg10",
                     "Host CPU pressure (PSI some, avg10, %).", h.psi_cpu_some10)):
                if v is not None:
                    m = GaugeMetricFamily(name, help_, labels=["fleet"])
                    m.add_metric([fleet], v)
                    yield m
        yield from _backup_metrics(r, fleet)
        yield from _io_metrics(r, fleet)
        yield from _ksm_metrics(r, fleet)
        if r.history is not None:
            m = GaugeMetricFamily("consolidator_history_recording",
                                  "1 while the history records every sample; 0 while its "
                                  "writes fail (a full disk).", labels=["fleet"])
            m.add_metric([fleet], 1.0 if r.history.get("recording") else 0.0)
            yield m
            m = GaugeMetricFamily("consolidator_history_lost_samples",
                                  "Samples not recorded since the writes began failing.",
                                  labels=["fleet"])
            m.add_metric([fleet], r.history.get("lost_samples") or 0)
            yield m
        if r.budget is not None:
            m = GaugeMetricFamily("consolidator_host_budget_bytes", "Guest memory budget.",
                                  labels=["fleet"])
            m.add_metric([fleet], r.budget)
            yield m
        if r.host_state is not None:
            m = GaugeMetricFamily("consolidator_host_memory_state",
                                  "Host memory state (1 for the current one).",
                                  labels=["fleet", "state"])
            for s in ("normal", "soft", "hard"):
                m.add_metric([fleet, s], 1.0 if r.host_state == s else 0.0)
            yield m
            t = CounterMetricFamily("consolidator_rebalancer_ticks",
                                    "Rebalancer iterations.", labels=["fleet"])
            t.add_metric([fleet], r.ticks)
            yield t


_IO_FAMILIES = (
    ("disk_rd", CounterMetricFamily, "disk_read_bytes", "Bytes the guest's disks read."),
    ("disk_wr", CounterMetricFamily, "disk_written_bytes", "Bytes the guest's disks wrote."),
    ("disk_ops", CounterMetricFamily, "disk_operations",
     "Read and write requests of the guest's disks."),
    ("net_rx", CounterMetricFamily, "net_received_bytes", "Bytes sent to the guest's NICs."),
    ("net_tx", CounterMetricFamily, "net_transmitted_bytes", "Bytes the guest's NICs sent."),
    ("disk_bps", GaugeMetricFamily, "disk_bytes_per_second",
     "Disk bytes read and written a second, last interval."),
    ("net_bps", GaugeMetricFamily, "net_bytes_per_second",
     "NIC bytes both ways a second, last interval."))


def _io_metrics(r: Reading, fleet: str) -> Iterator[Any]:
    """Disk and NIC counters since each QEMU started (rate() them), and the last
    interval's rates as the rebalancer saw them."""
    snap = r.snapshot
    if snap is None:
        return
    fams = {key: kind(f"consolidator_guest_{name}", help_, labels=["fleet", "guest"])
            for key, kind, name, help_ in _IO_FAMILIES}
    for name, o in sorted(snap.guests.items()):
        lab = [fleet, name]
        if o.disk_bytes is not None:
            fams["disk_rd"].add_metric(lab, o.disk_bytes[0])
            fams["disk_wr"].add_metric(lab, o.disk_bytes[1])
        if o.disk_ops is not None:
            fams["disk_ops"].add_metric(lab, sum(o.disk_ops))
        if o.net_bytes is not None:
            fams["net_rx"].add_metric(lab, o.net_bytes[0])
            fams["net_tx"].add_metric(lab, o.net_bytes[1])
        if o.disk_rd is not None and o.disk_wr is not None:
            fams["disk_bps"].add_metric(lab, o.disk_rd + o.disk_wr)
        if o.net_rx is not None and o.net_tx is not None:
            fams["net_bps"].add_metric(lab, o.net_rx + o.net_tx)
    yield from fams.values()


def _ksm_metrics(r: Reading, fleet: str) -> Iterator[Any]:
    """KSM: the host's counters and ksmd's CPU, and each guest's merged pages and its
    part of what merging saves."""
    snap = r.snapshot
    k = snap.host.ksm if snap is not None else None
    if k is None:
        return
    for name, kind, help_, v in (
            ("consolidator_host_ksm_pages_shared", GaugeMetricFamily,
             "KSM pages in use (each held once for all that share it).", k.pages_shared),
            ("consolidator_host_ksm_pages_sharing", GaugeMetricFamily,
             "Pages sharing a KSM page: each is memory not held.", k.pages_sharing),
            ("consolidator_host_ksm_saved_bytes", GaugeMetricFamily,
             "Memory merging saves on the host, all processes.", k.saved),
            ("consolidator_host_ksm_running", GaugeMetricFamily,
             "1 while ksmd scans.", 1.0 if k.run == 1 else 0.0),
            ("consolidator_host_ksmd_cpu_seconds", CounterMetricFamily,
             "CPU time ksmd used since boot.", k.cpu_s),
            ("consolidator_host_ksmd_cpu_cores", GaugeMetricFamily,
             "ksmd's CPU over the last interval, in cores.", snap.host.ksm_cpu)):
        if v is not None:
            m = kind(name, help_, labels=["fleet"])
            m.add_metric([fleet], v)
            yield m
    pages = GaugeMetricFamily("consolidator_guest_ksm_merged_bytes",
                              "Guest RAM KSM merged with other pages.",
                              labels=["fleet", "guest"])
    saved = GaugeMetricFamily("consolidator_guest_ksm_saved_bytes",
                              "The guest's part of what merging saves.",
                              labels=["fleet", "guest"])
    for name, o in sorted(snap.guests.items()):
        if o.ksm_pages is not None:
            pages.add_metric([fleet, name], o.ksm_pages * 4096)
        if o.ksm_saved is not None:
            saved.add_metric([fleet, name], o.ksm_saved)
    yield from (pages, saved)


def _backup_metrics(r: Reading, fleet: str) -> Iterator[Any]:
    if not r.backups:
        return
    last = GaugeMetricFamily("consolidator_guest_backup_last_success_timestamp_seconds",
                             "When the guest's newest backup was taken.",
                             labels=["fleet", "guest"])
    age = GaugeMetricFamily("consolidator_guest_backup_age_seconds",
                            "How old the guest's newest backup is.", labels=["fleet", "guest"])
    for name, b in sorted(r.backups["last"].items()):
        last.add_metric([fleet, name], b["at"])
        age.add_metric([fleet, name], max(0.0, r.now - b["at"]))
    yield from (last, age)
    u = r.backups.get("usage")
    if u:
        for name, help_, v in (("consolidator_backup_dir_bytes",
                                "Bytes the backup directory holds.", u.get("bytes")),
                               ("consolidator_backup_dir_free_bytes",
                                "Free space on the backup directory's filesystem.",
                                u.get("fs_free"))):
            if v is not None:
                m = GaugeMetricFamily(name, help_, labels=["fleet"])
                m.add_metric([fleet], v)
                yield m


REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST = 8192


class MetricsServer:
    """Serves where the fleet says. A port another process holds is not given up on: the
    supervisor calls :meth:`sync` again every few seconds, and ``status`` shows the
    conflict meanwhile (otherwise another local user could serve fake figures there)."""

    def __init__(self, read: Callable[[], Reading]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(read))
        self.listen: str | None = None        # where it serves now
        self.want: str | None = None          # where it should serve
        self.error: str | None = None         # why it does not, said once per cause
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Task[asyncio.AbstractServer] | None = None
        self._sock: socket.socket | None = None

    def sync(self, settings: Metrics | None) -> None:
        """Serve as ``settings`` say (the fleet's host.metrics); follow changes; stop
        when disabled or when there is no fleet; try again while the port is taken.
        Called on the event loop; the socket is bound here, so a taken port is known now."""
        want = settings.listen if settings is not None and settings.enabled else None
        self.want = want
        if want == self.listen:
            return
        self.stop()
        if want is None:
            self.error = None
            return
        host, _, port = want.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
                sock.listen(16)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            error = f"cannot listen on {want}: {e.strerror}"
            if error != self.error:
                log.warning("metrics.not_serving", listen=want, error=e.strerror,
                            note="tried again every 10 s")
            self.error = error
            return
        self._sock = sock
        self._starting = asyncio.ensure_future(asyncio.start_server(
            self._answer, sock=sock, limit=MAX_REQUEST))
        self._starting.add_done_callback(self._started)
        self.listen, self.error = want, None
        log.info("metrics.serving", listen=want)

    def _started(self, task: asyncio.Task[asyncio.AbstractServer]) -> None:
        if task is self._starting and not task.cancelled() and task.exception() is None:
            self._server = task.result()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, then the connection closes (HTTP/1.0)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path not in (b"/metrics", b"/"):
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, \
                    generate_latest(self.registry)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + (body if method != b"HEAD" else b""))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass                              # a client that says nothing sane gets nothing
        finally:
            writer.close()

    def state(self) -> dict[str, Any]:
        return {"listen": self.want, "serving": self.listen is not None,
                "error": self.error}

    def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        self._starting = None
        if self._server is not None:
            self._server.close()               # closes its socket too
        elif self._sock is not None:
            self._sock.close()                 # never handed over
        self._server, self._sock = None, None
        self.listen = None
