"""Waking the rebalancer when the host's memory stalls, faster than its tick.

The kernel's PSI trigger (``some 100000 1000000`` written to ``/proc/pressure/memory``,
then ``POLLPRI``) is the way: it fires when tasks stalled on memory for 100 ms within
any 1 s window, at no cost in between. Some kernels refuse triggers (``EINVAL`` for any
trigger on the development hosts' kernel, which still accounts PSI): there the same rule
is applied by reading the ``some ... total=`` stall time every 250 ms, a ``pread`` of one
small file, and firing at most once a window, as the kernel does. 250 ms, not 100: each
poll is a wake-up of the supervisor, and at 100 ms the poller alone cost 0.13 % of a core
(0.056 % at 250 ms; measured 2026-12-03), half of an idle supervisor's budget, for a
reaction still four times faster than the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time
from collections import deque
from typing import Callable, Protocol

PRESSURE = "/proc/pressure/memory"
STALL_US, WINDOW_US = 100_000, 1_000_000
POLL_PERIOD = 0.25


class PsiWatch(Protocol):
    def attach(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None: ...

    def close(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def release(self) -> None: ...


class PsiTrigger:
    """A kernel PSI trigger, readable by the event loop."""

    def __init__(self, stall_us: int = STALL_US, window_us: int = WINDOW_US,
                 path: str = PRESSURE) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(self.fd, f"some {stall_us} {window_us}\0".encode())
        except OSError:
            os.close(self.fd)
            raise
        self.ep = select.epoll()
        self.ep.register(self.fd, select.EPOLLPRI)

    def attach(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        def fired() -> None:
            self.ep.poll(0)
            wake()
        loop.add_reader(self.ep.fileno(), fired)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(Exception):
            loop.remove_reader(self.ep.fileno())
        self.release()

    def release(self) -> None:
        self.ep.close()
        os.close(self.fd)


def stalled(samples: deque[tuple[float, int]], now: float, total: int,
            stall_us: int = STALL_US, window_us: int = WINDOW_US) -> bool:
    """Pure: add the reading (``now`` s, ``total`` µs stalled so far) and say whether the
    stall time within the last window reached ``stall_us`` (the trigger's rule)."""
    samples.append((now, total))
    while samples and now - samples[0][0] > window_us / 1e6:
        samples.popleft()
    return total - samples[0][1] >= stall_us


def some_total(text: str) -> int:
    """Pure: the ``some`` line's ``total=`` (µs) of a pressure file."""
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split():
                if field.startswith("total="):
                    return int(field[6:])
    raise ValueError("no 'some ... total=' line")


class PsiPoller:
    """The trigger's rule, applied by reading the stall time every ``period``."""

    def __init__(self, period: float = POLL_PERIOD, path: str = PRESSURE) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.period = period
        self.samples: deque[tuple[float, int]] = deque()
        self._quiet_until = 0.0
        self._handle: asyncio.TimerHandle | None = None
        some_total(self._read())                  # a file we can read, or fail now

    def _read(self) -> str:
        return os.pread(self.fd, 512, 0).decode()

    def attach(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        def tick() -> None:
            now = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                if stalled(self.samples, now, some_total(self._read())) and \
                        now >= self._quiet_until:
                    self._quiet_until = now + WINDOW_US / 1e6   # once a window at most
                    wake()
            self._handle = loop.call_later(self.period, tick)
        self._handle = loop.call_later(self.period, tick)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self.release()

    def release(self) -> None:
        os.close(self.fd)


def watch_memory_pressure() -> tuple[PsiWatch, str]:
    """The kernel's trigger where it takes one, else the poller; and which, and why."""
    try:
        return PsiTrigger(), "kernel trigger (some 100 ms in 1 s)"
    except OSError as e:
        refused = e.strerror
    return PsiPoller(), (f"polled every {POLL_PERIOD * 1000:.0f} ms (the kernel refused a "
                         f"trigger: {refused})")


def probe() -> str:
    """For doctor: how memory pressure would be watched here."""
    try:
        w, how = watch_memory_pressure()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    w.release()
    return how
