"""The supervisor: one asyncio daemon per state dir.

It owns the running fleet: it executes plans (through the executor), watches every
guest (one task each; a crash is seen at once through a pidfd), restarts guests by
their policy, reattaches to running guests after its own restart, samples what
``status`` shows, and serves the CLI over a unix socket (:mod:`consolidator.api`).

Stopping the supervisor leaves the guests running (like systemd's KillMode=process);
the next one adopts them. A QEMU whose QMP cannot be reattached is ``orphaned``:
reported, never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import psutil
import structlog

from . import api
from .errors import (ConflictError, ConsolidatorError, QMPError, UsageError)
from .executor import Executor
from .model import Fleet, GuestIntent
from .plan import (CreateGuest, CreateNetwork, GuestState, Observed, ObservedGuest, RemoveGuest, RemoveNetwork, StartGuest, StopGuest, UpdateGuest, UpdateHost,
                   UpdateNetwork, plan as make_plan, _phase)
from .inventory.schema import NetworkSpec
from .restartpolicy import decide
from .state import StateDir, atomic_write, write_json
from .sched.rebalancer import Rebalancer
from .vm.guest import Guest, rotate_log

log = structlog.get_logger("supervisor")
GUEST_LOG_CAP = 4 << 20
EmitFn = Callable[[dict[str, Any]], None]


@dataclass
class GuestRuntime:
    name: str
    intent: GuestIntent                       # what it runs with (the applied intent)
    state: GuestState = GuestState.DEFINED
    guest: Guest | None = None
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    restart_count: int = 0
    last_event: str | None = None
    monitor: asyncio.Task[None] | None = None
    pending_restart: asyncio.Task[None] | None = None
    started_at: float | None = None
    serial_offset: int = 0
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)


class Supervisor:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state = StateDir(state_dir).ensure()
        self.dir = self.state.supervisor_dir
        self.dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.fleet: Fleet | None = None
        self.executor: Executor | None = None
        self.guests: dict[str, GuestRuntime] = {}
        self.networks: dict[str, NetworkSpec] = {}
        self.index = 0
        self.apply_lock = asyncio.Lock()
        self.gate = asyncio.Semaphore(os.cpu_count() or 2)   # host-side start work at once
        self.stopping = asyncio.Event()
        self.started = time.time()
        self._lock_fd: int | None = None
        self.rebalancer: Rebalancer | None = None
        self.history: Any = None
        from .metrics import MetricsServer
        self.metrics = MetricsServer(self)
        self.record_ms: list[float] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

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
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self._load()
            sock = api.socket_path(self.state.root)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(sock),
                                                               limit=api.MAX_LINE)
            finally:
                os.umask(old)
            os.chmod(sock, 0o600)
            self._spawn(self._sampler(), "sampler")
            self._spawn(self._history_maintenance(), "history-maintenance")
            self._sync_rebalancer()
            log.info("supervisor.ready", pid=os.getpid(), state_dir=str(self.state.root),
                     guests=len(self.guests), index=self.index)
            await self.stopping.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("supervisor.stopping", guests_left_running=sum(
            1 for rt in self.guests.values() if rt.guest and rt.guest.alive()))
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self.rebalancer is not None:
            await self.rebalancer.close()
        if self.history is not None:
            with contextlib.suppress(Exception):
                self.history.close()
        self.metrics.stop()
        for t in list(self._tasks):
            t.cancel()
        for rt in self.guests.values():
            for t in (rt.monitor, rt.pending_restart):
                if t is not None:
                    t.cancel()
            if rt.guest is not None:
                with contextlib.suppress(Exception):
                    await rt.guest.cleanup()   # QEMU keeps running: sockets stay
        with contextlib.suppress(FileNotFoundError):
            api.socket_path(self.state.root).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        t.set_name(name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ================================================================== loading
    async def _load(self) -> None:
        applied = self.state.read_applied()
        if applied:
            self.fleet = Fleet.model_validate(applied["fleet"])
            self.index = int(applied.get("index", 0))
            self.executor = await asyncio.to_thread(Executor, self.fleet, self.state)
        for n in self.state.network_names():
            rec = self.state.read_network_record(n)
            if rec and rec.get("phase") == "created":
                self.networks[n] = NetworkSpec.model_validate(rec["spec"])
        for name in self.state.guest_names():
            rec = self.state.read_guest_record(name) or {}
            if "intent" not in rec:
                continue
            rt = GuestRuntime(name, GuestIntent.model_validate(rec["intent"]))
            rt.restart_count = int(rec.get("restarts", 0))
            rt.last_event = rec.get("last_event")
            rt.state = GuestState(rec.get("state", "defined"))
            rt.started_at = rec.get("started_at")
            self.guests[name] = rt
            if rt.state in (GuestState.RUNNING, GuestState.STARTING, GuestState.STOPPING,
                            GuestState.ORPHANED) or rec.get("phase") in ("launching",
                                                                         "running"):
                await self._reattach(rt, rec)

    def find_qemu(self, name: str, rec: dict[str, Any]) -> int | None:
        """The PID of this guest's QEMU, if one runs: from the record or the pidfile, and
        only if it is a QEMU of this guest (argv), in its cgroup, started when recorded."""
        if self.executor is None:
            return None
        gdir = self.state.guest_dir(name)
        candidates = [rec.get("pid")]
        with contextlib.suppress(OSError, ValueError):
            candidates.append(int((gdir / "run" / "qemu.pid").read_text()))
        in_cgroup = self.executor.cgroups.pids(name) if self.executor.cgroups else set()
        for pid in candidates:
            if not pid:
                continue
            try:
                p = psutil.Process(pid)
                argv = p.cmdline()
                started = p.create_time()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "qemu-system" not in (argv[0] if argv else "") or \
                    f"{name},debug-threads=on" not in argv or \
                    not any(str(gdir / "run" / "qmp.sock") in a for a in argv):
                continue
            if rec.get("pid_start") and rec.get("pid") == pid and \
                    abs(started - float(rec["pid_start"])) > 1.0:
                continue
            if in_cgroup and pid not in in_cgroup:
                continue
            return pid
        return None

    async def _reattach(self, rt: GuestRuntime, rec: dict[str, Any]) -> None:
        assert self.executor is not None
        pid = self.find_qemu(rt.name, rec)
        if pid is None:
            self.event(rt, "vanished", note="no QEMU of this guest runs (it died while no "
                                            "supervisor was watching)")
            rt.state = GuestState.CRASHED
            self._save(rt)
            await asyncio.to_thread(self.executor.teardown_guest, rt.intent, None)
            self._after_exit(rt, clean=False)
            return
        from .vm.launch import launch_spec
        from .vm.qemu import Boot, RunPaths
        gdir = self.state.guest_dir(rt.name)
        spec = launch_spec(rt.intent, Boot(None, None), RunPaths.for_guest(gdir),
                           self.executor.virt)
        g = Guest(spec)
        rt.guest = g
        try:
            await g.adopt(pid)
        except QMPError as e:
            rt.state = GuestState.ORPHANED
            self.event(rt, "orphaned", pid=pid, error=e.message,
                       note="QEMU runs but its QMP cannot be reattached; left running")
            self._save(rt)
            return
        rt.state = GuestState.RUNNING
        self.event(rt, "reattached", pid=pid)
        self._save(rt, pid=pid)
        rt.monitor = self._spawn(self._monitor(rt), f"monitor-{rt.name}")

    # ================================================================== records
    def event(self, rt: GuestRuntime, kind: str, **fields: Any) -> None:
        rt.last_event = kind
        log.info(f"guest.{kind}", guest=rt.name, **fields)
        self._guest_log(rt.name, {"kind": "event", "event": kind, **fields})

    def _guest_log(self, name: str, entry: dict[str, Any]) -> None:
        path = self.state.guest_dir(name) / "log.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            rotate_log(path, GUEST_LOG_CAP)
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), **entry}, default=str) + "\n")
        except OSError as e:   # a full disk must not take the supervisor down
            log.warning("guest.log_failed", guest=name, error=str(e))

    def _save(self, rt: GuestRuntime, **extra: Any) -> None:
        if self.executor is None:
            return
        try:
            self.executor.update_record(
                rt.name, intent=rt.intent.model_dump(mode="json"), state=rt.state.value,
                restarts=rt.restart_count, last_event=rt.last_event,
                spec_hash=rt.intent.spec_hash(), **extra)
        except OSError as e:
            log.warning("guest.record_failed", guest=rt.name, error=str(e))

    def _bump(self) -> None:
        """Something a plan depends on changed: plans made before are stale now."""
        self.index += 1

    # ================================================================ observing
    def observed(self) -> Observed:
        return Observed(
            instance=self.fleet.instance if self.fleet else None,
            host=self.fleet.host if self.fleet else None,
            networks=dict(self.networks),
            guests={n: ObservedGuest(rt.intent, rt.state) for n, rt in self.guests.items()})

    def status(self, explain: bool = False) -> dict[str, Any]:
        now = time.time()
        guests = []
        for n, rt in sorted(self.guests.items()):
            g = rt.guest
            running = rt.state in (GuestState.RUNNING, GuestState.ORPHANED)
            guests.append({
                "name": n, "state": rt.state.value,
                "pid": g.pid if g and running else None,
                "uptime_s": round(now - rt.started_at, 1) if running and rt.started_at
                else None,
                "vcpus": rt.intent.vcpus,
                "cpu_percent": self._cpu_percent(rt) if running else None,
                "balloon_bytes": (g.balloon_actual if g else None) if running else None,
                "memory_max_bytes": rt.intent.memory.max,
                "memory_min_bytes": rt.intent.memory_min,
                "ips": [n_.ip for n_ in rt.intent.nics if n_.ip],
                "restarts": rt.restart_count,
                "last_event": rt.last_event,
                "image": rt.intent.image,
                "machine": g.spec.machine.name if g and running else None,
                "accel": g.spec.accel.name if g and running else None,
            })
            if explain:
                guests[-1]["explain"] = (self.rebalancer.explain.get(n)
                                         if self.rebalancer else None)
        return {"format": 1, "instance": self.fleet.instance if self.fleet else None,
                "index": self.index, "supervisor": {"pid": os.getpid(),
                                                    "uptime_s": round(now - self.started, 1)},
                "networks": [{"name": n, "subnet": str(s.subnet), "gateway": s.gateway,
                              "nat": s.nat} for n, s in sorted(self.networks.items())],
                "rebalancer": ({"enabled": self.rebalancer.active,
                                "ticks": self.rebalancer.ticks,
                                "host_state": self.rebalancer.host_state.value,
                                "budget_bytes": self.fleet.budget if self.fleet else None}
                               if self.rebalancer else {"enabled": False}),
                "guests": guests}

    async def _sampler(self) -> None:
        """Every interval: tail the guests' serial logs into their event logs."""
        while True:
            interval = self.fleet.host.rebalance.interval if self.fleet else 1.0
            try:
                for rt in list(self.guests.values()):
                    self._tail_serial(rt)
            except Exception as e:  # noqa: BLE001 - sampling must never stop
                log.warning("sampler.failed", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(interval)

    def _cpu_percent(self, rt: GuestRuntime) -> float | None:
        """From the rebalancer's last snapshot (it observes every running guest each
        interval, also when it only observes), if taken since this run of the guest began."""
        snap = self.rebalancer.last if self.rebalancer else None
        o = snap.guests.get(rt.name) if snap is not None else None
        if o is None or o.cpu_rate is None or (rt.started_at or 0) > snap.t:
            return None
        return round(o.cpu_rate * 100, 1)

    def _sync_rebalancer(self) -> None:
        """One loop per supervisor once there is a fleet: it rebalances when
        host.rebalance.enabled, and observes and records either way. The metrics
        endpoint follows the fleet's settings too."""
        self.metrics.sync()
        if self.fleet is None or self.rebalancer is not None:
            return
        self.rebalancer = Rebalancer(self)
        self.rebalancer.on_tick.append(self._record)
        self.rebalancer.start()
        log.info("rebalancer.started", interval=self.fleet.host.rebalance.interval,
                 active=self.rebalancer.active)

    def _history(self) -> Any:
        from .sched.history import History, Retention
        if self.history is None and self.fleet is not None:
            h = self.fleet.host.history
            self.history = History(self.state.history_path,
                                   Retention(h.raw, h.minute, h.hour))
        return self.history

    async def _history_maintenance(self) -> None:
        """Downsampling and retention every 10 s, off the event loop, on a connection of
        its own: the rebalancer's tick only ever pays for one small transaction."""
        from .sched.history import maintain_file
        while True:
            await asyncio.sleep(10)
            hist = self.history
            if hist is None:
                continue
            try:
                took = await asyncio.to_thread(maintain_file, hist.path, hist.retention)
                if took > 1.0:
                    log.info("history.maintenance_slow", seconds=round(took, 2))
            except Exception as e:  # noqa: BLE001 - history must never stop the supervisor
                log.warning("history.maintenance_failed", error=f"{type(e).__name__}: {e}")

    def _record(self, snap: Any, info: dict[str, Any]) -> None:
        """One history sample per interval (one transaction)."""
        hist = self._history()
        if hist is None:
            return
        t0 = time.perf_counter()
        host = snap.host
        guests = {}
        for n, rt in self.guests.items():
            o = snap.guests.get(n)
            mem = (info.get("decisions", {}).get(n) or {}).get("memory") or {}
            ws = mem.get("ws")
            if ws is None and o is not None:
                ws = o.working_set(rt.intent.memory.max)
            guests[n] = {"state": rt.state.value,
                         "cpu": o.cpu_rate if o else None, "ws": ws,
                         "available": o.available if o else None,
                         "balloon": o.balloon if o else None,
                         "cgmem": o.cgroup_memory if o else None,
                         "max": rt.intent.memory.max}
        hist.record(snap.t, {"cpu": host.cpu_busy, "mem_available": host.mem_available,
                             "mem_used": host.mem_total - host.mem_available,
                             "psi_mem": host.psi_mem_some10, "psi_cpu": host.psi_cpu_some10,
                             "budget": info.get("budget")}, guests, maintain=False)
        self.record_ms.append((time.perf_counter() - t0) * 1000)
        del self.record_ms[:-200]

    def _tail_serial(self, rt: GuestRuntime) -> None:
        path = self.state.guest_dir(rt.name) / "serial.log"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size < rt.serial_offset:      # rotated or truncated
            rt.serial_offset = 0
        if size == rt.serial_offset:
            return
        with open(path, "rb") as f:
            f.seek(rt.serial_offset)
            data = f.read(1 << 20)
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < (1 << 20):
            return                       # wait for a whole line
        rt.serial_offset += cut or len(data)
        for line in (data[:cut] or data).decode("utf-8", "replace").splitlines():
            line = line.replace("\r", "").rstrip()
            if line:
                self._guest_log(rt.name, {"kind": "serial", "line": line})
        if rotate_log(path):
            rt.serial_offset = 0

    # ================================================================== guests
    def _ensure_executor(self, fleet: Fleet) -> Executor:
        if self.executor is None or self.executor.fleet.instance != fleet.instance:
            self.executor = Executor(fleet, self.state)
        else:
            self.executor.fleet = fleet
        return self.executor

    async def start(self, rt: GuestRuntime, emit: EmitFn | None = None) -> None:
        """Start (or restart) one guest. Raises on failure; the guest is then crashed."""
        assert self.executor is not None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()

        def progress(phase: str) -> None:
            if emit is not None:
                loop.call_soon_threadsafe(emit, {"guest": rt.name, "phase": phase,
                                                 "t": round(time.monotonic() - t0, 3)})

        rt.state = GuestState.STARTING
        self._bump()
        self.event(rt, "starting")
        if self.rebalancer is not None:
            self.rebalancer.forget(rt.name)
        try:
            g = await self.executor.start_guest(rt.intent, rt.guest, progress=progress,
                                                gate=self.gate)
        except BaseException as e:
            rt.state = GuestState.CRASHED
            self._bump()
            msg = e.message if isinstance(e, ConsolidatorError) else f"{type(e).__name__}: {e}"
            self.event(rt, "start_failed", error=msg.splitlines()[0],
                       serial_tail=getattr(e, "serial_tail", "")[-800:] or None)
            self._save(rt)
            progress("failed")
            raise
        rt.guest = g
        rt.state = GuestState.RUNNING
        rt.started_at = time.time()
        self._bump()
        self.event(rt, "ready", pid=g.pid, after_s=round(time.monotonic() - t0, 2))
        self._save(rt)
        progress("ready")
        if rt.monitor is None or rt.monitor.done():
            rt.monitor = self._spawn(self._monitor(rt), f"monitor-{rt.name}")

    async def stop(self, rt: GuestRuntime, timeout: float = 10.0) -> None:
        assert self.executor is not None
        for t in (rt.pending_restart,):
            if t is not None and not t.done():
                t.cancel()
        rt.pending_restart = None
        g = rt.guest
        if g is not None and g.alive():
            rt.state = GuestState.STOPPING
            await self.executor.stop_guest(rt.intent, g, timeout=timeout)
            self.event(rt, "stopped", how=g.exit.describe() if g.exit else None)
        elif rt.state is GuestState.ORPHANED and g is not None and g.pid:
            # we cannot talk to it, but we were asked to stop it: signal it, then kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(g.pid, signal.SIGTERM)
            await asyncio.to_thread(self.executor.teardown_guest, rt.intent, None)
            self.event(rt, "stopped", how="orphan terminated")
        else:
            await asyncio.to_thread(self.executor.teardown_guest, rt.intent, None)
        rt.state = GuestState.STOPPED
        self._bump()
        self._save(rt, pid=None)

    async def _monitor(self, rt: GuestRuntime) -> None:
        """Wait for the guest's QEMU to exit; apply the restart policy when it was not us."""
        while True:
            g = rt.guest
            if g is None:
                return
            try:
                ex = await g.wait_exit()
            except asyncio.CancelledError:
                raise
            if ex.requested or rt.state in (GuestState.STOPPING, GuestState.STOPPED):
                return
            clean = ex.clean
            self.event(rt, "exited" if clean else "crashed", how=ex.describe(),
                       exit_status=ex.exitcode, signal=ex.signal,
                       serial_tail=g.serial_tail(8) or None)
            rt.state = GuestState.STOPPED if clean else GuestState.CRASHED
            self._bump()
            self._save(rt, pid=None)
            if self.executor is not None:
                await g.cleanup()
                await asyncio.to_thread(self.executor.teardown_guest, rt.intent, g)
            self._after_exit(rt, clean)
            return

    def _after_exit(self, rt: GuestRuntime, clean: bool) -> None:
        limits = self.fleet.host.restart if self.fleet else None
        d = decide(rt.intent.restart, clean, tuple(rt.restarts), time.time(),
                   **({"max_restarts": limits.max, "window": limits.window,
                       "backoff_max": limits.backoff_max} if limits else {}))
        if d.failed:
            rt.state = GuestState.FAILED
            self._bump()
            self.event(rt, "failed", reason=d.reason)
            self._save(rt)
        elif d.restart:
            self.event(rt, "restart_scheduled", delay_s=d.delay, reason=d.reason)
            rt.pending_restart = self._spawn(self._restart_later(rt, d.delay),
                                             f"restart-{rt.name}")
        else:
            self.event(rt, "stays_down", reason=d.reason)

    async def _restart_later(self, rt: GuestRuntime, delay: float) -> None:
        await asyncio.sleep(delay)
        async with rt.busy:
            if rt.state not in (GuestState.CRASHED, GuestState.STOPPED):
                return
            rt.restarts.append(time.time())
            rt.restart_count += 1
            try:
                await self.start(rt)
            except Exception:  # noqa: BLE001 - recorded by start(); the policy goes on
                self._after_exit(rt, clean=False)

    # =================================================================== apply
    async def apply(self, desired: Fleet, inventory_text: str, *, prune: bool, purge: bool,
                    allow_restart: bool, emit: EmitFn) -> dict[str, Any]:
        """Execute the plan from the current observed state to ``desired``. Caller holds
        the apply lock. Independent guests start concurrently, bounded by host cores."""
        p = make_plan(desired, self.observed(), prune=prune, purge=purge,
                      allow_restart=allow_restart)
        ex = await asyncio.to_thread(self._ensure_executor, desired)
        self.fleet = desired
        # written ahead: a supervisor killed mid-apply must find the fleet it was applying
        self._write_applied(desired, inventory_text, complete=False)
        failures: list[dict[str, str]] = []
        limit = desired.host.concurrency
        self.gate = asyncio.Semaphore((os.cpu_count() or 2) if limit == "auto" else int(limit))
        failed_guests: set[str] = set()

        async def run(a: Any) -> None:
            try:
                await self._action(a, ex, emit, purge)
            except Exception as e:  # noqa: BLE001 - one failure never stops the rest
                msg = e.message if isinstance(e, ConsolidatorError) else \
                    f"{type(e).__name__}: {e}"
                failures.append({"target": f"{a.target} {a.name}".strip(),
                                 "action": a.kind, "error": msg})
                if a.target == "guest":
                    failed_guests.add(a.name)
                log.warning("apply.action_failed", action=a.kind, target=a.target,
                            name=a.name, error=msg,
                            exc_info=not isinstance(e, ConsolidatorError))

        phases: dict[int, list[Any]] = {}
        for a in p.actions:
            phases.setdefault(_phase(a), []).append(a)
        for ph in sorted(phases):
            batch = [a for a in phases[ph] if a.name not in failed_guests]
            # a guest's own actions in one phase (create, start) stay in order
            by_guest: dict[str, list[Any]] = {}
            for a in batch:
                by_guest.setdefault(f"{a.target}:{a.name}", []).append(a)

            async def chain(actions: list[Any]) -> None:
                for a in actions:
                    if a.name in failed_guests and a.target == "guest":
                        return
                    await run(a)
            await asyncio.gather(*(chain(v) for v in by_guest.values()))
        self._bump()
        self._write_applied(desired, inventory_text, complete=True)
        self._sync_rebalancer()
        return {"ok": not failures, "failures": failures,
                "pending": [x.to_json() for x in p.pending], "notes": list(p.notes),
                "actions": len(p.actions), "index": self.index, "status": self.status()}

    def _write_applied(self, fleet: Fleet, inventory_text: str, *, complete: bool) -> None:
        write_json(self.state.applied_path, {
            "format": 1, "hash": fleet.fleet_hash(), "applied_at": time.time(),
            "complete": complete, "index": self.index,
            "fleet": fleet.model_dump(mode="json"), "inventory": inventory_text})

    async def _action(self, a: Any, ex: Executor, emit: EmitFn, purge: bool) -> None:
        if isinstance(a, (CreateNetwork, UpdateNetwork)):
            await asyncio.to_thread(ex.create_network, a.name, a.spec)
            self.networks[a.name] = a.spec
        elif isinstance(a, RemoveNetwork):
            await asyncio.to_thread(ex.remove_network, a.name)
            self.networks.pop(a.name, None)
        elif isinstance(a, UpdateHost):
            pass      # the fleet (and so the host settings) is replaced after the plan runs
        elif isinstance(a, CreateGuest):
            rt = self.guests.get(a.name)
            if rt is None:
                rt = self.guests[a.name] = GuestRuntime(a.name, a.intent)
            rt.intent = a.intent
            rt.state = GuestState.DEFINED
            ex.define_guest(a.intent)
            self.event(rt, "defined")
        elif isinstance(a, UpdateGuest):
            rt = self.guests[a.name]
            async with rt.busy:
                rt.intent = a.intent
                if rt.state is GuestState.RUNNING:
                    changed = await asyncio.to_thread(ex.apply_live, a.intent)
                    self.event(rt, "updated", changes=[c.render() for c in a.changes],
                               written=changed)
                else:
                    self.event(rt, "redefined", changes=[c.render() for c in a.changes])
                self._save(rt)
        elif isinstance(a, StopGuest):
            rt = self.guests[a.name]
            async with rt.busy:
                self.event(rt, "stopping", impact=a.impact.value,
                           changes=[c.render() for c in a.changes])
                await self.stop(rt)
        elif isinstance(a, StartGuest):
            rt = self.guests.setdefault(a.name, GuestRuntime(a.name, a.intent))
            async with rt.busy:
                rt.intent = a.intent
                rt.restarts.clear()          # apply resets a failed guest's history
                await self.start(rt, emit)
        elif isinstance(a, RemoveGuest):
            rt = self.guests.get(a.name)
            if rt is not None:
                async with rt.busy:
                    await self.stop(rt)
            await asyncio.to_thread(ex.remove_guest, a.name, purge=a.purge)
            self.guests.pop(a.name, None)
            self._bump()

    # =============================================================== destroy
    async def destroy(self, purge: bool) -> list[str]:
        if self.executor is None and self.fleet is None:
            return []
        stops = [self.stop(rt, timeout=5) for rt in self.guests.values()
                 if rt.guest is not None and rt.guest.alive()]
        await asyncio.gather(*stops, return_exceptions=True)
        gone: list[str] = []
        if self.executor is not None:
            gone = await asyncio.to_thread(self.executor.destroy)
            for name in list(self.guests):
                await asyncio.to_thread(self.executor.remove_guest, name, purge=purge)
        for name in self.state.network_names():
            with contextlib.suppress(FileNotFoundError):
                self.state.network_record_path(name).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.state.applied_path.unlink()
        self.guests.clear()
        self.networks.clear()
        self.fleet = None
        self.executor = None
        self._bump()
        return gone

    # ===================================================================== API
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: dict[str, Any] = {"locked": False}
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    msg = json.loads(line)
                    rid = int(msg.get("id", 0))
                except (ValueError, TypeError):
                    writer.write(api.encode({"id": 0, "error": {
                        "type": "UsageError", "message": "malformed request", "exit_code": 2}}))
                    continue

                def emit(ev: dict[str, Any], rid: int = rid) -> None:
                    with contextlib.suppress(Exception):
                        writer.write(api.encode({"id": rid, "event": ev}))

                try:
                    result = await self._dispatch(msg.get("op"), msg.get("args") or {},
                                                  session, emit)
                    writer.write(api.encode({"id": rid, "result": result}))
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    if not isinstance(e, ConsolidatorError):
                        log.exception("api.internal_error", op=msg.get("op"))
                    writer.write(api.encode(api.error_message(rid, e)))
                await writer.drain()
                if msg.get("op") in ("shutdown", "destroy"):
                    self.stopping.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if session["locked"]:
                self.apply_lock.release()
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(self, op: str | None, args: dict[str, Any], session: dict[str, Any],
                        emit: EmitFn) -> Any:
        if op == "ping":
            return {"pid": os.getpid(), "protocol": api.PROTOCOL, "index": self.index}
        if op == "status":
            return self.status(bool(args.get("explain")))
        if op == "rebalancer":            # test hook: stop the loop, the watchdog stays
            if self.rebalancer is None:
                raise ConflictError("the rebalancer is not running")
            if args.get("action") == "stop-loop":
                self.rebalancer.stop_loop()
            return {"ticks": self.rebalancer.ticks,
                    "tick_cpu_ms": [round(x * 1000, 3) for x in self.rebalancer.tick_cpu_s],
                    "record_ms": [round(x, 3) for x in self.record_ms],
                    "loop_alive": not (self.rebalancer.loop_task is None or
                                       self.rebalancer.loop_task.done())}
        if op == "observe":
            return self._observed_json()
        if op == "apply-begin":
            if not session["locked"]:
                await self.apply_lock.acquire()       # concurrent applies queue here
                session["locked"] = True
            ci = args.get("check_index")
            if ci is not None and int(ci) != self.index:
                raise ConflictError(f"the plan is stale: it was made at state index {ci}, "
                                    f"the state is now at {self.index}",
                                    hint="run plan again, then apply with the new index")
            return {"index": self.index, "observed": self._observed_json()}
        if op == "apply-commit":
            if not session["locked"]:
                raise UsageError("apply-commit without apply-begin")
            if int(args["index"]) != self.index:
                raise ConflictError(f"the fleet changed while the plan was shown (state index "
                                    f"{args['index']} -> {self.index})",
                                    hint="run apply again to see the new plan")
            desired = Fleet.model_validate(args["fleet"])
            try:
                return await self.apply(desired, args.get("inventory", ""),
                                        prune=bool(args.get("prune")),
                                        purge=bool(args.get("purge")),
                                        allow_restart=bool(args.get("allow_restart")),
                                        emit=emit)
            finally:
                self.apply_lock.release()
                session["locked"] = False
        if op == "apply-abort":
            if session["locked"]:
                self.apply_lock.release()
                session["locked"] = False
            return {"aborted": True}
        if op in ("start", "stop", "restart"):
            return await self._guest_op(op, args["name"], emit)
        if op == "agent":
            rt = self._rt(args["name"])
            if rt.guest is None or rt.state is not GuestState.RUNNING:
                raise ConflictError(f"guest {rt.name} is {rt.state.value}, not running")
            agent = await rt.guest.agent()
            return {"reply": await agent.request(args["command"], args.get("arg", ""),
                                                 float(args.get("timeout", 30)))}
        if op == "destroy":
            async with self.apply_lock:
                return {"removed": await self.destroy(bool(args.get("purge")))}
        if op == "shutdown":
            return {"stopping": True}
        raise UsageError(f"unknown operation {op!r}")

    def _rt(self, name: str) -> GuestRuntime:
        rt = self.guests.get(name)
        if rt is None:
            raise UsageError(f"no guest {name!r}",
                             hint=f"known: {', '.join(sorted(self.guests)) or 'none'}")
        return rt

    async def _guest_op(self, op: str, name: str, emit: EmitFn) -> dict[str, Any]:
        rt = self._rt(name)
        async with self.apply_lock, rt.busy:
            if op in ("stop", "restart"):
                await self.stop(rt)
            if op in ("start", "restart"):
                if rt.state in (GuestState.RUNNING, GuestState.STARTING):
                    raise ConflictError(f"guest {name} is already {rt.state.value}")
                rt.restarts.clear()
                await self.start(rt, emit)
        return next(g for g in self.status()["guests"] if g["name"] == name)

    def _observed_json(self) -> dict[str, Any]:
        return self.observed().to_json()


def main(state_dir: str) -> None:
    sup = Supervisor(state_dir)
    asyncio.run(sup.run())
