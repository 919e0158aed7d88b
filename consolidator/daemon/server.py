"""The API server: JSON lines on the state dir's unix socket (wire format: :mod:`.protocol`).

A connection is a session: ``apply-begin`` takes the apply lock for that connection
until it commits, aborts or closes, so concurrent applies are serialised. Operations:
``ping``, ``status``, ``observe``, ``apply-begin``, ``apply-commit``, ``apply-abort``,
``start``, ``stop``, ``restart``, ``agent``, ``destroy``, ``shutdown``, and the test hook
``rebalancer``.

``apply-commit`` carries the inventory's text and path, the state index the plan was made
at, and the plan's digest. The server validates the inventory itself, as strictly as
``validate`` does (a fleet made by hand and sent over the socket would otherwise reach
QEMU's argv unchecked), plans again from its own state and executes only a plan with that
digest: what the operator was shown is what runs, or the commit is refused (exit 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from ..errors import ConflictError, ConsolidatorError, UsageError
from ..hostfacts import HostFacts
from ..model import GuestState, parse_fleet
from ..plan import plan as make_plan
from ..sched.rebalancer import Rebalancer
from . import protocol
from .applier import Applier
from .lifecycle import EmitFn, Lifecycle
from .runtime import Runtime

log = structlog.get_logger("supervisor")


class Api:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle, applier: Applier, *,
                 status: Callable[[bool], dict[str, Any]],
                 destroy: Callable[[bool], Awaitable[dict[str, Any]]],
                 rebalancer: Callable[[], Rebalancer | None],
                 record_ms: Callable[[], list[float]],
                 after_apply: Callable[[], None],
                 stopping: asyncio.Event) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.applier = applier
        self.status = status
        self.destroy = destroy
        self.rebalancer = rebalancer
        self.record_ms = record_ms
        self.after_apply = after_apply
        self.stopping = stopping
        self.apply_lock = asyncio.Lock()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: dict[str, Any] = {"locked": False}
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    msg = json.loads(line)
                    rid = int(msg.get("id", 0))
                except (ValueError, TypeError, AttributeError):
                    writer.write(protocol.encode(protocol.error_message(
                        0, UsageError("malformed request"))))
                    continue

                def emit(ev: dict[str, Any], rid: int = rid) -> None:
                    with contextlib.suppress(Exception):
                        writer.write(protocol.encode({"id": rid, "event": ev}))

                try:
                    result = await self.dispatch(msg.get("op"), msg.get("args") or {},
                                                 session, emit)
                    writer.write(protocol.encode({"id": rid, "result": result}))
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    if not isinstance(e, ConsolidatorError):
                        log.exception("api.internal_error", op=msg.get("op"))
                    writer.write(protocol.encode(protocol.error_message(rid, e)))
                await writer.drain()
                if msg.get("op") in ("shutdown", "destroy"):
                    self.stopping.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if session["locked"]:
                self.apply_lock.release()
            with contextlib.suppress(Exception):
                writer.close()

    async def dispatch(self, op: str | None, args: dict[str, Any], session: dict[str, Any],
                       emit: EmitFn) -> Any:
        rt = self.runtime
        if op == "ping":
            return {"pid": os.getpid(), "protocol": protocol.PROTOCOL, "index": rt.index}
        if op == "status":
            return self.status(bool(args.get("explain")))
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
                await self.apply_lock.acquire()       # concurrent applies queue here
                session["locked"] = True
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
                self.apply_lock.release()
                session["locked"] = False
        if op == "apply-abort":
            if session["locked"]:
                self.apply_lock.release()
                session["locked"] = False
            return {"aborted": True}
        if op in ("start", "stop", "restart"):
            return await self._guest_op(op, str(args.get("name")), emit)
        if op == "agent":
            g = rt.get(str(args.get("name")))
            if g.guest is None or g.state is not GuestState.RUNNING:
                raise ConflictError(f"guest {g.name} is {g.state.value}, not running")
            agent = await g.guest.agent()
            return {"reply": await agent.request(args["command"], args.get("arg", ""),
                                                 float(args.get("timeout", 30)))}
        if op == "destroy":
            async with self.apply_lock:
                return await self.destroy(bool(args.get("purge")))
        if op == "shutdown":
            return {"stopping": True}
        raise UsageError(f"unknown operation {op!r}")

    async def _commit(self, args: dict[str, Any], emit: EmitFn) -> dict[str, Any]:
        rt = self.runtime
        if int(args["index"]) != rt.index:
            raise ConflictError(f"the fleet changed while the plan was shown (state index "
                                f"{args['index']} -> {rt.index})",
                                hint="run apply again to see the new plan")
        digest = args.get("plan_digest")
        if not digest:
            raise UsageError("apply-commit needs the digest of the plan that was shown")
        path = args.get("inventory_path")
        if not isinstance(path, str) or not os.path.isabs(path) or \
                not isinstance(args.get("inventory"), str):
            raise UsageError("apply-commit needs the inventory's text and absolute path")
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
                                          purge=bool(args.get("purge")), emit=emit)
        self.after_apply()
        return {**result, "status": self.status(False)}

    async def _guest_op(self, op: str, name: str, emit: EmitFn) -> dict[str, Any]:
        g = self.runtime.get(name)
        async with self.apply_lock, g.busy:
            if op in ("stop", "restart"):
                await self.lifecycle.stop(g)
            if op in ("start", "restart"):
                if g.state in (GuestState.RUNNING, GuestState.STARTING):
                    raise ConflictError(f"guest {name} is already {g.state.value}")
                g.restarts.clear()
                await self.lifecycle.start(g, emit)
        return next(x for x in self.status(False)["guests"] if x["name"] == name)
