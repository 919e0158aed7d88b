"""The network guard's watch: the instance's nftables tables stay as loaded.

Each second the ruleset generation of the fabric netns is read (one netlink round trip);
only when it moved are the tables listed and compared, and a table that was removed or
changed is loaded again at once. Every 30 s they are compared whatever the generation
says. So a ``nft flush ruleset``, a firewall reload or a hand edit leaves the guests
unguarded for about a second, and the log and ``status`` say it happened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from .lifecycle import Lifecycle

log = structlog.get_logger("netguard")

POLL_S = 1.0
FULL_EVERY = 30      # polls between two comparisons made whatever the generation says


class NetGuard:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.restores = 0
        self.last_restore: dict[str, Any] | None = None
        self.error: str | None = None

    async def watch(self) -> None:
        polls = 0
        while True:
            await asyncio.sleep(POLL_S)
            ex = self.lifecycle.executor
            if ex is None:
                continue
            polls += 1
            force = polls % FULL_EVERY == 0
            if not force and not ex.fabric.stale():
                continue
            try:
                found = await asyncio.to_thread(ex.fabric.check, force)
            except Exception as e:  # noqa: BLE001 - reported, and tried again next poll
                if self.error is None:
                    log.error("netguard.check_failed", error=f"{type(e).__name__}: {e}")
                self.error = f"{type(e).__name__}: {e}"
                continue
            self.error = None
            if found:
                self.restores += 1
                self.last_restore = {"t": time.time(), "tables": found}
                log.warning("netguard.restored", tables=found,
                            note="the instance's nftables tables were removed or changed "
                                 "by someone else; loaded again")

    def state(self) -> dict[str, Any]:
        return {"restores": self.restores, "last_restore": self.last_restore,
                "error": self.error}
