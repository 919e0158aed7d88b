"""Interactive serial console and log printing (no supervisor needed for either)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import sys
import termios
import time
import tty
from datetime import datetime
from pathlib import Path

from typing import Any, Callable

from rich.console import Console
from rich.text import Text

from ..daemon.guestlog import last_entries, read_entries
from ..files import unix_address

DETACH = b"\x1d"   # Ctrl-]


def attach(sock_path: Path, name: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix_address(sock_path) as addr:
        s.connect(addr)
    try:
        if sys.stdin.isatty():
            _interactive(s, name)
        else:
            _pipe(s)
    finally:
        s.close()


def _interactive(s: socket.socket, name: str) -> None:
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    sys.stdout.write(f"connected to {name}'s serial console; Ctrl-] detaches\r\n")
    sys.stdout.flush()
    s.sendall(b"\r")
    tty.setraw(fd)
    try:
        while True:
            r, _, _ = select.select([fd, s], [], [])
            if fd in r:
                data = os.read(fd, 1024)
                if not data or DETACH in data:
                    data = data.split(DETACH)[0]
                    if data:
                        s.sendall(data)
                    break
                s.sendall(data)
            if s in r:
                data = s.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        sys.stdout.write("\r\ndetached\r\n")


def _pipe(s: socket.socket, idle: float = 1.5) -> None:
    """Send stdin, then print what the console says until it is quiet for ``idle`` s."""
    s.sendall(sys.stdin.buffer.read())
    last = time.monotonic()
    while time.monotonic() - last < idle:
        r, _, _ = select.select([s], [], [], 0.1)
        if r:
            data = s.recv(4096)
            if not data:
                break
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            last = time.monotonic()


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def shown(text: object) -> str:
    """Guest output made safe for a terminal: every control character (escape sequences
    that clear the screen, or OSC 52 that writes the clipboard) as visible text, ``^[``
    for ESC. Only the interactive ``console`` passes a guest's bytes through."""
    def one(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"^{chr(c + 64)}" if c < 0x20 else "^?" if c == 0x7f else f"<{c:02x}>"
    return _CONTROL.sub(one, str(text))


def _format(entry: dict) -> Text:
    t = datetime.fromtimestamp(entry.get("t", 0)).strftime("%H:%M:%S.%f")[:-3]
    if entry.get("kind") == "serial":
        line = Text(f"{t} ", style="dim")
        line.append(shown(entry.get("line", "")))
        return line
    fields = {k: v for k, v in entry.items() if k not in ("t", "kind", "event", "o")}
    line = Text(f"{t} ", style="dim")
    line.append(f"[{shown(entry.get('event'))}]", style="bold cyan")
    for k, v in fields.items():
        if v is None:
            continue
        if isinstance(v, str) and "\n" in v:       # a serial tail: guest output again
            line.append(f" {shown(k)}:\n    " + "\n    ".join(
                shown(x) for x in v.split("\n")), style="yellow")
        else:
            line.append(f" {shown(k)}={shown(v)}", style="cyan")
    return line


def print_logs(path: Path, console: Console, *, follow: bool, lines: int) -> None:
    """From the state dir (root), following by polling the file."""
    entries, offset = last_entries(path, lines)
    for e in entries:
        console.print(_format(e))
    while follow:
        time.sleep(0.2)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size < offset:          # rotated
            offset = 0
        new, offset = read_entries(path, offset)
        for e in new:
            console.print(_format(e))


def print_logs_remote(fetch: Callable[[int, int | None], dict[str, Any]], console: Console, *,
                      follow: bool, lines: int) -> None:
    """Through the supervisor (a member of host.api_group): the same, a call at a time."""
    res = fetch(lines, None)
    for e in res["entries"]:
        console.print(_format(e))
    while follow:
        time.sleep(0.5)
        res = fetch(0, res["offset"])
        for e in res["entries"]:
            console.print(_format(e))


def forward_vnc(sock: Path, name: str, port: int, say: Callable[[str], None]) -> None:
    """Serve 127.0.0.1:``port`` until interrupted; each connection is piped to ``sock``."""
    import asyncio

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            with unix_address(sock) as addr:
                gr, gw = await asyncio.open_unix_connection(addr)
        except OSError as e:
            say(f"vnc {name}: cannot reach the guest's screen: {e}")
            w.close()
            return
        await asyncio.gather(pipe(r, gw), pipe(gr, w))

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", port)
        bound = server.sockets[0].getsockname()[1]
        say(f"vnc {name}: 127.0.0.1:{bound} (display :{bound - 5900}); Ctrl-C ends"
            if bound >= 5900 else f"vnc {name}: 127.0.0.1:{bound}; Ctrl-C ends")
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
