"""Background tasks the daemon keeps a hold of, so that it can cancel them when it stops."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        t.set_name(name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()
