"""One guest = one QEMU process, with an explicit lifecycle.

Modelled on QEMU's own ``python/qemu/machine/machine.py``::

    defined ──launch──► starting ──READY──► running ──shutdown──► stopping ──► stopped
                           │                   │                                ▲
                           └──exit/failure─────┴──────exit (non-zero)──► crashed │
                                              (exit 0: guest powered off) ───────┘

Every transition is guarded (:class:`~consolidator.errors.RunstateError` names the state
required) and recorded with its time and the duration of the state it ends. ``launch``
is pre-launch (files, run dir, lock), spawn, post-launch (QMP, READY, stats); a failure
raises :class:`~consolidator.errors.LaunchError` with QEMU's exit code, argv, stderr tail
and serial tail, and leaves no process or socket behind. ``shutdown`` tries the soft path
first: ``system_powerdown``, then QMP ``quit``, then SIGKILL. ``cleanup`` runs in
``finally`` and is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import structlog

from .. import linux
from ..files import rotate_log, unix_address
from ..model import BOOT_NODE, data_node
from ..errors import (AgentError, ConflictError, LaunchError, QMPError, ReadyTimeout,
                      RunstateError)
from .agent import Agent
from .handles import Opened
from .qemu import LaunchSpec, build_argv
from .qga import GuestAgent
from . import throttle
from .qmp import QMP, DiskCounters, GuestStats

READY_MARK = b"CONSOLIDATOR-READY"


class Runstate(enum.StrEnum):
    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


_ALLOWED: dict[Runstate, set[Runstate]] = {
    Runstate.DEFINED: {Runstate.STARTING},
    Runstate.STARTING: {Runstate.RUNNING, Runstate.STOPPING, Runstate.STOPPED, Runstate.CRASHED},
    Runstate.RUNNING: {Runstate.STOPPING, Runstate.STOPPED, Runstate.CRASHED},
    Runstate.STOPPING: {Runstate.STOPPED, Runstate.CRASHED},
    Runstate.STOPPED: {Runstate.STARTING},
    Runstate.CRASHED: {Runstate.STARTING},
}


@dataclass(frozen=True)
class Transition:
    state: Runstate
    at: float                 # wall clock (time.time())
    mono: float               # monotonic clock
    previous_duration: float  # seconds spent in the state this one ended


@dataclass(frozen=True)
class ExitInfo:
    exitcode: int | None      # QEMU's exit status; None when not our child
    signal: int | None        # the signal that killed it, if any
    shutdown_reason: str | None = None   # from QMP's SHUTDOWN event
    requested: bool = False   # we asked it to stop
    asked: str | None = None  # how: agent (qemu-ga), powerdown (ACPI), quit (QMP)

    @property
    def clean(self) -> bool:
        """A guest powered off from inside (or asked to stop) is a clean exit."""
        if self.requested:
            return True
        return self.exitcode == 0 and self.signal is None

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by {signal.Signals(self.signal).name}"
        elif self.exitcode is not None:
            how = f"exit status {self.exitcode}"
        else:
            how = "exited"
        why = [w for w in (self.shutdown_reason,
                           f"asked through the {self.asked}" if self.asked == "agent" else
                           f"asked by {self.asked}" if self.asked else None) if w]
        return how + (f" ({', '.join(why)})" if why else "")


class Placement(Protocol):
    """Where and as whom QEMU runs (cgroup, netns, jail, uid): applied in the child
    before exec. It holds the guest's tap descriptors, one per NIC."""

    tap_fds: tuple[int, ...]
    jail: object | None

    def preexec(self) -> None: ...

    def describe(self) -> str: ...


def write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


class Guest:
    def __init__(self, spec: LaunchSpec, *, ready_timeout: float = 90.0,
                 qmp_timeout: float = 15.0, placement: Placement | None = None,
                 ready_probe: str | None = None, binary: str = "qemu-system-x86_64",
                 hint_pvm: bool = False,
                 tcp_probe: Callable[[int], bool] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.paths = spec.paths
        self.ready_timeout = ready_timeout
        self.qmp_timeout = qmp_timeout
        self.placement = placement
        # marker: the tiny image's READY line; agent: qemu-ga answers guest-ping;
        # tcp:PORT: the guest's first address accepts on PORT (``tcp_probe`` connects);
        # serial:REGEX: a serial line matches; none: QEMU runs
        self.ready_probe = ready_probe or ("marker" if spec.boot.builtin else "none")
        self.tcp_probe = tcp_probe
        self.binary = binary
        self.hint_pvm = hint_pvm
        self.log = structlog.get_logger("guest").bind(guest=spec.name)
        self._state = Runstate.DEFINED
        # the last few lives' (the object is kept across restarts: unbounded, it grew
        # with each one, as the events did before their deque)
        self.transitions: deque[Transition] = deque(
            [Transition(Runstate.DEFINED, time.time(), time.monotonic(), 0.0)], maxlen=64)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None        # set for children and for adopted processes
        # (wall time, size) of the balloon, from BALLOON_CHANGE events (QEMU sends at most
        # one a second): guest stats taken while it moved cannot be read against it
        self._balloon_log: deque[tuple[float, int | None]] = deque(maxlen=32)
        self.qmp: QMP | None = None
        self._throttled: bool | None = None      # this QEMU has throttle filters (asked)
        self.exit: ExitInfo | None = None
        self._agent: Agent | None = None
        self._exited: asyncio.Event | None = None
        self._pidfd: int | None = None
        self._lock_fd: int | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._shutdown_how: str | None = None     # agent, powerdown or quit: what was asked
        self._vnc_server: asyncio.AbstractServer | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._serial_offset = 0
        self._shutdown_reason: str | None = None
        self._on_phase: Callable[[str], None] = lambda phase: None

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> Runstate:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    def _to(self, new: Runstate) -> None:
        if new not in _ALLOWED[self._state]:
            raise RunstateError(self.name, self._state.value,
                                tuple(s.value for s, n in _ALLOWED.items() if new in n),
                                f"enter {new.value}")
        now = time.monotonic()
        prev = self.transitions[-1]
        self.transitions.append(Transition(new, time.time(), now, now - prev.mono))
        self.log.debug("guest.state", state=new.value, after=round(now - prev.mono, 3))
        self._state = new

    def _require(self, op: str, *states: Runstate) -> None:
        if self._state not in states:
            raise RunstateError(self.name, self._state.value, tuple(s.value for s in states), op)

    def duration(self, state: Runstate) -> float | None:
        """How long the guest spent in ``state`` the last time it was there (so far, if now)."""
        if self.transitions[-1].state is state:
            return time.monotonic() - self.transitions[-1].mono
        last = None
        for a, b in itertools.pairwise(self.transitions):
            if a.state is state:
                last = b.mono - a.mono
        return last

    # ----------------------------------------------------------------- launch
    async def launch(self, placement: Placement | None = None,
                     on_phase: Callable[[str], None] | None = None) -> None:
        """Start QEMU and wait until the guest is up. Raises LaunchError (or ReadyTimeout).
        ``placement`` (cgroup, netns) overrides the one given at construction.
        ``on_phase`` hears "launch" (spawning), "spawned" (QEMU runs) and "boot" (QMP
        answered, booting)."""
        self._require("launch", Runstate.DEFINED, Runstate.STOPPED, Runstate.CRASHED)
        if placement is not None:
            self.placement = placement
        self._on_phase = on_phase or (lambda phase: None)
        self._to(Runstate.STARTING)
        self.exit = None
        self._stop_requested = False
        self._shutdown_reason = None
        self._shutdown_how = None
        try:
            self._pre_launch()
            self._on_phase("launch")
            self._spawn()
            self._on_phase("spawned")
            await self._post_launch()
        except BaseException as e:
            await self._abort_launch(e)
            raise
        self._to(Runstate.RUNNING)

    def _pre_launch(self) -> None:
        boot = self.spec.boot
        for what, path in (("kernel", boot.kernel), ("initrd", boot.initrd),
                           ("disk", boot.disk)):
            if path and not os.access(path, os.R_OK):
                raise LaunchError(f"guest {self.name}: {what} {path} is missing or unreadable")
        run = self.paths.dir
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run, 0o700)
        self._lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            pid = self.paths.pidfile.read_text().strip() if self.paths.pidfile.exists() else "?"
            raise ConflictError(f"guest {self.name} is already running (QEMU pid {pid} holds "
                                f"{self.paths.lock})") from None
        for sock in self.paths.sockets():
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.paths.pidfile.unlink()
        rotate_log(self.paths.serial_log)
        self.paths.serial_log.touch(mode=0o600)
        self._serial_offset = self.paths.serial_log.stat().st_size

    def _spawn(self) -> None:
        placement = self.placement
        binary = self.binary
        if placement is not None and placement.jail is not None:
            # the jail holds /usr and what the host links from /: resolve before the fork
            binary = shutil.which(binary) or binary
        opened = Opened(self.spec, placement.tap_fds if placement else ())
        try:
            self.argv = build_argv(self.spec, opened.handles, binary)
            assert self._lock_fd is not None
            stderr = os.fdopen(os.open(self.paths.stderr, os.O_WRONLY | os.O_CREAT |
                                       os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb")
            try:
                # QEMU holds the lock fd for its whole life: a second launch finds it taken.
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=stderr, start_new_session=True,
                    pass_fds=(self._lock_fd, *opened.handles.fds()), close_fds=True,
                    preexec_fn=placement.preexec if placement else None)
            except OSError as e:
                raise LaunchError(f"guest {self.name}: cannot run {binary}: {e.strerror}",
                                  argv=self.argv) from e
            finally:
                stderr.close()
        finally:
            opened.close()               # QEMU has its own copies now
        self._pid = self.proc.pid
        # it inherited the supervisor's adjustment: a guest is given up before the
        # supervisor (which keeps the others running), after the host's other processes
        linux.set_oom_score_adj(self.proc.pid, linux.OOM_ADJ_GUEST)
        write_pidfile(self.paths.pidfile, self.proc.pid)
        self.log.info("guest.spawned", pid=self.proc.pid,
                      placement=placement.describe() if placement else None)
        self._watch_pid(self.proc.pid)

    def _watch_pid(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._pidfd = linux.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
        if self.proc is not None:
            rc = self.proc.wait()
            sig = -rc if rc < 0 else None
            code = None if sig else rc
        else:
            # Adopted: not our child, so its exit status went to its real parent. QMP's
            # SHUTDOWN reason stands in: a panic is a failure, any other announced shutdown
            # is clean, and vanishing without one (SIGKILL, say) is not clean.
            sig = None
            code = {None: None, "guest-panic": 1}.get(self._shutdown_reason, 0)
        self.exit = ExitInfo(code, sig, self._shutdown_reason, self._stop_requested,
                             self._shutdown_how)
        if self._exited is not None:
            self._exited.set()
        if self._state in (Runstate.RUNNING, Runstate.STARTING) and not self._stop_requested:
            self._to(Runstate.STOPPED if self.exit.clean else Runstate.CRASHED)
            level = "info" if self.exit.clean else "warning"
            getattr(self.log, level)("guest.exited", how=self.exit.describe(),
                                     serial_tail=tail(self.paths.serial_log, 5))

    @property
    def balloon_actual(self) -> int | None:
        """The balloon's current size: guest RAM it leaves the guest (None: unknown)."""
        return self._balloon_log[-1][1] if self._balloon_log else None

    @balloon_actual.setter
    def balloon_actual(self, v: int | None) -> None:
        self._balloon_log.append((time.time(), v))

    def balloon_range(self, since: float) -> tuple[int, int] | None:
        """Smallest and largest size the balloon had from wall time ``since`` until now."""
        sizes = []
        for when, v in reversed(self._balloon_log):
            if v is not None:
                sizes.append(v)
            if when <= since:
                break
        return (min(sizes), max(sizes)) if sizes else None

    def alive(self) -> bool:
        if self._exited is not None and self._exited.is_set():
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        if self._pid is None:
            return False
        try:
            os.kill(self._pid, 0)
        except ProcessLookupError:
            return False
        return True

    async def adopt(self, pid: int) -> None:
        """Take over a QEMU this process did not start (after a supervisor restart).
        The caller has checked that ``pid`` is this guest's QEMU. Raises QMPError when
        QMP cannot be reattached; the process is then left alone (orphaned), not killed."""
        self._require("adopt", Runstate.DEFINED, Runstate.STOPPED, Runstate.CRASHED)
        self._to(Runstate.STARTING)
        self.proc = None
        self._pid = pid
        self._stop_requested = False
        self._watch_pid(pid)
        linux.set_oom_score_adj(pid, linux.OOM_ADJ_GUEST)   # one an older version started
        qmp = QMP(self.name)
        try:
            await qmp.connect(str(self.paths.qmp), timeout=self.qmp_timeout, alive=self.alive)
        except QMPError:
            await qmp.close()
            self._stop_requested = True     # not a crash: we just cannot talk to it
            if self._pidfd is not None:
                asyncio.get_running_loop().remove_reader(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None
            self._to(Runstate.STOPPED)
            raise
        self.qmp = qmp
        self._event_task = asyncio.create_task(self._watch_events(), name=f"{self.name}-events")
        await self.qmp.enable_stats(1)
        self.balloon_actual = await self.qmp.balloon()
        await self._serve_vnc()
        self._to(Runstate.RUNNING)
        self.log.info("guest.adopted", pid=pid)

    async def _post_launch(self) -> None:
        self.qmp = QMP(self.name)
        await self.qmp.connect(str(self.paths.qmp), timeout=self.qmp_timeout, alive=self.alive)
        self._event_task = asyncio.create_task(self._watch_events(), name=f"{self.name}-events")
        self._on_phase("boot")
        await self._serve_vnc()             # the screen is there to watch the boot
        probe, _, arg = self.ready_probe.partition(":")
        if probe == "marker":
            await self._wait_ready(lambda buf: READY_MARK in buf)
        elif probe == "serial":
            pattern = re.compile(arg.encode(errors="replace"), re.M)
            await self._wait_ready(lambda buf: pattern.search(buf) is not None)
        elif probe in ("agent", "tcp"):
            await self._wait_ready(None, probe=self._probe_agent if probe == "agent"
                                   else functools.partial(self._probe_tcp, int(arg)))
        else:
            status = await self.qmp.status()
            if status not in ("running", "prelaunch"):
                raise LaunchError(f"guest {self.name}: QEMU status is {status}")
        await self.qmp.enable_stats(1)
        self.balloon_actual = await self.qmp.balloon()

    async def _serve_vnc(self) -> None:
        """For a guest with a screen: listen on ``run/vnc.sock`` (root's, 0600) and give
        each connection to QEMU's VNC server. QEMU listens on nothing itself."""
        if self.spec.display != "vga" or self._vnc_server is not None:
            return
        path = self.paths.vnc
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

        async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            try:
                if self.qmp is not None and sock is not None:
                    await self.qmp.add_vnc_client(sock.fileno())
            except QMPError as e:
                self.log.warning("guest.vnc_client_failed", error=str(e)[:200])
            finally:
                w.close()           # QEMU holds its own copy of the connection

        with unix_address(path) as addr:
            self._vnc_server = await asyncio.start_unix_server(client, addr)
        os.chmod(path, 0o600)

    async def screenshot(self, max_bytes: int = 16 << 20) -> bytes:
        """The screen as PNG, through QMP screendump into a file QEMU gets as an fd."""
        if self.spec.display != "vga":
            raise ConflictError(f"guest {self.name} has no screen (display: none)")
        if self.qmp is None:
            raise ConflictError(f"guest {self.name} is not running")
        path = self.paths.dir / "screen.png"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
        try:
            await self.qmp.screendump_to(fd)
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) > max_bytes:
            raise LaunchError(f"guest {self.name}: screendump gave no PNG")
        return data

    async def _set_clock(self) -> None:
        try:
            await self.agent_client().set_time()
            self.log.info("guest.clock_set", after="resume")
        except AgentError as e:
            self.log.warning("guest.clock_not_set", error=str(e)[:200])

    def agent_client(self) -> GuestAgent:
        """A client of the guest's qemu-ga (guests other than the tiny image)."""
        return GuestAgent(self.name, str(self.paths.agent))

    async def _probe_agent(self) -> bool:
        try:
            await self.agent_client().ping(timeout=2.0)
            return True
        except AgentError:
            return False

    async def _probe_tcp(self, port: int) -> bool:
        if self.tcp_probe is None:
            raise LaunchError(f"guest {self.name}: ready: tcp:{port} needs an address")
        return await asyncio.to_thread(self.tcp_probe, port)

    async def _wait_ready(self, seen: Callable[[bytes], bool] | None,
                          probe: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Until ``seen`` matches the serial output since launch (the last 4 KiB), or
        ``probe`` answers true (asked at most every 0.5 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        next_probe = loop.time()
        with open(self.paths.serial_log, "rb") as f:
            f.seek(self._serial_offset)
            buf = b""
            while True:
                chunk = f.read()
                if chunk:
                    buf = (buf + chunk)[-4096:]
                    if seen is not None and seen(buf):
                        # the runtime logs the transition (guest.ready); this is its detail
                        self.log.debug("guest.ready_line",
                                       line=buf.rsplit(b"\n", 2)[-2 if buf.endswith(b"\n")
                                                                  else -1]
                                       .decode(errors="replace").strip()[:200],
                                       after=round(time.monotonic() -
                                                   self.transitions[-1].mono, 3))
                        return
                if probe is not None and loop.time() >= next_probe:
                    if await probe():
                        self.log.debug("guest.ready_probe", probe=self.ready_probe,
                                       after=round(time.monotonic() -
                                                   self.transitions[-1].mono, 3))
                        return
                    next_probe = loop.time() + 0.5
                if not self.alive():
                    raise LaunchError(f"guest {self.name}: QEMU exited during boot")
                if loop.time() > deadline:
                    hint = None
                    if self.hint_pvm:
                        hint = ("this host's KVM is PVM and the guest runs under -accel kvm: "
                                "stock kernels hang there before their first printk; unmark "
                                "pvm: true on the image to use TCG")
                    raise ReadyTimeout(
                        f"guest {self.name}: not ready ({self.ready_probe}) within "
                        f"{self.ready_timeout:g}s; "
                        f"last serial lines:\n  " + "\n  ".join(
                            tail(self.paths.serial_log, 12).splitlines() or ["(nothing)"]),
                        serial_tail=tail(self.paths.serial_log), hint=hint, argv=self.argv)
                await asyncio.sleep(0.05)

    async def _watch_events(self) -> None:
        assert self.qmp is not None
        try:
            async for ev in self.qmp.events():
                self.events.append(ev)
                if ev["event"] == "SHUTDOWN":
                    self._shutdown_reason = (ev.get("data") or {}).get("reason")
                elif ev["event"] == "BALLOON_CHANGE":
                    ts = ev.get("timestamp") or {}
                    t = (ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6) or time.time()
                    self._balloon_log.append(
                        (t, int((ev.get("data") or {}).get("actual", 0)) or None))
                elif ev["event"] == "RESUME" and self.ready_probe == "agent" and \
                        self._state is Runstate.RUNNING:
                    # its clock stood still while it was paused: set it, as libvirt does
                    self._clock_task = asyncio.create_task(self._set_clock())
                self.log.debug("guest.event", qmp_event=ev["event"], data=ev.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - QMP went away: the pidfd tells the rest
            if self.alive():
                self.log.warning("guest.events_lost", error=f"{type(e).__name__}: {e}")
            return

    async def _abort_launch(self, cause: BaseException) -> None:
        """Stop whatever was started, and turn the failure into a LaunchError."""
        exitcode = None
        if self.proc is not None and self.proc.poll() is None:
            self._stop_requested = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                exitcode = await asyncio.get_running_loop().run_in_executor(
                    None, self.proc.wait)
        if self._exited is not None and not self._exited.is_set() and self.proc is not None:
            self._on_exit()
        if self._state is Runstate.STARTING:
            self._to(Runstate.CRASHED if not isinstance(cause, asyncio.CancelledError)
                     else Runstate.STOPPED)
        await self.cleanup()
        if isinstance(cause, LaunchError):
            if cause.exitcode is None and exitcode is not None and \
                    not isinstance(cause, ReadyTimeout):
                cause.exitcode = exitcode
            if not cause.stderr_tail:
                cause.stderr_tail = tail(self.paths.stderr, 12)
                if cause.stderr_tail.strip() and "qemu said" not in cause.message:
                    cause.message += "\nqemu said:\n  " + "\n  ".join(
                        cause.stderr_tail.splitlines())
            cause.serial_tail = cause.serial_tail or tail(self.paths.serial_log)
            cause.argv = cause.argv or self.argv
        elif isinstance(cause, QMPError):
            stderr = tail(self.paths.stderr, 12)
            raise LaunchError(f"guest {self.name}: {cause.message}", exitcode=exitcode,
                              argv=self.argv, stderr_tail=stderr,
                              serial_tail=tail(self.paths.serial_log)) from cause

    # --------------------------------------------------------------- control
    async def guest_stats(self) -> GuestStats | None:
        """The balloon driver's guest stats; None when QMP is not connected."""
        if self.qmp is None:
            return None
        return await self.qmp.guest_stats()

    async def ping(self) -> None:
        """One QMP round trip: whether QEMU answers at all. Raises QMPError."""
        await self._need_qmp("query-status").status()

    async def set_balloon(self, size: int) -> None:
        """Ask the balloon for ``size`` bytes of guest RAM. Raises QMPError."""
        if self.qmp is None:
            raise QMPError(f"guest {self.name}: QMP is not connected",
                           error_class="Disconnected", command="balloon")
        await self.qmp.set_balloon(size)

    def _need_qmp(self, what: str) -> QMP:
        if self.qmp is None:
            raise QMPError(f"guest {self.name}: QMP is not connected",
                           error_class="Disconnected", command=what)
        return self.qmp

    async def set_disk_limits(self, drive: str, limits: dict[str, int]) -> None:
        """Replace disk ``drive``'s own limits (``disk0``, ``data-<name>``) live."""
        if not await self._throttle_nodes():
            raise QMPError(f"guest {self.name}: its QEMU was started without throttle "
                           "groups (by an older consolidator): restart it to limit its disks",
                           error_class="NotThrottled", command="qom-set")
        await self._need_qmp("qom-set").set_throttle(throttle.group(drive), limits)

    async def set_io_share(self, bps: int | None, iops: int | None) -> None:
        """The guest's part of the host budget, over all its disks; None: no ceiling.
        A QEMU without the groups (older, adopted) is left alone."""
        if (self.spec.boot.disk or self.spec.boot.data) and await self._throttle_nodes():
            await self._need_qmp("qom-set").set_throttle(
                throttle.GUEST_GROUP, throttle.share_limits(bps, iops))

    async def disk_counters(self) -> dict[str, DiskCounters]:
        """Each disk's counters by drive (``disk0``, ``data-<name>``); cdroms left out."""
        out = {}
        for node, c in (await self._need_qmp("query-blockstats").blockstats()).items():
            drive = node[:-3] if node.endswith("-io") else node
            if drive == BOOT_NODE or drive.startswith(data_node("")):
                out[drive] = c
        return out

    async def resize_disk(self, name: str, size: int) -> None:
        """Grow data disk ``name`` to ``size`` bytes while the guest runs (never shrinks:
        the plan refuses that)."""
        if self.qmp is None:
            raise LaunchError(f"guest {self.name}: no QMP to resize disk {name}")
        # through the node the device is attached to: a resize below the throttle filters
        # reaches the file but never the guest (QEMU tells only a root's device)
        node = data_node(name)
        if await self._throttle_nodes():
            node = throttle.top_node(node)
        await self.qmp.block_resize(node, size)

    async def _throttle_nodes(self) -> bool:
        """Whether this QEMU has the throttle filters (one started by a consolidator
        before them, and adopted, has not), asked once."""
        if self._throttled is None:
            names = {n.get("node-name") for n in await self._need_qmp("query").execute(
                "query-named-block-nodes", {"flat": True})}
            self._throttled = any(str(n).endswith("-io") for n in names) or \
                not (self.spec.boot.disk or self.spec.boot.data)
        return self._throttled

    async def freeze(self) -> int | None:
        """Freeze the guest's filesystems through its agent (the tiny image's, or
        qemu-ga): how many were frozen, or None when no agent answers (a snapshot is
        then crash-consistent). Every freeze must be followed by :meth:`thaw`."""
        try:
            if self.spec.boot.builtin:
                reply = await (await self.agent(timeout=2.0)).request("freeze", timeout=30.0)
                return int(reply.partition("=")[2] or 0)
            qga = self.agent_client()
            await qga.ping(timeout=1.0)
            return await qga.fsfreeze()
        except (AgentError, ValueError, RunstateError):
            return None

    async def thaw(self) -> int:
        """Thaw what :meth:`freeze` froze. Raises AgentError when the agent does not."""
        if self.spec.boot.builtin:
            reply = await (await self.agent(timeout=5.0)).request("thaw", timeout=30.0)
            return int(reply.partition("=")[2] or 0)
        return await self.agent_client().fsthaw()

    @property
    def qmp_client(self) -> QMP:
        """The QMP connection, for block operations (:mod:`.storage`)."""
        if self.qmp is None:
            raise ConflictError(f"guest {self.name} is not running")
        return self.qmp

    async def agent(self, timeout: float = 10.0) -> Agent:
        """The guest agent connection (builtin image), connected on first use."""
        self._require("talk to the agent", Runstate.RUNNING)
        if self._agent is None:
            a = Agent(self.name)
            await a.connect(str(self.paths.agent), timeout)
            self._agent = a
        return self._agent

    async def wait_exit(self, timeout: float | None = None) -> ExitInfo:
        assert self._exited is not None
        await asyncio.wait_for(self._exited.wait(), timeout)
        assert self.exit is not None
        return self.exit

    async def shutdown(self, timeout: float = 10.0) -> ExitInfo:
        """Stop: system_powerdown; after a while QMP quit; at the end SIGKILL."""
        if self._state in (Runstate.STOPPED, Runstate.CRASHED, Runstate.DEFINED):
            await self.cleanup()
            return self.exit or ExitInfo(None, None, requested=True)
        self._require("shut down", Runstate.RUNNING, Runstate.STARTING)
        self._to(Runstate.STOPPING)
        self._stop_requested = True
        start = time.monotonic()
        steps: list[tuple[str, float]] = [("powerdown", timeout * 0.7), ("quit", timeout * 0.2)]
        if not self.spec.boot.builtin and self.ready_probe == "agent":
            # a real OS with qemu-ga: ask it to shut down, as `virsh shutdown --mode agent`
            steps = [("agent", timeout * 0.5), ("powerdown", timeout * 0.3),
                     ("quit", timeout * 0.1)]
        try:
            for step, budget in steps:
                if not self.alive():
                    break
                try:
                    if step == "agent":
                        await self.agent_client().shutdown()
                        self._shutdown_how = "agent"
                    elif self.qmp is not None:
                        await (self.qmp.powerdown() if step == "powerdown" else self.qmp.quit())
                        self._shutdown_how = step
                except (QMPError, AgentError) as e:
                    self.log.debug("guest.shutdown_step_failed", step=step,
                                   error=str(e)[:200])
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await self.wait_exit(budget)
            if self.alive():
                self.log.warning("guest.kill", reason=f"still running after {timeout:g}s")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)  # type: ignore[arg-type]
                await self.wait_exit(10)
        finally:
            if self._state is Runstate.STOPPING:
                self._to(Runstate.STOPPED)
            await self.cleanup()
        self.log.debug("guest.shutdown_done", how=self.exit.describe() if self.exit else "?",
                      took=round(time.monotonic() - start, 3))
        assert self.exit is not None
        return self.exit

    async def cleanup(self) -> None:
        """Release everything this object holds. Safe to call twice, and from finally."""
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(BaseException):
                await self._event_task
            self._event_task = None
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._vnc_server is not None:
            self._vnc_server.close()
            self._vnc_server = None
            with contextlib.suppress(FileNotFoundError):
                self.paths.vnc.unlink()
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        self._throttled = None
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self.alive():
            for p in (*self.paths.sockets(), self.paths.pidfile):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def abandon(self) -> None:
        """Last resort outside any event loop (test teardown, atexit): SIGKILL QEMU, reap
        it, close our fds and remove its sockets. Synchronous; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        elif self.proc is None and self._pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        for fd_attr in ("_pidfd", "_lock_fd"):
            fd = getattr(self, fd_attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, fd_attr, None)
        for p in (*self.paths.sockets(), self.paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # ------------------------------------------------------------------ info
    def serial_tail(self, lines: int = 20) -> str:
        return tail(self.paths.serial_log, lines)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "state": self._state.value, "pid": self.pid,
                "argv": self.argv, "exit": self.exit.describe() if self.exit else None,
                "transitions": [(t.state.value, round(t.previous_duration, 3))
                                for t in self.transitions]}
