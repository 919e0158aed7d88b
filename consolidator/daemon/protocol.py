"""The supervisor's wire protocol: JSON lines over a unix socket (0600, in a 0700 directory),
and the synchronous client the CLI uses.

Each message is one JSON object on one line. The client sends requests; for each,
the server sends zero or more events, then exactly one result or error, all tagged
with the request's id::

    -> {"id": 1, "op": "status", "args": {}}
    <- {"id": 1, "result": {...}}

    -> {"id": 2, "op": "apply-begin", "args": {"check_index": null}}
    <- {"id": 2, "result": {"index": 7, "observed": {...}}}        (the apply lock is held)
    -> {"id": 3, "op": "apply-commit", "args": {"index": 7, "plan_digest": "...",
                                                "fleet": {...}, ...}}
    <- {"id": 3, "event": {"guest": "web", "phase": "network", "t": 0.01}}
    <- {"id": 3, "result": {"ok": true, "failures": []}}

    <- {"id": 4, "error": {"type": "ConflictError", "message": "...", "hint": "...",
                           "exit_code": 5, "fields": {}}}

An error is :meth:`consolidator.errors.ConsolidatorError.to_wire`; the client raises it
again as the same class with the same fields (:func:`consolidator.errors.from_wire`), so
the CLI's exit code is the one the daemon meant. The server side is
:mod:`consolidator.daemon.server`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConsolidatorError, SupervisorError, SupervisorUnreachable, from_wire
from ..files import unix_address

if TYPE_CHECKING:
    import subprocess

PROTOCOL = 2
MAX_LINE = 64 << 20


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


def error_message(rid: int, e: BaseException) -> dict[str, Any]:
    if isinstance(e, ConsolidatorError):
        return {"id": rid, "error": e.to_wire()}
    return {"id": rid, "error": {"type": "InternalError", "message": f"{type(e).__name__}: {e}",
                                 "hint": "see the supervisor log", "exit_code": 1,
                                 "fields": {}}}


def socket_path(state_root: Path) -> Path:
    return Path(state_root) / "supervisor" / "api.sock"


class Client:
    """A synchronous client (for the CLI). One connection = one session."""

    def __init__(self, path: Path, timeout: float = 600.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            with unix_address(self.path) as addr:
                self.sock.connect(addr)
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def send(self, op: str, **args: Any) -> int:
        """Send a request without waiting for its reply; returns its id."""
        rid = next(self._ids)
        self.sock.sendall(encode({"id": rid, "op": op, "args": args}))
        return rid

    def call(self, op: str, on_event: Callable[[dict[str, Any]], None] | None = None,
             **args: Any) -> Any:
        rid = self.send(op, **args)
        while True:
            line = self._file.readline(MAX_LINE)
            if not line:
                raise SupervisorError("the supervisor closed the connection",
                                      hint="see its log: <state>/supervisor/log.jsonl")
            msg = json.loads(line)
            if msg.get("id") != rid and not (msg.get("id") == 0 and "error" in msg):
                continue            # (a request refused before its id was read: id 0)
            if "event" in msg:
                if on_event:
                    on_event(msg["event"])
                continue
            if "error" in msg:
                raise from_wire(msg["error"])
            return msg.get("result")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_early(state_root: Path) -> subprocess.Popen[bytes] | None:
    """Start the supervisor now when none answers, and return without waiting for it:
    a cold ``apply`` validates its inventory while the supervisor imports and recovers,
    on another core, instead of one after the other. :func:`connect` then waits for it."""
    try:
        Client(socket_path(state_root)).close()
        return None
    except OSError:
        pass
    child = start_detached(state_root)
    from ..state import StateDir           # see connect()
    StateDir(state_root).ensure()          # a state dir it would refuse: say so here
    return child


def stop_early(child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a supervisor :func:`start_early` started, when the command it was started for
    failed before using it (an invalid inventory): a failed apply leaves no daemon behind
    where none ran. SIGTERM: it shuts down cleanly, or dies before it made anything."""
    import subprocess
    child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def connect(state_root: Path, *, start: bool = True, wait: float = 15.0,
            child: subprocess.Popen[bytes] | None = None) -> Client:
    """Connect to the state dir's supervisor, starting it detached when it is not running
    (or waiting for ``child``, one :func:`start_early` started). Without ``start``, no
    supervisor is :class:`SupervisorUnreachable`."""
    path = socket_path(state_root)
    try:
        return Client(path)
    except OSError:
        if not start:
            raise SupervisorUnreachable(f"no supervisor is running for {state_root}",
                                        hint="consolidator apply (or supervise) starts one")
    if child is None:
        # Imported here, on the path that starts a supervisor only: the state module
        # pulls in the inventory's schema, which a query to a running supervisor must
        # not pay for.
        from ..state import StateDir
        StateDir(state_root).ensure()      # a state dir it would refuse: say so here
        child = start_detached(state_root)
    deadline = time.monotonic() + wait
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            return Client(path)
        except OSError as e:
            last = e
        if child.poll() is not None:       # it died: its last words, not a timeout
            with contextlib.suppress(OSError):
                return Client(path)        # another one won the start and runs: fine
            raise SupervisorError(f"the supervisor exited at once (status {child.returncode})"
                                  f": {_last_error(state_root)}",
                                  hint=f"see {Path(state_root) / 'supervisor' / 'log.jsonl'}")
        time.sleep(0.02)
    raise SupervisorError(f"the supervisor did not come up within {wait:g}s ({last})",
                          hint=f"see {Path(state_root) / 'supervisor' / 'log.jsonl'}")


def _last_error(state_root: Path) -> str:
    try:
        lines = (Path(state_root) / "supervisor" / "log.jsonl").read_text().splitlines()
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "no log"


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not our child) has exited; False after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)      # Linux 5.3 and Python 3.9: no cffi on this path
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def start_detached(state_root: Path) -> subprocess.Popen[bytes]:
    """Start the supervisor (``python -m consolidator.daemon``, the same daemon as
    ``consolidator supervise``) in its own session, logging JSON to the state dir."""
    import subprocess                  # the start path only: not a query's import
    sup = Path(state_root) / "supervisor"
    sup.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = os.fdopen(os.open(sup / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                            os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "ab")
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "consolidator.daemon", "--state-dir", str(state_root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True)
    finally:
        log.close()
    return p
