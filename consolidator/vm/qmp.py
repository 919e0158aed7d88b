"""QMP control over ``qemu.qmp`` (asyncio), with timeouts and one error tree.

Every failure becomes :class:`consolidator.errors.QMPError` whose ``error_class`` is
QMP's own class (``GenericError``, ``DeviceNotActive``, ...) or one of ours:
``Timeout``, ``Disconnected``, ``ConnectFailed``. Callers branch on that field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from qemu.qmp import ConnectError, ExecuteError, QMPClient, StateError
from qemu.qmp.error import QMPError as _LibQMPError

from ..errors import QMPError
from ..files import unix_address

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # we report failures ourselves

EVENTS = ("SHUTDOWN", "RESET", "STOP", "RESUME", "BALLOON_CHANGE", "GUEST_PANICKED")
BALLOON = "/machine/peripheral/balloon0"


@dataclass(frozen=True)
class GuestStats:
    """The balloon driver's view of guest memory (bytes); None where the guest did not say."""

    available: int | None
    free: int | None
    total: int | None
    disk_caches: int | None
    major_faults: int | None
    swap_in: int | None
    last_update: int            # guest-stats timestamp (s since the epoch); 0 = never

    @classmethod
    def from_qom(cls, reply: dict[str, Any]) -> "GuestStats":
        s = reply.get("stats", {})

        def g(k: str) -> int | None:
            v = s.get(k, -1)
            return None if v is None or v < 0 else int(v)

        return cls(g("stat-available-memory"), g("stat-free-memory"), g("stat-total-memory"),
                   g("stat-disk-caches"), g("stat-major-faults"),
                   g("stat-swap-in"), int(reply.get("last-update", 0)))


SCREEN_FDSET = 90


@dataclass(frozen=True)
class DiskCounters:
    """Bytes and requests a disk's device has read and written."""
    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_ops: int = 0
    wr_ops: int = 0

    def __add__(self, o: "DiskCounters") -> "DiskCounters":
        return DiskCounters(self.rd_bytes + o.rd_bytes, self.wr_bytes + o.wr_bytes,
                            self.rd_ops + o.rd_ops, self.wr_ops + o.wr_ops)


class _Client(QMPClient):
    """qemu.qmp's client, less two of its habits.

    Its debug log of every message: the library formats each message (``str()``, a
    second JSON encoding) before it asks whether anyone logs at debug. That was half the
    supervisor's CPU per rebalancer tick once disk counters were read every second
    (py-spy).

    Its memory of every event: its default listener queues each event for a reader this
    code never has, and every listener keeps each event it accepts in a history for the
    connection's life. For a guest that runs for months, with a balloon change or two a
    minute, that grew without end (the 30-minute soak: +4 MiB/h in the supervisor with
    20 guests). The default listener hears nothing here, and ``QMP.events()`` takes its
    events before a listener could keep them."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events.event_filter = _keep_nothing

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


def _keep_nothing(_event: Any) -> bool:
    return False


class QMP:
    def __init__(self, name: str) -> None:
        self.name = name
        self._client = _Client(name)
        self._fd_lock = asyncio.Lock()       # one descriptor in flight at a time

    async def connect(self, path: str, *, timeout: float = 10.0,
                      alive: Callable[[], bool] = lambda: True) -> None:
        """Connect, retrying while the socket is not yet listening and ``alive()`` holds.
        The socket may listen before QEMU runs (the supervisor binds it): the greeting is
        awaited in slices, so a QEMU that dies first is noticed within one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            if not alive():
                raise QMPError(f"{self.name}: QEMU exited before QMP answered",
                               error_class="ConnectFailed")
            try:
                with unix_address(path) as addr:
                    await asyncio.wait_for(self._client.connect(addr),
                                           timeout=max(0.1, min(2.0, deadline - loop.time())))
                return
            except (ConnectError, OSError, asyncio.TimeoutError) as e:
                last = e
                with contextlib.suppress(Exception):
                    await self._client.disconnect()
                self._client = _Client(self.name)
                await asyncio.sleep(0.01)
        raise QMPError(f"{self.name}: QMP did not answer on {path} within {timeout:g}s "
                       f"({last})", error_class="Timeout")

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                      timeout: float = 5.0) -> Any:
        try:
            # a deadline on this task, not wait_for's task of its own per call (the loop
            # makes a few of these calls a guest every second)
            async with asyncio.timeout(timeout):
                return await self._client.execute(cmd, args)
        except ExecuteError as e:
            raise QMPError(f"{self.name}: {cmd}: {e}", error_class=e.error_class,
                           command=cmd) from e
        except asyncio.TimeoutError:
            raise QMPError(f"{self.name}: {cmd} timed out after {timeout:g}s",
                           error_class="Timeout", command=cmd) from None
        except (StateError, _LibQMPError, EOFError, ConnectionError, OSError) as e:
            raise QMPError(f"{self.name}: {cmd}: QMP connection lost ({type(e).__name__})",
                           error_class="Disconnected", command=cmd) from e

    async def status(self) -> str:
        return (await self.execute("query-status"))["status"]

    async def set_balloon(self, size: int) -> None:
        await self.execute("balloon", {"value": int(size)})

    async def balloon(self) -> int:
        return int((await self.execute("query-balloon"))["actual"])

    async def enable_stats(self, interval_s: int = 1) -> None:
        await self.execute("qom-set", {"path": BALLOON, "property":
                                       "guest-stats-polling-interval", "value": interval_s})

    async def guest_stats(self) -> GuestStats:
        return GuestStats.from_qom(await self.execute(
            "qom-get", {"path": BALLOON, "property": "guest-stats"}))

    async def set_throttle(self, group: str, limits: dict[str, int]) -> None:
        """Replace throttle group ``group``'s limits (every field given: see vm/throttle)."""
        await self.execute("qom-set", {"path": f"/objects/{group}", "property": "limits",
                                       "value": limits})

    async def blockstats(self) -> dict[str, DiskCounters]:
        """Each attached disk's counters since QEMU started, by the node its device is
        attached to."""
        out = {}
        for e in await self.execute("query-blockstats", {"query-nodes": False}):
            st, node = e.get("stats") or {}, e.get("node-name")
            if node:
                out[node] = DiskCounters(int(st.get("rd_bytes", 0)), int(st.get("wr_bytes", 0)),
                                         int(st.get("rd_operations", 0)),
                                         int(st.get("wr_operations", 0)))
        return out

    async def block_resize(self, node: str, size: int) -> None:
        await self.execute("block_resize", {"node-name": node, "size": size})

    async def send_fd(self, fd: int, fdset: int) -> None:
        """Put ``fd`` into QEMU's fd set ``fdset`` (``/dev/fdset/N`` then opens it):
        QEMU opens nothing by path, so every file reaches it this way."""
        async with self._fd_lock:
            self._client.send_fd_scm(fd)
            await self.execute("add-fd", {"fdset-id": fdset})

    async def screendump_to(self, fd: int) -> None:
        """The screen as PNG (QEMU 7.2 writes PNG) into ``fd``, opened O_WRONLY."""
        await self.send_fd(fd, SCREEN_FDSET)
        try:
            await self.execute("screendump", {"filename": f"/dev/fdset/{SCREEN_FDSET}",
                                              "format": "png"}, timeout=15.0)
        finally:
            with contextlib.suppress(QMPError):
                await self.execute("remove-fd", {"fdset-id": SCREEN_FDSET})

    async def add_vnc_client(self, fd: int) -> None:
        """Hand QEMU's VNC server one accepted connection (its listener is ours)."""
        async with self._fd_lock:
            self._client.send_fd_scm(fd)
            await self.execute("getfd", {"fdname": "vnc-client"})
            await self.execute("add_client", {"protocol": "vnc", "fdname": "vnc-client",
                                              "skipauth": True})

    async def powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        try:
            await self.execute("quit", timeout=2.0)
        except QMPError as e:
            if e.error_class != "Disconnected":   # QEMU may close before replying
                raise

    async def events(self, names: tuple[str, ...] = EVENTS) -> AsyncIterator[dict[str, Any]]:
        """Yield events (``{"event", "data", "timestamp"}``) until the connection ends.

        The listener's filter hands each event over and refuses it, so the library's
        listener neither queues nor keeps it (see ``_Client``)."""
        heard: asyncio.Queue[Any] = asyncio.Queue()

        def take(event: Any) -> bool:
            heard.put_nowait(event)
            return False
        with self._client.listener(names, take):
            while True:
                yield dict(await heard.get())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()
