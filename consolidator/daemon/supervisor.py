"""The supervisor: one asyncio daemon per state dir, composed of narrow parts.

=============  ===============================================================
runtime        the one owner of guest state: records, events, the index
lifecycle      start, stop, watch, restart by policy, reattach; the executor
applier        executes a plan, phase by phase
recorder       history samples, downsampling, serial lines into event logs
rebalancer     (sched) CPU weights and balloons, through :class:`GuestControls`
server         the API on the unix socket; status is :mod:`.status`
metrics        the Prometheus endpoint, from a plain reading
netguard       the nftables tables stay as loaded (woken by change notifications)
dhcp           one dnsmasq per network (DHCP, DNS), following the fleet
=============  ===============================================================

This module only wires them together, holds the daemon's lock, runs its loops and
stops it. Stopping the supervisor leaves the guests running (like systemd's
KillMode=process); the next one adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import os
import sys
import signal
import time
from typing import Any

import structlog

from ..errors import CgroupError, ConflictError
from ..files import unix_address
from ..linux import OOM_ADJ_SUPERVISOR, set_oom_score_adj
from ..model import GuestState
from ..sched.ksm import KsmDecision, KsmMode, KsmObs
from ..sched.ksmfs import KsmSysfs, available as ksm_available
from ..sched.observe import Observer, Tracked
from ..sched.rebalancer import LoopSettings, Rebalancer
from ..net import names
from ..state import HOST_IO, StateDir, atomic_write, io_budget
from ..report import document
from . import guestlog, metrics, protocol, status, teardown
from .applier import Applier
from .backups import Backups
from .dhcp import DhcpServers
from .executor import nic_wiring
from .lifecycle import Lifecycle
from .netguard import NetGuard
from .recorder import Recorder
from .runtime import Runtime
from .server import MAX_MESSAGE, Api
from .tasks import Tasks

log = structlog.get_logger("supervisor")


class GuestControls:
    """What the rebalancer may move: a guest's CPU weight (cgroup), its balloon and disk
    share (QMP), and the host's KSM scanner (sysfs)."""

    def __init__(self, runtime: Runtime, lifecycle: Lifecycle, ksm: KsmSysfs | None) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.ksm = ksm

    def set_ksm(self, d: KsmDecision, current: KsmObs) -> bool:
        if self.ksm is None:
            return False
        try:
            return self.ksm.write(d.run, d.pages_to_scan, d.sleep_ms, current)
        except OSError as e:
            log.warning("ksm.set_failed", error=f"{type(e).__name__}: {e}")
            return True

    def release_ksm(self) -> None:
        if self.ksm is not None:
            self.ksm.restore()

    def ksm_host(self) -> tuple[int, int] | None:
        if self.ksm is None:
            return None
        try:
            return self.ksm.host_scanning()
        except (OSError, ValueError) as e:
            log.warning("ksm.found_unreadable", error=f"{type(e).__name__}: {e}")
            return None

    async def set_weight(self, name: str, weight: int) -> bool:
        ex = self.lifecycle.executor
        if ex is None or ex.cgroups is None:
            return False
        return await asyncio.to_thread(ex.cgroups.set_shares, name, weight)

    async def set_balloon(self, name: str, target: int) -> None:
        g = self.runtime.get(name)
        if g.guest is not None:
            await g.guest.set_balloon(target)

    async def set_io_share(self, name: str, bps: int | None, iops: int | None) -> None:
        g = self.runtime.get(name)
        if g.guest is not None:
            await g.guest.set_io_share(bps, iops)


class Supervisor:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state = StateDir(state_dir).ensure()
        self.dir = self.state.supervisor_dir
        self.dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.runtime = Runtime(self.state)
        self.lifecycle = Lifecycle(self.runtime)
        self.recorder = Recorder(self.runtime)
        self.rebalancer: Rebalancer | None = None
        self.ksm = KsmSysfs() if ksm_available() else None
        # the loop's settings, kept while the fleet and doctor's measurement are the same
        self._settings: tuple[Any, float | None, LoopSettings] | None = None
        self.dhcp = DhcpServers(self.runtime, self.lifecycle)
        self.applier = Applier(self.runtime, self.lifecycle, lambda: self.rebalancer,
                               networks_ready=self.dhcp.sync)
        self.net_guard = NetGuard(self.lifecycle)
        self.backups = Backups(self.runtime)
        self.metrics = metrics.MetricsServer(
            lambda: metrics.reading(self.runtime, self.rebalancer, self.backups.figures(),
                                    self.recorder.state()))
        self.api = Api(self.runtime, self.lifecycle, self.applier,
                       status=self.status, logs=self.logs, report=self.report,
                       destroy=self.destroy,
                       rebalancer=lambda: self.rebalancer,
                       record_ms=lambda: self.recorder.record_ms,
                       after_apply=self._follow_fleet, stopping=self.stopping,
                       backups=self.backups)
        self._lock_fd: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks = Tasks()

    # ================================================================ lifecycle
    def acquire_lock(self) -> None:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = (self.dir / "pid").read_text().strip() if (self.dir / "pid").exists() else "?"
            raise ConflictError(f"a supervisor is already running for {self.state.root} "
                                f"(pid {pid})", hint="consolidator status talks to it") from None
        self._lock_fd = fd
        atomic_write(self.dir / "pid", f"{os.getpid()}\n", 0o600)

    async def run(self) -> None:
        self.acquire_lock()
        # an older version's state dir: brought to this format before a record is read
        for old, new, files in self.state.migrate():
            log.warning("state.migrated", from_format=old, to_format=new, files=files,
                        originals=str(self.state.root / "migrated" / f"format-{old}"))
        # the host's OOM killer takes the supervisor last: without it nothing watches,
        # restarts or rebalances the guests (each guest is set above it, see vm/guest.py)
        if not set_oom_score_adj("self", OOM_ADJ_SUPERVISOR):
            log.warning("supervisor.oom_score_adj_refused",
                        note="the OOM killer may take the supervisor like any process")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self._load()
            sock = protocol.socket_path(self.state.root)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            old = os.umask(0o177)
            try:
                with unix_address(sock) as addr:
                    self._server = await asyncio.start_unix_server(self.api.serve, path=addr,
                                                                   limit=MAX_MESSAGE)
            finally:
                os.umask(old)
            self._share()
            self._tasks.spawn(self.recorder.tail(), "serial-tail")
            self._tasks.spawn(self.recorder.maintain(), "history-maintenance")
            self._tasks.spawn(self._housekeeping(), "housekeeping")
            self._tasks.spawn(self.net_guard.watch(), "net-guard")
            self._tasks.spawn(self.backups.run_schedule(self.stopping), "backups")
            await self.dhcp.sync()
            self._follow_fleet()
            log.info("supervisor.ready", pid=os.getpid(), state_dir=str(self.state.root),
                     guests=len(self.runtime.guests), index=self.runtime.index)
            await self.stopping.wait()
        finally:
            await self._shutdown()

    async def _load(self) -> None:
        active = self.runtime.load()
        if self.runtime.fleet is None:
            if active:       # records without an applied fleet: no instance to look in
                log.warning("supervisor.cannot_reattach", guests=[g.name for g in active],
                            reason="the state dir has guest records but no applied.json")
            return
        await asyncio.to_thread(self.lifecycle.use, self.runtime.fleet)
        for g in active:
            await self.lifecycle.reattach(g)
        # The ruleset is the fabric's to render: take over the networks and the ports
        # of the guests still wired, and load it whole (the guard watches from here).
        ex, fleet = self.lifecycle.executor, self.runtime.fleet
        if ex is not None and fleet.networks:
            await asyncio.to_thread(ex.fabric.adopt, fleet.networks, [
                (g.name, nic_wiring(g.intent)) for g in self.runtime.guests.values()])

    async def _shutdown(self) -> None:
        log.info("supervisor.stopping", guests_left_running=sum(
            1 for g in self.runtime.guests.values() if g.guest and g.guest.alive()))
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self.rebalancer is not None:
            await self.rebalancer.close()
        if self.ksm is not None:
            with contextlib.suppress(Exception):      # logged inside
                self.ksm.restore()
        self.recorder.close()
        self.metrics.stop()
        with contextlib.suppress(Exception):
            await self.dhcp.close(keep_netns=True)
        self._tasks.cancel_all()
        await self.lifecycle.close()
        with contextlib.suppress(FileNotFoundError):
            protocol.socket_path(self.state.root).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # ============================================================= the loop
    def _share(self) -> None:
        """The socket for root alone (0600), or also for host.api_group's members (0660,
        the dirs on the way 0710)."""
        fleet = self.runtime.fleet
        name = fleet.host.api_group if fleet else None
        gid = None
        if name:
            try:
                gid = grp.getgrnam(name).gr_gid
            except KeyError:
                log.warning("api.no_such_group", group=name, note="the socket stays root's")
        self.state.share_with(gid)
        sock = protocol.socket_path(self.state.root)
        os.chown(sock, -1, gid if gid is not None else os.getegid(), follow_symlinks=False)
        os.chmod(sock, 0o660 if gid is not None else 0o600)    # made by us, just now

    def _follow_fleet(self) -> None:
        """Once there is a fleet, one rebalancer loop runs: it rebalances when
        host.rebalance.enabled, and observes and records either way. The metrics
        endpoint and the socket's group follow the fleet's settings too."""
        fleet = self.runtime.fleet
        self.metrics.sync(fleet.host.metrics if fleet else None)
        self.backups.wake()                 # a schedule may have changed
        if self._server is not None:
            self._share()
        if fleet is None or self.rebalancer is not None:
            return
        rb = Rebalancer(self._loop_settings, self._tracked, self._usage,
                        GuestControls(self.runtime, self.lifecycle, self.ksm), net=self._net,
                        observer=Observer(ksm=self.ksm))
        rb.on_tick.append(self.recorder.on_tick)
        self.lifecycle.on_start.append(rb.forget)
        rb.start()
        self.rebalancer = rb
        log.info("rebalancer.started", interval=fleet.host.rebalance.interval,
                 active=rb.active)

    async def _housekeeping(self) -> None:
        """Every 10 s: the metrics endpoint again, if another process held its port."""
        while True:
            await asyncio.sleep(10)
            fleet = self.runtime.fleet
            if self.metrics.error is not None:
                self.metrics.sync(fleet.host.metrics if fleet else None)

    def _loop_settings(self) -> LoopSettings | None:
        f = self.runtime.fleet
        if f is None or self.lifecycle.executor is None:
            return None
        try:                            # doctor --measure-io may write it any time
            measured = (self.state.root / HOST_IO).stat().st_mtime
        except OSError:
            measured = None
        if self._settings is None or self._settings[0] is not f or \
                self._settings[1] != measured:
            bps, iops = io_budget(f.host.io, self.state.root)
            self._settings = (f, measured, LoopSettings(f.host.rebalance.interval,
                                                        f.host.rebalance.enabled, f.budget,
                                                        f.usable_cpus, bps, iops,
                                                        KsmMode(f.host.ksm)))
        return self._settings[2]

    def _net(self) -> dict[str, tuple[int, int, int, int]]:
        """Each running guest's NIC counters, from one read of the fabric's links."""
        ex = self.lifecycle.executor
        if ex is None:
            return {}
        ports = {names.guest_port(ex.instance, g.name, i): g.name
                 for g in self.runtime.guests.values() for i in range(len(g.intent.nics))}
        if not ports:
            return {}
        out: dict[str, tuple[int, int, int, int]] = {}
        for port, (rx, tx, rxp, txp) in ex.fabric.port_counters(set(ports)).items():
            a = out.get(ports[port], (0, 0, 0, 0))
            # the port's transmit is what goes to the guest, its receive what comes from it
            out[ports[port]] = (a[0] + tx, a[1] + rx, a[2] + txp, a[3] + rxp)
        return out

    def _tracked(self) -> list[Tracked]:
        return [Tracked(g.name, g.intent, g.guest) for g in self.runtime.guests.values()
                if g.state is GuestState.RUNNING and g.guest is not None
                and g.guest.qmp is not None]

    def _usage(self, name: str) -> Any:
        ex = self.lifecycle.executor
        if ex is None or ex.cgroups is None:
            raise CgroupError("no cgroup driver: nothing is applied")
        return ex.cgroups.usage(name)

    async def logs(self, name: str, lines: int, offset: int | None) -> dict[str, Any]:
        self.runtime.get(name)
        path = self.state.guest_log_path(name)
        if offset is None:
            entries, end = await asyncio.to_thread(guestlog.last_entries, path, lines)
        else:
            if offset > (path.stat().st_size if path.exists() else 0):
                offset = 0                                      # rotated meanwhile
            entries, end = await asyncio.to_thread(guestlog.read_entries, path, offset)
        return {"entries": entries, "offset": end}

    async def report(self, args: dict[str, Any]) -> dict[str, Any]:
        shapes = [document.parse_shape(s) for s in args.get("shapes") or []
                  if isinstance(s, str)]
        return await asyncio.to_thread(
            document.build, self.state.root, args.get("window", "1h"), shapes,
            tiered=bool(args.get("tiered")), headroom=float(args.get("headroom", 0.15)))

    def status(self, explain: bool = False) -> dict[str, Any]:
        return status.document(self.runtime, self.rebalancer, started=self.started,
                               explain=explain, metrics=self.metrics.state(),
                               net_guard=self.net_guard.state(), dhcp=self.dhcp.state(),
                               backups=self.backups.figures(), history=self.recorder.state())

    # =============================================================== destroy
    async def destroy(self, purge: bool) -> dict[str, Any]:
        """Stop every guest, remove every kernel object of the instance the state dir
        records, and forget the fleet. Failures are reported, never dropped."""
        failures: list[dict[str, str]] = []
        running = [g for g in self.runtime.guests.values()
                   if g.state.active and self.lifecycle.executor is not None]
        # each guest stops, and its objects go with all the instance's below, in one pass
        # (undoing each guest's wiring first cost an nft load and a netns each: 2.5x the
        # bare powerdown of 8)
        results = await asyncio.gather(*(self.lifecycle.stop(g, timeout=5, undo=False)
                                         for g in running), return_exceptions=True)
        for g, r in zip(running, results):
            if isinstance(r, BaseException):
                msg = f"{type(r).__name__}: {r}"
                failures.append({"target": f"guest {g.name}", "action": "stop", "error": msg})
                log.warning("destroy.stop_failed", guest=g.name, error=msg)
        for g in self.runtime.guests.values():
            self.lifecycle.forget(g)
        await self.dhcp.close()
        if self.lifecycle.executor is not None:
            self.lifecycle.executor.fabric.disarm()   # its tables go now: not to restore
        scope = self.lifecycle.executor.scope if self.lifecycle.executor else \
            teardown.Scope.recorded(self.state)
        gone: list[str] = []
        if scope is not None:
            try:
                gone = await asyncio.to_thread(teardown.collect, scope)
            except Exception as e:  # noqa: BLE001 - reported: the operator must know
                msg = f"{type(e).__name__}: {e}"
                failures.append({"target": f"instance {scope.instance}", "action": "remove",
                                 "error": msg})
                log.warning("destroy.teardown_failed", error=msg)
        teardown.forget(self.state, purge=purge)
        self.runtime.clear()
        self.lifecycle.executor = None
        return {"removed": gone, "failures": failures}


def main(state_dir: str) -> None:
    sup = Supervisor(state_dir)
    asyncio.run(sup.run())
    # shut down cleanly (history closed, sockets gone, lock released): skip tearing down
    # some 700 modules, 50-80 ms that ``destroy`` would otherwise wait for
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
