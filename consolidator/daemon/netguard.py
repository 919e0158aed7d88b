"""The network guard's watch: the instance's nftables tables stay as loaded.

The guard sleeps on a netlink socket joined to the fabric netns's nftables group
(:class:`consolidator.net.nft.Changes`): any committed change there wakes it at once, and
it compares the instance's tables with what was loaded (the ruleset generation first, so
its own loads cost one round trip) and loads them again if one was removed or changed.
So a ``nft flush ruleset``, a firewall reload or a hand edit is undone within
milliseconds, and the log and ``status`` say it happened; an idle host costs nothing.
Every ``FULL_S`` the tables are compared whatever the generation says. Where the group
cannot be joined, the generation is polled each ``POLL_S`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from ..net import netns as ns
from ..net import nft
from .lifecycle import Lifecycle

log = structlog.get_logger("netguard")

POLL_S = 1.0         # without change notifications: how often the generation is read
FULL_S = 300.0       # a comparison made whatever the generation says


class NetGuard:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.restores = 0
        self.last_restore: dict[str, Any] | None = None
        self.error: str | None = None
        self.how = "starting"
        self.checks = 0               # comparisons made (tests: an idle host makes none)

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        changes: nft.Changes | None = None
        watched: Any = None               # the fabric listened to (None: none yet)
        last_full = time.monotonic()
        try:
            while True:
                ex = self.lifecycle.executor
                fabric = ex.fabric if ex is not None else None
                if fabric is not watched:
                    if changes is not None:
                        loop.remove_reader(changes.fileno())
                        changes.close()
                        changes = None
                    watched = fabric
                    if fabric is not None:
                        changes = self._listen(fabric.netns)
                        if changes is not None:
                            loop.add_reader(changes.fileno(), woken.set)
                            woken.set()       # what changed before it listened is checked
                        elif fabric.netns is not None and not ns.exists(fabric.netns):
                            watched = None    # the netns is not made yet: listen later
                wait = POLL_S if changes is None else 5.0   # 5 s: to follow a new fabric
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), wait)
                woken.clear()
                if ex is None or self.lifecycle.executor is not ex:
                    continue
                force = time.monotonic() - last_full >= FULL_S
                if changes is not None:
                    if not changes.drain() and not force:
                        continue
                elif not force and not ex.fabric.stale():
                    continue
                if force:
                    last_full = time.monotonic()
                await self._check(ex, force)
        finally:
            if changes is not None:
                loop.remove_reader(changes.fileno())
                changes.close()

    def _listen(self, netns: str | None) -> nft.Changes | None:
        if netns is not None and not ns.exists(netns):
            return None
        try:
            changes = nft.Changes(netns)
        except OSError as e:
            how = f"polling the generation every {POLL_S:g} s"
            if self.how != how:
                log.warning("netguard.no_notifications", error=e.strerror or str(e), how=how)
            self.how = how
            return None
        self.how = "change notifications"
        return changes

    async def _check(self, ex: Any, force: bool) -> None:
        self.checks += 1
        try:
            found = await asyncio.to_thread(ex.fabric.check, force)
        except Exception as e:  # noqa: BLE001 - reported, and tried again next change
            if self.error is None:
                log.error("netguard.check_failed", error=f"{type(e).__name__}: {e}")
            self.error = f"{type(e).__name__}: {e}"
            return
        self.error = None
        if found:
            self.restores += 1
            self.last_restore = {"t": time.time(), "tables": found}
            log.warning("netguard.restored", tables=found,
                        note="the instance's nftables tables were removed or changed "
                             "by someone else; loaded again")

    def state(self) -> dict[str, Any]:
        return {"restores": self.restores, "last_restore": self.last_restore,
                "error": self.error, "how": self.how, "checks": self.checks}
