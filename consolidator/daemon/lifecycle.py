"""Guests' lives: start, stop, watch, restart by policy, and reattach after a restart.

Every state change goes through the runtime (:meth:`.runtime.Runtime.transition`);
this module decides *when*. One monitor task per running guest awaits its QEMU's exit
(a pidfd, so an exit is seen at once); an exit the supervisor did not ask for goes
through the restart policy (:func:`.restartpolicy.decide`, pure) and maybe a delayed
restart. A start that is cancelled (the supervisor stopping, say) leaves the guest
``stopped``, not ``crashed``: it did not fail.

Reattach, when a supervisor starts: a guest recorded as active is looked for by its
recorded PID and pidfile, and a process is taken for it only if :func:`is_guest_qemu`
says so (argv names this guest and its UUID, it sits in the guest's cgroup, runs as the
guest's recorded uid, and its start time is the recorded one). ``Guest.adopt`` then watches it by pidfd and
reconnects QMP, with the launch spec rebuilt from the recorded boot files. A QEMU whose
QMP cannot be reattached is ``orphaned``: reported, never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from typing import Any, Callable

import psutil
import structlog

from ..errors import AgentError, ConsolidatorError, QMPError
from ..model import Fleet, GuestState
from ..vm.guest import Guest
from ..vm.launch import launch_spec
from ..vm.qemu import Boot, RunPaths, guest_uuid, name_option, opt_value
from .executor import Executor
from .restartpolicy import decide
from .runtime import GuestRuntime, Runtime
from .tasks import Tasks

log = structlog.get_logger("supervisor")
EmitFn = Callable[[dict[str, Any]], None]
S = GuestState


def is_guest_qemu(name: str, uuid: str, argv: list[str], started: float, pid: int, *,
                  recorded_pid: int | None, recorded_start: float | None,
                  in_cgroup: set[int], uid: int | None = None,
                  recorded_uid: int | None = None, qmp_path: str | None = None) -> bool:
    """Pure: whether process ``pid`` (``argv``, start time ``started``, real ``uid``) is
    this guest's QEMU. Every test must pass: argv names the guest and its UUID (which
    stands for its state dir; a QEMU started before QEMU got its sockets as descriptors
    names its QMP socket ``qmp_path`` instead), the process is in the guest's cgroup (an
    empty cgroup holds no QEMU of ours), it runs as the uid recorded for the guest, and
    when it is the recorded PID, it started when recorded (a PID number can be reused)."""
    if not argv or "qemu-system" not in argv[0]:
        return False
    named = (name_option(name), f"{name},debug-threads=on")  # the latter: before 2026-12
    if not any(n in argv for n in named):
        return False
    marked = any(a == "-uuid" and b == uuid for a, b in zip(argv, argv[1:])) or \
        (qmp_path is not None and any(f"path={opt_value(qmp_path)}," in a for a in argv))
    if not marked:
        return False
    if pid not in in_cgroup:
        return False
    if recorded_uid is not None and uid != recorded_uid:
        return False
    if recorded_start is not None and recorded_pid == pid and \
            abs(started - recorded_start) > 1.0:
        return False
    return True


class Lifecycle:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.executor: Executor | None = None
        self.gate = asyncio.Semaphore(os.cpu_count() or 2)   # host-side start work at once
        self.on_start: list[Callable[[str], None]] = []      # hooks: a guest (re)starts
        self._tasks = Tasks()

    # ------------------------------------------------------------------ setup
    def use(self, fleet: Fleet) -> Executor:
        """The executor for ``fleet`` (a new one for a new instance). Blocking: run it in
        a thread."""
        if self.executor is None or self.executor.fleet.instance != fleet.instance:
            self.executor = Executor(fleet, self.runtime.state)
        else:
            self.executor.fleet = fleet
        return self.executor

    def set_concurrency(self, limit: int | str) -> None:
        self.gate = asyncio.Semaphore((os.cpu_count() or 2) if limit == "auto" else int(limit))

    async def close(self) -> None:
        """The supervisor stops; the guests go on running (their sockets stay)."""
        self._tasks.cancel_all()
        for g in self.runtime.guests.values():
            if g.guest is not None:
                with contextlib.suppress(Exception):
                    await g.guest.cleanup()

    def forget(self, g: GuestRuntime) -> None:
        for t in (g.monitor, g.pending_restart):
            if t is not None and not t.done():
                t.cancel()
        g.monitor = g.pending_restart = None

    # ------------------------------------------------------------------ start
    async def start(self, g: GuestRuntime, emit: EmitFn | None = None) -> None:
        """Start (or restart) one guest. Raises on failure; the guest is then crashed."""
        ex = self.executor
        assert ex is not None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()

        def progress(phase: str) -> None:
            if emit is not None:
                loop.call_soon_threadsafe(emit, {"guest": g.name, "phase": phase,
                                                 "t": round(time.monotonic() - t0, 3)})

        self.runtime.transition(g, S.STARTING, "starting")
        for hook in self.on_start:
            hook(g.name)
        try:
            guest = await ex.start_guest(g.intent, g.guest, progress=progress, gate=self.gate,
                                         note=lambda **f: self.runtime.note(g, **f))
        except asyncio.CancelledError:
            self.runtime.transition(g, S.STOPPED, "start_cancelled", facts={"pid": None})
            progress("cancelled")
            raise
        except Exception as e:
            msg = e.message if isinstance(e, ConsolidatorError) else f"{type(e).__name__}: {e}"
            self.runtime.transition(g, S.CRASHED, "start_failed", facts={"pid": None},
                                    error=msg.splitlines()[0],
                                    serial_tail=getattr(e, "serial_tail", "")[-800:] or None)
            progress("failed")
            raise
        g.guest = guest
        self.runtime.transition(g, S.RUNNING, "ready", facts=running_facts(guest),
                                pid=guest.pid, after_s=round(time.monotonic() - t0, 2))
        progress("ready")
        self.watch(g)

    def watch(self, g: GuestRuntime) -> None:
        if g.monitor is None or g.monitor.done():
            g.monitor = self._tasks.spawn(self._monitor(g), f"monitor-{g.name}")
        if g.intent.ready == "agent" and g.guest is not None:
            self._tasks.spawn(self._agent_view(g, g.guest), f"agent-{g.name}")

    async def _agent_view(self, g: GuestRuntime, guest: Guest) -> None:
        """What the guest agent reports (its addresses, its OS), for ``status``: asked
        at once, then 5 and 30 s later (DHCP and cloud-init come after the agent), then
        every minute while this QEMU runs. A guest whose agent is silent shows nothing."""
        agent = guest.agent_client()
        for pause in itertools.chain((5.0, 25.0), itertools.repeat(60.0)):
            if not guest.alive() or g.guest is not guest:
                return
            try:
                view: dict[str, Any] = {"interfaces": await agent.interfaces(),
                                        "at": round(time.time(), 1)}
                if "os" not in g.agent_view:
                    view["os"] = await agent.info()
                g.agent_view = {**g.agent_view, **view}
            except AgentError as e:
                g.agent_view = {**g.agent_view, "error": e.message[:200]}
            await asyncio.sleep(pause)

    # ------------------------------------------------------------------ stop
    async def stop(self, g: GuestRuntime, timeout: float | None = None, *, undo: bool = True,
                   **why: Any) -> None:
        """Stop gracefully (power button, QMP quit, SIGKILL) and undo what starting made;
        ``undo=False`` leaves that to the caller (destroy removes the whole instance in
        one pass). ``why`` goes into the stopping event."""
        ex = self.executor
        assert ex is not None
        if timeout is None:       # a real OS takes longer to shut down than the tiny image
            timeout = 60.0 if g.intent.firmware else 10.0
        pending, g.pending_restart = g.pending_restart, None
        if pending is not None and not pending.done():
            pending.cancel()        # a restart still waiting, or (destroy) one under way:
            await asyncio.gather(pending, return_exceptions=True)    # it ends first
        guest = g.guest
        if guest is not None and guest.alive() and g.state is not S.ORPHANED:
            self.runtime.transition(g, S.STOPPING, "stopping", **why)
            await ex.stop_guest(g.intent, guest, timeout=timeout, undo=undo)
            self.runtime.transition(g, S.STOPPED, "stopped", facts={"pid": None},
                                    how=guest.exit.describe() if guest.exit else None)
            return
        if g.state is S.ORPHANED and guest is not None and guest.pid:
            # we cannot talk to it, but we were asked to stop it: SIGTERM (QEMU shuts the
            # guest down), and what still runs after the timeout is killed with its cgroup
            await _terminate(guest.pid, timeout)
            await asyncio.to_thread(ex.teardown_guest, g.intent, None)
            self.runtime.transition(g, S.STOPPED, "stopped", facts={"pid": None},
                                    how="orphan terminated")
            return
        await asyncio.to_thread(ex.teardown_guest, g.intent, None)
        if g.state not in (S.DEFINED, S.STOPPED):   # its QEMU is gone: it is stopped now
            self.runtime.transition(g, S.STOPPED, "stopped", facts={"pid": None},
                                    how="was not running")

    # --------------------------------------------------------------- watching
    async def _monitor(self, g: GuestRuntime) -> None:
        """Wait for the guest's QEMU to exit; apply the restart policy when it was not us."""
        guest = g.guest
        if guest is None:
            return
        ex = await guest.wait_exit()
        if ex.requested or g.state in (S.STOPPING, S.STOPPED):
            return
        clean = ex.clean
        self.runtime.transition(g, S.STOPPED if clean else S.CRASHED,
                                "exited" if clean else "crashed", facts={"pid": None},
                                how=ex.describe(), exit_status=ex.exitcode, signal=ex.signal,
                                serial_tail=guest.serial_tail(8) or None)
        await guest.cleanup()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.teardown_guest, g.intent, guest)
        self.after_exit(g, clean)

    def after_exit(self, g: GuestRuntime, clean: bool) -> None:
        fleet = self.runtime.fleet
        limits = fleet.host.restart if fleet else None
        d = decide(g.intent.restart, clean, tuple(g.restarts), time.time(),
                   **({"max_restarts": limits.max, "window": limits.window,
                       "backoff_max": limits.backoff_max} if limits else {}))
        if d.failed:
            self.runtime.transition(g, S.FAILED, "failed", reason=d.reason)
        elif d.restart:
            self.runtime.event(g, "restart_scheduled", delay_s=d.delay, reason=d.reason)
            g.pending_restart = self._tasks.spawn(self._restart_later(g, d.delay),
                                                 f"restart-{g.name}")
        else:
            self.runtime.event(g, "stays_down", reason=d.reason)

    async def _restart_later(self, g: GuestRuntime, delay: float) -> None:
        await asyncio.sleep(delay)
        async with g.busy:
            if g.state not in (S.CRASHED, S.STOPPED):
                return
            g.restarts.append(time.time())
            g.restart_count += 1
            try:
                await self.start(g)
            except Exception:  # noqa: BLE001 - recorded by start(); the policy goes on
                self.after_exit(g, clean=False)

    # --------------------------------------------------------------- reattach
    def find_qemu(self, g: GuestRuntime) -> int | None:
        """The PID of this guest's QEMU, if one runs: from its facts or the pidfile."""
        ex = self.executor
        if ex is None or ex.cgroups is None:
            return None
        gdir = self.runtime.state.guest_dir(g.name)
        facts = g.facts
        candidates = [facts.get("pid")]
        with contextlib.suppress(OSError, ValueError):
            candidates.append(int((gdir / "run" / "qemu.pid").read_text()))
        in_cgroup = ex.cgroups.pids(g.name)
        qmp = str(RunPaths.for_guest(gdir).qmp)
        recorded_uid = (facts.get("identity") or {}).get("uid")
        for pid in candidates:
            if not pid:
                continue
            try:
                p = psutil.Process(pid)
                argv, started, uid = p.cmdline(), p.create_time(), p.uids().real
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if is_guest_qemu(g.name, guest_uuid(gdir), argv, started, pid,
                             recorded_pid=facts.get("pid"), recorded_start=facts.get("pid_start"),
                             in_cgroup=in_cgroup, uid=uid, recorded_uid=recorded_uid,
                             qmp_path=qmp):
                return pid
        return None

    async def reattach(self, g: GuestRuntime) -> None:
        ex = self.executor
        assert ex is not None
        pid = self.find_qemu(g)
        if pid is None:
            self.runtime.transition(g, S.CRASHED, "vanished", facts={"pid": None},
                                    note="no QEMU of this guest runs (it died while no "
                                         "supervisor was watching)")
            await asyncio.to_thread(ex.teardown_guest, g.intent, None)
            self.after_exit(g, clean=False)
            return
        facts = g.facts
        boot = Boot(**facts["boot"]) if isinstance(facts.get("boot"), dict) else Boot(None, None)
        spec = launch_spec(g.intent, boot, RunPaths.for_guest(self.runtime.state.guest_dir(
            g.name)), ex.virt)
        guest = g.guest = Guest(spec, ready_probe=g.intent.ready)
        try:
            await guest.adopt(pid)
        except QMPError as e:
            self.runtime.transition(g, S.ORPHANED, "orphaned", pid=pid, error=e.message,
                                    note="QEMU runs but its QMP cannot be reattached; "
                                         "left running")
            return
        self.runtime.transition(g, S.RUNNING, "reattached", facts={"pid": pid}, pid=pid)
        self.watch(g)


async def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        await asyncio.sleep(0.1)


def running_facts(guest: Guest) -> dict[str, Any]:
    """What the record keeps of a guest that runs: enough to adopt it again."""
    b = guest.spec.boot
    started = None
    with contextlib.suppress(psutil.Error):
        started = psutil.Process(guest.pid).create_time()
    return {"pid": guest.pid, "pid_start": started,
            "qmp": str(guest.paths.qmp), "machine": guest.spec.machine.name,
            "accel": guest.spec.accel.name, "started_at": time.time(),
            "boot": {"kernel": b.kernel, "initrd": b.initrd, "cmdline": b.cmdline,
                     "disk": b.disk, "disk_format": b.disk_format, "builtin": b.builtin,
                     "firmware": b.firmware, "cdrom": b.cdrom}}
