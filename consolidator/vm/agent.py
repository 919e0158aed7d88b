"""Client of the tiny image's guest agent (virtio-serial port org.consolidator.agent).

Line protocol: the host sends ``ID COMMAND ARGS``; the guest answers ``ID ok PAYLOAD``
or ``ID err MESSAGE``. On each connection the guest first says ``0 ready UPTIME``.
Stale lines (answers to requests that timed out) are skipped by ID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools

from ..errors import AgentError
from ..files import unix_address


def parse_kv(payload: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in payload.split() if "=" in p)


class Agent:
    def __init__(self, name: str) -> None:
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect and wait for the guest's ``ready`` greeting."""
        with unix_address(path) as addr:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(addr), timeout)
        line = await self._readline(timeout)
        parts = line.split()
        if parts[:2] != ["0", "ready"]:
            raise AgentError(f"{self.name}: unexpected agent greeting {line!r}")

    async def _readline(self, timeout: float) -> str:
        assert self._reader is not None
        try:
            raw = await asyncio.wait_for(self._reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise AgentError(f"{self.name}: agent did not answer within {timeout:g}s",
                             timeout=True) from None
        if not raw:
            raise AgentError(f"{self.name}: agent connection closed")
        return raw.decode("utf-8", "replace").strip()

    async def request(self, command: str, arg: str = "", timeout: float = 10.0) -> str:
        if self._writer is None:
            raise AgentError(f"{self.name}: agent not connected")
        async with self._lock:
            rid = str(next(self._ids))
            self._writer.write(f"{rid} {command} {arg}".rstrip().encode() + b"\n")
            await self._writer.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                line = await self._readline(max(0.01, deadline - loop.time()))
                got, _, rest = line.partition(" ")
                if got != rid:
                    continue
                status, _, payload = rest.partition(" ")
                if status == "ok":
                    return payload
                raise AgentError(f"{self.name}: {command}: {payload}")

    async def ping(self) -> float:
        return float((await self.request("ping")).split()[1])

    async def meminfo(self) -> dict[str, int]:
        """/proc/meminfo of the guest, in bytes."""
        return {k: int(v) * 1024 for k, v in parse_kv(await self.request("meminfo")).items()}

    async def status(self) -> dict[str, str]:
        return parse_kv(await self.request("status"))

    async def cpu(self, percent: int) -> None:
        await self.request("cpu", str(int(percent)))

    async def mem(self, mib: int, timeout: float = 60.0) -> int:
        return int(parse_kv(await self.request("mem", str(int(mib)), timeout))["mem_mib"])

    async def sh(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        kv = parse_kv(await self.request("sh", command, timeout))
        return int(kv["rc"]), base64.b64decode(kv.get("out", "")).decode("utf-8", "replace")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None
