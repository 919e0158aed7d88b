"""The supervisor's API: JSON lines over a unix socket (0600, in a 0700 directory).

Each message is one JSON object on one line. The client sends requests; for each,
the server sends zero or more events, then exactly one result or error, all tagged
with the request's id::

    -> {"id": 1, "op": "status", "args": {}}
    <- {"id": 1, "result": {...}}

    -> {"id": 2, "op": "apply-begin", "args": {"check_index": null}}
    <- {"id": 2, "result": {"index": 7, "observed": {...}}}        (the apply lock is held)
    -> {"id": 3, "op": "apply-commit", "args": {"index": 7, "fleet": {...}, ...}}
    <- {"id": 3, "event": {"guest": "web", "phase": "network", "t": 0.01}}
    <- {"id": 3, "result": {"ok": true, "failures": []}}

    <- {"id": 4, "error": {"type": "ConflictError", "message": "...", "hint": "...",
                           "exit_code": 5}}

A connection is a session: ``apply-begin`` takes the apply lock for that connection
until it commits, aborts or closes, so concurrent applies are serialised. Operations:
``ping``, ``status``, ``observe``, ``apply-begin``, ``apply-commit``, ``apply-abort``,
``start``, ``stop``, ``restart``, ``agent``, ``destroy``, ``shutdown``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import errors as E

PROTOCOL = 1
MAX_LINE = 64 << 20


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


def error_message(rid: int, e: BaseException) -> dict[str, Any]:
    if isinstance(e, E.ConsolidatorError):
        err: dict[str, Any] = {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                               "exit_code": int(e.exit_code)}
        if isinstance(e, E.InventoryError):
            err["problems"] = [p.__dict__ for p in e.problems]
        return {"id": rid, "error": err}
    return {"id": rid, "error": {"type": "InternalError", "message": f"{type(e).__name__}: {e}",
                                 "hint": "see the supervisor log", "exit_code": 1}}


def raise_remote(err: dict[str, Any]) -> None:
    """Re-raise a server-side error as the same class of our error tree."""
    cls = getattr(E, err.get("type", ""), None)
    msg = err.get("message", "supervisor error")
    hint = err.get("hint")
    if cls is E.InventoryError:
        raise E.InventoryError([E.Problem(**p) for p in err.get("problems", [])])
    if isinstance(cls, type) and issubclass(cls, E.ConsolidatorError) and cls not in (
            E.InventoryError, E.NotYetImplemented, E.RunstateError, E.LaunchError,
            E.ReadyTimeout, E.ImageError, E.HostError, E.QMPError):
        raise cls(msg, hint=hint)
    exc = E.ConsolidatorError(msg, hint=hint)
    exc.exit_code = E.ExitCode(err.get("exit_code", 1))
    raise exc


class Client:
    """A synchronous client (for the CLI). One connection = one session."""

    def __init__(self, path: Path, timeout: float = 600.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def call(self, op: str, on_event: Callable[[dict[str, Any]], None] | None = None,
             **args: Any) -> Any:
        rid = next(self._ids)
        self.sock.sendall(encode({"id": rid, "op": op, "args": args}))
        while True:
            line = self._file.readline(MAX_LINE)
            if not line:
                raise E.SupervisorError("the supervisor closed the connection",
                                        hint="see its log: <state>/supervisor/log.jsonl")
            msg = json.loads(line)
            if msg.get("id") != rid:
                continue
            if "event" in msg:
                if on_event:
                    on_event(msg["event"])
                continue
            if "error" in msg:
                raise_remote(msg["error"])
            return msg.get("result")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def socket_path(state_root: Path) -> Path:
    return Path(state_root) / "supervisor" / "api.sock"


def connect(state_root: Path, *, start: bool = True, log_format: str = "json",
            wait: float = 15.0) -> Client:
    """Connect to the state dir's supervisor, starting it detached when it is not running."""
    path = socket_path(state_root)
    try:
        return Client(path)
    except OSError:
        if not start:
            raise E.SupervisorError(f"no supervisor is running for {state_root}",
                                    hint="consolidator apply (or supervise) starts one")
    start_detached(state_root)
    deadline = time.monotonic() + wait
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            return Client(path)
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise E.SupervisorError(f"the supervisor did not come up within {wait:g}s ({last})",
                            hint=f"see {Path(state_root) / 'supervisor' / 'log.jsonl'}")


def start_detached(state_root: Path) -> int:
    """Start ``consolidator supervise`` in its own session, logging JSON to the state dir."""
    sup = Path(state_root) / "supervisor"
    sup.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = open(sup / "log.jsonl", "ab")
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "consolidator", "--state-dir", str(state_root),
             "--log-format", "json", "supervise"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, env={**os.environ, "CONSOLIDATOR_DETACHED": "1"})
    finally:
        log.close()
    return p.pid
