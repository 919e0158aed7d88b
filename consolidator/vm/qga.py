"""Client of the QEMU guest agent (``qemu-ga``, virtio-serial port ``org.qemu.guest_agent.0``).

The protocol is QMP's JSON without a greeting. The agent may have been talking to an
earlier client, or may restart inside the guest, so each connection first sends
``guest-sync-delimited`` with a fresh id: the agent answers with a 0xFF byte and then
the id, and everything before the 0xFF (stale answers) is dropped. Only one client can
hold the port at a time; the supervisor connects per request and does not hold it.

Every value that comes back is guest output: :func:`parse_interfaces` keeps only what
parses as addresses and names, bounded in number and length.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import time
from typing import Any

from ..errors import AgentError
from ..files import unix_address

PORT_NAME = "org.qemu.guest_agent.0"
MAX_REPLY = 1 << 20
MAX_INTERFACES = 32


class GuestAgent:
    """One request-at-a-time client over the agent's unix socket (held by QEMU)."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        self._lock = asyncio.Lock()

    async def execute(self, command: str, args: dict[str, Any] | None = None, *,
                      timeout: float = 5.0, reply: bool = True) -> Any:
        """Run ``command``; its ``return`` value. ``reply=False`` for commands the agent
        does not answer on success (guest-shutdown)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                with unix_address(self.path) as addr:
                    r, w = await asyncio.wait_for(asyncio.open_unix_connection(
                        addr, limit=MAX_REPLY), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise AgentError(f"{self.name}: cannot reach the guest agent: {e}") from None
            try:
                await self._sync(r, w, deadline)
                msg: dict[str, Any] = {"execute": command}
                if args:
                    msg["arguments"] = args
                w.write(json.dumps(msg).encode() + b"\n")
                await w.drain()
                if not reply:
                    return None
                answer = await self._read(r, deadline)
                if "error" in answer:
                    err = answer["error"]
                    raise AgentError(f"{self.name}: {command}: {err.get('desc', err)}")
                return answer.get("return")
            finally:
                w.close()

    async def _sync(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    deadline: float) -> None:
        sync_id = random.randrange(1, 1 << 31)
        w.write(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                      "arguments": {"id": sync_id}}).encode() + b"\n")
        await w.drain()
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(r.readuntil(b"\xff"), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise AgentError(f"{self.name}: the guest agent does not answer",
                                 timeout=True) from None
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
                raise AgentError(f"{self.name}: guest agent connection lost: {e}") from None
            answer = await self._read(r, deadline)
            if answer.get("return") == sync_id:
                return

    async def _read(self, r: asyncio.StreamReader, deadline: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(r.readline(), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise AgentError(f"{self.name}: the guest agent does not answer",
                             timeout=True) from None
        except (ValueError, OSError) as e:
            raise AgentError(f"{self.name}: guest agent reply unreadable: {e}") from None
        try:
            answer = json.loads(line.lstrip(b"\xff"))
        except ValueError:
            raise AgentError(f"{self.name}: guest agent sent no JSON") from None
        if not isinstance(answer, dict):
            raise AgentError(f"{self.name}: guest agent sent no JSON object")
        return answer

    async def ping(self, timeout: float = 2.0) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def wait(self, timeout: float, alive: Any = lambda: True) -> None:
        """Until the agent answers a ping (or ``timeout``; or ``alive()`` turns false)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: AgentError | None = None
        while loop.time() < deadline and alive():
            try:
                await self.ping(timeout=min(2.0, max(0.1, deadline - loop.time())))
                return
            except AgentError as e:
                last = e
                await asyncio.sleep(0.25)
        raise last or AgentError(f"{self.name}: the guest agent does not answer", timeout=True)

    async def interfaces(self) -> list[dict[str, Any]]:
        return parse_interfaces(await self.execute("guest-network-get-interfaces"))

    async def shutdown(self, mode: str = "powerdown") -> None:
        await self.execute("guest-shutdown", {"mode": mode}, reply=False)

    async def set_time(self, ns: int | None = None) -> None:
        await self.execute("guest-set-time", {"time": ns if ns is not None
                                              else time.time_ns()})

    async def info(self) -> dict[str, Any]:
        ret = await self.execute("guest-get-osinfo")
        return {k: str(v)[:128] for k, v in (ret or {}).items()
                if k in ("id", "name", "pretty-name", "version", "kernel-release")}

    async def run(self, argv: list[str], *, timeout: float = 60.0,
                  max_output: int = 1 << 20) -> tuple[int, str]:
        """Run ``argv`` in the guest (guest-exec) and wait: (exit code, stdout+stderr)."""
        ret = await self.execute("guest-exec", {"path": argv[0], "arg": argv[1:],
                                                "capture-output": True})
        pid = int(ret["pid"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            st = await self.execute("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = b"".join(base64.b64decode(st.get(k, "") or "")
                               for k in ("out-data", "err-data"))
                return int(st.get("exitcode", -1)), out[:max_output].decode(errors="replace")
            if loop.time() > deadline:
                raise AgentError(f"{self.name}: {argv[0]} still running after {timeout:g}s",
                                 timeout=True)
            await asyncio.sleep(0.2)

    async def hostname(self) -> str:
        return str((await self.execute("guest-get-host-name")).get("host-name", ""))[:255]

    async def fsfreeze(self) -> int:
        return int(await self.execute("guest-fsfreeze-freeze", timeout=30.0))

    async def fsthaw(self) -> int:
        return int(await self.execute("guest-fsfreeze-thaw", timeout=30.0))


def parse_interfaces(ret: Any) -> list[dict[str, Any]]:
    """Pure: the agent's interfaces, as {name, mac, addresses: ["10.0.0.5/24", ...]},
    keeping only well-formed values (this is guest output)."""
    out: list[dict[str, Any]] = []
    if not isinstance(ret, list):
        return out
    for itf in ret[:MAX_INTERFACES]:
        if not isinstance(itf, dict):
            continue
        name = str(itf.get("name", ""))[:32]
        if not name or name == "lo" or not name.isprintable():
            continue
        mac = str(itf.get("hardware-address", ""))[:17].lower()
        addrs = []
        for a in (itf.get("ip-addresses") or [])[:16]:
            if not isinstance(a, dict):
                continue
            try:
                iface = ipaddress.ip_interface(f"{a.get('ip-address')}/{int(a.get('prefix'))}")
            except (ValueError, TypeError):
                continue
            if not iface.ip.is_link_local:
                addrs.append(str(iface))
        out.append({"name": name, "mac": mac, "addresses": addrs})
    return out
