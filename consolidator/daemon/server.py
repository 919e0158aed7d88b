"""The API server: JSON lines on the state dir's unix socket (wire format: :mod:`.protocol`).

A connection is a session: ``apply-begin`` takes the apply lock for that connection
until it commits, aborts or closes; a second ``apply-begin`` meanwhile is refused at once
(exit 5, "apply in progress since ..."). Operations:
``ping``, ``status``, ``observe``, ``apply-begin``, ``apply-commit``, ``apply-abort``,
``start``, ``stop``, ``restart``, ``agent``, ``destroy``, ``shutdown``, ``snapshot-create``,
``snapshot-list``, ``snapshot-revert``, ``snapshot-rm``, and the test hook ``rebalancer``.

``apply-commit`` carries the inventory's text and path, the state index the plan was made
at, and the plan's digest. The server validates the inventory itself, as strictly as
``validate`` does (a fleet made by hand and sent over the socket would otherwise reach
QEMU's argv unchecked), plans again from its own state and executes only a plan with that
digest: what the operator was shown is what runs, or the commit is refused (exit 5).

What comes in is checked before it is used. The peer's credentials (SO_PEERCRED): root may
do everything; a member of ``host.api_group`` may only read (``ping``, ``status``,
``logs``, ``report``); anyone else is refused. A message over 1 MiB, malformed JSON, a
non-object, an unknown operation or arguments of the wrong shape get an error and the
connection is closed; at most 32 connections at once, and one idle for two minutes is
closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from ..errors import AccessDenied, ConflictError, ConsolidatorError, UsageError
from ..hostfacts import HostFacts
from ..model import GuestState, parse_fleet
from ..plan import plan as make_plan
from ..sched.rebalancer import Rebalancer
from . import protocol
from .applier import Applier
from .backups import Backups
from .lifecycle import EmitFn, Lifecycle
from .recovery import Snapshots
from .restore import Restorer
from .runtime import Runtime

log = structlog.get_logger("supervisor")
MAX_MESSAGE = 1 << 20
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 120.0
READ_OPS = {"ping", "status", "logs", "report", "snapshot-list"}
_OPT, _REQ = False, True
#: every operation's arguments: name -> (types, required)
ARGS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {}, "observe": {}, "apply-abort": {}, "shutdown": {},
    "status": {"explain": ((bool,), _OPT)},
    "rebalancer": {"action": ((str,), _OPT)},
    "apply-begin": {"check_index": ((int, type(None)), _OPT)},
    "apply-commit": {"index": ((int,), _REQ), "plan_digest": ((str,), _REQ),
                     "inventory": ((str,), _REQ), "inventory_path": ((str,), _REQ),
                     "prune": ((bool,), _OPT), "purge": ((bool,), _OPT),
                     "allow_restart": ((bool,), _OPT)},
    "start": {"name": ((str,), _REQ)}, "stop": {"name": ((str,), _REQ)},
    "restart": {"name": ((str,), _REQ)},
    "agent": {"name": ((str,), _REQ), "command": ((str,), _REQ), "arg": ((str,), _OPT),
              "timeout": ((int, float), _OPT)},
    "destroy": {"purge": ((bool,), _OPT)},
    "screenshot": {"name": ((str,), _REQ)},
    "logs": {"name": ((str,), _REQ), "lines": ((int,), _OPT), "offset": ((int,), _OPT)},
    "snapshot-create": {"names": ((list,), _REQ), "memory": ((bool,), _OPT),
                        "tag": ((str,), _OPT)},
    "snapshot-list": {"name": ((str,), _OPT)},
    "snapshot-revert": {"name": ((str,), _REQ), "tag": ((str,), _REQ)},
    "snapshot-rm": {"name": ((str,), _REQ), "tag": ((str,), _REQ)},
    "backup": {"names": ((list,), _REQ), "full": ((bool,), _OPT)},
    "backup-prune": {"names": ((list,), _REQ)},
    "restore": {"names": ((list,), _OPT), "all": ((bool,), _OPT), "backup": ((str,), _OPT),
                "as": ((str,), _OPT), "from": ((str,), _OPT), "yes": ((bool,), _OPT)},
    "report": {"window": ((str,), _OPT), "shapes": ((list,), _OPT), "tiered": ((bool,), _OPT),
               "headroom": ((int, float), _OPT)},
}


def check_message(line: bytes) -> tuple[int, str, dict[str, Any]]:
    """(id, op, args) of a request line, or a UsageError saying what is wrong with it
    (the server answers it, then hangs up)."""
    try:
        msg = json.loads(line)
    except ValueError:
        raise UsageError("malformed request: not JSON") from None
    if not isinstance(msg, dict):
        raise UsageError("malformed request: not a JSON object")
    rid, op, args = msg.get("id", 0), msg.get("op"), msg.get("args", {})
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise UsageError("malformed request: id is not an integer")
    if op not in ARGS:
        raise UsageError(f"unknown operation {op!r}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UsageError(f"{op}: args is not an object")
    spec = ARGS[op]
    # null for an optional argument is the argument not given (`snapshot create` without
    # --tag sent "tag": null, and was refused: no default tag was ever made)
    args = {k: v for k, v in args.items() if not (v is None and k in spec and not spec[k][1])}
    for k, v in args.items():
        if k not in spec:
            raise UsageError(f"{op}: unknown argument {k!r}")
        types, _ = spec[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise UsageError(f"{op}: {k} has the wrong type")
    missing = [k for k, (_, req) in spec.items() if req and k not in args]
    if missing:
        raise UsageError(f"{op}: missing {', '.join(missing)}")
    return rid, op, args


def _names(names: list[Any], op: str) -> list[str]:
    """A list of guest names from a request: strings, each once, in order."""
    if not all(isinstance(n, str) for n in names):
        raise UsageError(f"{op}: names must be strings")
    return list(dict.fromkeys(names))


def peer(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of the unix socket."""
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    return groups


class Api:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle, applier: Applier, *,
                 status: Callable[[bool], dict[str, Any]],
                 logs: Callable[[str, int, int | None], Awaitable[dict[str, Any]]],
                 report: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                 destroy: Callable[[bool], Awaitable[dict[str, Any]]],
                 rebalancer: Callable[[], Rebalancer | None],
                 record_ms: Callable[[], list[float]],
                 after_apply: Callable[[], None],
                 stopping: asyncio.Event, backups: Backups) -> None:
        self.runtime = runtime
        self.backups = backups
        self.restorer = Restorer(runtime, lifecycle, applier, backups, after_apply)
        self.snapshots = Snapshots(runtime, lifecycle)
        self.lifecycle = lifecycle
        self.applier = applier
        self.status = status
        self.destroy = destroy
        self.rebalancer = rebalancer
        self.record_ms = record_ms
        self.after_apply = after_apply
        self.logs = logs
        self.report = report
        self.stopping = stopping
        self.apply_lock = asyncio.Lock()
        self.apply_by = "?"                    # who holds the apply lock, and since when
        self.connections = 0

    def _reader_group(self) -> int | None:
        name = self.runtime.fleet.host.api_group if self.runtime.fleet else None
        if not name:
            return None
        with contextlib.suppress(KeyError):
            return grp.getgrnam(name).gr_gid
        return None

    def _may(self, op: str, pid: int, uid: int, gid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True
        group = self._reader_group()
        return op in READ_OPS and group is not None and group in peer_groups(pid, gid)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: dict[str, Any] = {"locked": False}
        self.connections += 1
        try:
            pid, uid, gid = peer(writer)
            session["peer"] = f"pid {pid}, uid {uid}"
            if self.connections > MAX_CONNECTIONS:
                await self._refuse(writer, 0, ConflictError(
                    f"{MAX_CONNECTIONS} connections are open: try again"))
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._refuse(writer, 0, UsageError(
                        f"message larger than {MAX_MESSAGE >> 20} MiB"))
                    return
                if not line:
                    return
                try:
                    rid, op, args = check_message(line)
                except UsageError as e:
                    await self._refuse(writer, 0, e)
                    return
                if not self._may(op, pid, uid, gid):
                    await self._refuse(writer, rid, AccessDenied(
                        f"{op}: not for uid {uid}", hint="root may do everything; members "
                        "of host.api_group may read status, logs and report"))
                    return

                def emit(ev: dict[str, Any], rid: int = rid) -> None:
                    with contextlib.suppress(Exception):
                        writer.write(protocol.encode({"id": rid, "event": ev}))

                try:
                    result = await self.dispatch(op, args, session, emit)
                    writer.write(protocol.encode({"id": rid, "result": result}))
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    if not isinstance(e, ConsolidatorError):
                        log.exception("api.internal_error", op=op)
                    writer.write(protocol.encode(protocol.error_message(rid, e)))
                await writer.drain()
                if op in ("shutdown", "destroy"):
                    self.stopping.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # the supervisor stops with this connection open: end quietly. Re-raised, it
            # reaches asyncio's StreamReaderProtocol callback, which logs a raw traceback
            # (to stderr, which is the JSON log) for every connection open at a stop.
            return
        finally:
            self.connections -= 1
            if session["locked"]:
                self._release()
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, rid: int, e: ConsolidatorError) -> None:
        log.warning("api.refused", error=e.message)
        with contextlib.suppress(Exception):
            writer.write(protocol.encode(protocol.error_message(rid, e)))
            await writer.drain()

    def _release(self) -> None:
        self.apply_lock.release()

    async def dispatch(self, op: str | None, args: dict[str, Any], session: dict[str, Any],
                       emit: EmitFn) -> Any:
        rt = self.runtime
        if op == "ping":
            return {"pid": os.getpid(), "protocol": protocol.PROTOCOL, "index": rt.index,
                    "instance": rt.fleet.instance if rt.fleet else None}
        if op == "status":
            return self.status(bool(args.get("explain")))
        if op == "logs":
            return await self.logs(args["name"], int(args.get("lines", 200)),
                                   args.get("offset"))
        if op == "report":
            return await self.report(args)
        if op == "rebalancer":            # test hook: stop the loop, the watchdog stays
            rb = self.rebalancer()
            if rb is None:
                raise ConflictError("the rebalancer is not running")
            if args.get("action") == "stop-loop":
                rb.stop_loop()
            return {"ticks": rb.ticks,
                    "tick_cpu_ms": [round(x * 1000, 3) for x in rb.tick_cpu_s],
                    "record_ms": [round(x, 3) for x in self.record_ms()],
                    "loop_alive": rb.loop_alive}
        if op == "observe":
            return rt.observed().to_json()
        if op == "apply-begin":
            if not session["locked"]:
                if self.apply_lock.locked():
                    raise ConflictError(f"an apply, destroy or guest operation is in "
                                        f"progress since {self.apply_by}",
                                        hint="wait for it, then apply again")
                await self.apply_lock.acquire()
                session["locked"] = True
                self.apply_by = (time.strftime("%H:%M:%S") + f" ({session['peer']})")
            ci = args.get("check_index")
            if ci is not None and int(ci) != rt.index:
                raise ConflictError(f"the plan is stale: it was made at state index {ci}, "
                                    f"the state is now at {rt.index}",
                                    hint="run plan again, then apply with the new index")
            return {"index": rt.index, "observed": rt.observed().to_json()}
        if op == "apply-commit":
            if not session["locked"]:
                raise UsageError("apply-commit without apply-begin")
            try:
                return await self._commit(args, emit)
            finally:
                self._release()
                session["locked"] = False
        if op == "apply-abort":
            if session["locked"]:
                self._release()
                session["locked"] = False
            return {"aborted": True}
        if op in ("start", "stop", "restart"):
            return await self._guest_op(op, args["name"], emit, session)
        if op == "agent":
            g = rt.get(args["name"])
            if g.guest is None or g.state is not GuestState.RUNNING:
                raise ConflictError(f"guest {g.name} is {g.state.value}, not running")
            agent = await g.guest.agent()
            return {"reply": await agent.request(args["command"], args.get("arg", ""),
                                                 float(args.get("timeout", 30)))}
        if op == "screenshot":
            g = rt.get(args["name"])
            if g.guest is None or g.state is not GuestState.RUNNING:
                raise ConflictError(f"guest {g.name} is {g.state.value}, not running")
            png = await g.guest.screenshot()
            return {"png": base64.b64encode(png).decode("ascii"), "bytes": len(png)}
        if op == "destroy":
            async with self.apply_lock:
                self.apply_by = time.strftime("%H:%M:%S") + f" ({session['peer']}, destroy)"
                return await self.destroy(bool(args.get("purge")))
        if op == "snapshot-list":
            return {"snapshots": await self.snapshots.list(args.get("name"))}
        if op in ("snapshot-create", "snapshot-revert", "snapshot-rm"):
            return await self._snapshot_op(op, args, emit, session)
        if op in ("backup", "backup-prune"):
            names = _names(args["names"], op)
            if op == "backup":
                return await self.backups.take(names, full=bool(args.get("full")), emit=emit)
            return await self.backups.prune(names)
        if op == "restore":
            return await self._restore(args, emit, session)
        if op == "shutdown":
            return {"stopping": True}
        raise UsageError(f"unknown operation {op!r}")

    async def _commit(self, args: dict[str, Any], emit: EmitFn) -> dict[str, Any]:
        rt = self.runtime
        if int(args["index"]) != rt.index:
            raise ConflictError(f"the fleet changed while the plan was shown (state index "
                                f"{args['index']} -> {rt.index})",
                                hint="run apply again to see the new plan")
        digest = args["plan_digest"]
        path = args["inventory_path"]
        if not os.path.isabs(path):
            raise UsageError("apply-commit: inventory_path must be absolute")
        desired = parse_fleet(args["inventory"], path, HostFacts.probe(),
                              base_dir=Path(path).parent, state_dir=rt.state.root)
        p = make_plan(desired, rt.observed(), prune=bool(args.get("prune")),
                      purge=bool(args.get("purge")),
                      allow_restart=bool(args.get("allow_restart")))
        if p.digest() != digest:
            raise ConflictError("the supervisor would not do what the plan shown said "
                                f"(plan {digest}, the supervisor's {p.digest()})",
                                hint="run apply again to see the plan it would run")
        result = await self.applier.apply(desired, args.get("inventory", ""), p,
                                          purge=bool(args.get("purge")), emit=emit,
                                          inventory_path=path)
        self.after_apply()
        return {**result, "status": self.status(False)}

    async def _snapshot_op(self, op: str, args: dict[str, Any], emit: EmitFn,
                           session: dict[str, Any]) -> dict[str, Any]:
        names = _names(args["names"], op) if op == "snapshot-create" else [args["name"]]
        guests = [self.runtime.get(n) for n in names]
        async with self.apply_lock, contextlib.AsyncExitStack() as held:
            self.apply_by = time.strftime("%H:%M:%S") + f" ({session['peer']}, {op})"
            for g in sorted(guests, key=lambda g: g.name):
                await held.enter_async_context(g.busy)
            if op == "snapshot-create":
                return await self.snapshots.create(names, memory=bool(args.get("memory")),
                                                   tag=args.get("tag"), emit=emit)
            if op == "snapshot-revert":
                return await self.snapshots.revert(args["name"], args["tag"], emit)
            return await self.snapshots.remove(args["name"], args["tag"])

    async def _restore(self, args: dict[str, Any], emit: EmitFn,
                       session: dict[str, Any]) -> dict[str, Any]:
        names = _names(args.get("names") or [], "restore")
        if bool(args.get("all")) == bool(names) or len(names) > 1:
            raise UsageError("restore: one guest, or --all")
        if args.get("all") and (args.get("backup") or args.get("as")):
            raise UsageError("restore --all takes each guest's newest backup: no --backup "
                             "or --as")
        if self.apply_lock.locked():
            raise ConflictError(f"an apply, destroy or guest operation is in progress since "
                                f"{self.apply_by}", hint="wait for it, then restore")
        async with self.apply_lock:
            self.apply_by = time.strftime("%H:%M:%S") + f" ({session['peer']}, restore)"
            if args.get("all"):
                return await self.restorer.fleet(from_dir=args.get("from"),
                                                 yes=bool(args.get("yes")), emit=emit)
            return await self.restorer.one(names[0], ref=args.get("backup"),
                                           as_=args.get("as"), from_dir=args.get("from"),
                                           yes=bool(args.get("yes")), emit=emit)

    async def _guest_op(self, op: str, name: str, emit: EmitFn,
                        session: dict[str, Any]) -> dict[str, Any]:
        g = self.runtime.get(name)
        async with self.apply_lock, g.busy:
            self.apply_by = time.strftime("%H:%M:%S") + f" ({session['peer']}, {op} {name})"
            if op in ("stop", "restart"):
                await self.lifecycle.stop(g)
            if op in ("start", "restart"):
                if g.state in (GuestState.RUNNING, GuestState.STARTING):
                    raise ConflictError(f"guest {name} is already {g.state.value}")
                g.restarts.clear()
                await self.lifecycle.start(g, emit)
        return next(x for x in self.status(False)["guests"] if x["name"] == name)
