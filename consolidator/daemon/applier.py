"""Applying a plan: its actions, phase by phase, through the lifecycle and the executor.

The plan comes from the API server, which made it from the runtime's observed state
and checked that it is the plan the operator was shown (its digest). Phases run in the
planner's order (:data:`consolidator.plan.PHASES`); within a phase, the actions of
different targets run concurrently and one target's actions stay in order
(:func:`run_phases`). One failure never stops the others: it is reported, and the rest
of *that target's* actions are skipped (a network and a guest may share a name; they
are different targets).

A live update of a running guest's CPU spec leaves its weight to the rebalancer when
the rebalancer owns it (:class:`Weights`), which decides again at once: an apply never
fights the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Protocol

import structlog

from ..errors import ConsolidatorError
from ..model import Fleet, GuestIntent, GuestState
from ..vm import throttle
from ..plan import (PHASES, Action, CreateGuest, CreateNetwork, Plan, RemoveGuest, RemoveNetwork,
                    StartGuest, StopGuest, UpdateGuest, UpdateHost, UpdateNetwork, phase)
from .executor import Executor
from .lifecycle import EmitFn, Lifecycle
from .runtime import GuestRuntime, Runtime

log = structlog.get_logger("supervisor")
START_PHASE = next(i for i, kinds in enumerate(PHASES) if StartGuest in kinds)


class Weights(Protocol):
    """Who writes a running guest's CPU weight (the rebalancer, when it runs)."""

    def owns_weight(self, name: str) -> bool: ...

    async def respec(self, name: str, intent: GuestIntent) -> None: ...


async def run_phases(actions: tuple[Action, ...], run: Callable[[Action], Awaitable[None]],
                     before: dict[int, Callable[[], Awaitable[None]]] | None = None
                     ) -> list[dict[str, str]]:
    """Run ``actions`` phase by phase; within a phase, each target's actions in order and
    the targets concurrently. A failed action is reported and skips the later actions
    of its own target only. Returns the failures."""
    failures: list[dict[str, str]] = []
    failed: set[tuple[str, str]] = set()

    async def chain(target: tuple[str, str], batch: list[Action]) -> None:
        for a in batch:
            if target in failed:
                return
            try:
                await run(a)
            except Exception as e:  # noqa: BLE001 - one failure never stops the rest
                msg = e.message if isinstance(e, ConsolidatorError) else \
                    f"{type(e).__name__}: {e}"
                failures.append({"target": f"{a.target} {a.name}".strip(), "action": a.kind,
                                 "error": msg})
                failed.add(target)
                log.warning("apply.action_failed", action=a.kind, target=a.target,
                            name=a.name, error=msg,
                            exc_info=not isinstance(e, ConsolidatorError))

    by_phase: dict[int, dict[tuple[str, str], list[Action]]] = {}
    for a in actions:
        by_phase.setdefault(phase(a), {}).setdefault((a.target, a.name), []).append(a)
    for ph in sorted(by_phase):
        if before and ph in before:
            await before[ph]()
        await asyncio.gather(*(chain(t, batch) for t, batch in by_phase[ph].items()))
    return failures


class Applier:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle,
                 weights: Callable[[], Weights | None],
                 networks_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.weights = weights
        # the networks' services (DHCP, DNS) follow the fleet before guests start
        self.networks_ready = networks_ready

    async def apply(self, desired: Fleet, inventory_text: str, p: Plan, *, purge: bool,
                    emit: EmitFn, inventory_path: str | None = None) -> dict[str, Any]:
        """Execute ``p``, which takes the runtime's state to ``desired``. The caller holds
        the apply lock."""
        ex = await asyncio.to_thread(self.lifecycle.use, desired)
        # written ahead: a supervisor killed mid-apply must find the fleet it was applying
        self.runtime.set_fleet(desired, inventory_text, complete=False, path=inventory_path)
        self.lifecycle.set_concurrency(desired.host.concurrency)
        if desired.host.runas == "root":
            log.warning("qemu.runs_as_root", note="host.runas: root: a guest that escapes "
                                                  "QEMU owns the host")

        async def run(a: Action) -> None:
            await self._action(a, ex, emit, purge)

        ready = self.networks_ready
        failures = await run_phases(p.actions, run,
                                    before={START_PHASE: ready} if ready else None)
        if ready is not None:
            await ready()
        self.runtime.set_fleet(desired, inventory_text, complete=True, path=inventory_path)
        return {"ok": not failures, "failures": failures,
                "pending": [x.to_json() for x in p.pending], "notes": list(p.notes),
                "actions": len(p.actions), "index": self.runtime.index}

    async def _action(self, a: Action, ex: Executor, emit: EmitFn, purge: bool) -> None:
        rt = self.runtime
        if isinstance(a, (CreateNetwork, UpdateNetwork)):
            await asyncio.to_thread(ex.create_network, a.name, a.spec)
            rt.set_network(a.name, a.spec)  # type: ignore[arg-type]
        elif isinstance(a, RemoveNetwork):
            await asyncio.to_thread(ex.remove_network, a.name)
            rt.drop_network(a.name)
        elif isinstance(a, UpdateHost):
            pass      # the fleet (and so the host settings) is replaced after the plan runs
        elif isinstance(a, CreateGuest):
            assert a.intent is not None
            rt.define(a.name, a.intent, "defined")
        elif isinstance(a, UpdateGuest):
            assert a.intent is not None
            g = rt.get(a.name)
            async with g.busy:
                await self._update(g, a.intent, a, ex)
        elif isinstance(a, StopGuest):
            g = rt.get(a.name)
            async with g.busy:
                await self.lifecycle.stop(g, impact=a.impact.value,
                                          changes=[c.render() for c in a.changes])
        elif isinstance(a, StartGuest):
            assert a.intent is not None
            g = rt.guests.get(a.name) or rt.define(a.name, a.intent, "defined")
            async with g.busy:
                if g.intent != a.intent:
                    rt.update_intent(g, a.intent, "redefined")
                g.restarts.clear()          # apply resets a failed guest's history
                await self.lifecycle.start(g, emit)
        elif isinstance(a, RemoveGuest):
            g = rt.guests.get(a.name)
            if g is not None:
                async with g.busy:
                    await self.lifecycle.stop(g)
                self.lifecycle.forget(g)
            await asyncio.to_thread(ex.remove_guest, a.name)
            rt.state.remove_guest_files(a.name, purge=a.purge)
            ex.release_identity(a.name)
            rt.remove(a.name)
            log.info("guest.removed", guest=a.name, purge=a.purge)

    async def _update(self, g: GuestRuntime, intent: GuestIntent, a: UpdateGuest,
                      ex: Executor) -> None:
        changes = [c.render() for c in a.changes]
        if g.state is not GuestState.RUNNING:
            self.runtime.update_intent(g, intent, "redefined", changes=changes)
            return
        weights = self.weights()
        owned = weights is not None and weights.owns_weight(g.name)
        nics = any(c.field.startswith("nics.") for c in a.changes)
        written = await asyncio.to_thread(ex.apply_live, intent, weight=not owned, nics=nics)
        for c in a.changes:                 # a data disk grown: QEMU resizes it live
            if c.field.startswith("disks.") and c.field.endswith(".size") and g.guest:
                name = c.field.split(".")[1]
                size = next(d.size for d in intent.disks if d.name == name)
                await g.guest.resize_disk(name, size)
                written.append(f"data disk {name}: {size} bytes")
        if g.guest is not None and any(c.field.startswith("disk_io") or
                                       (c.field.startswith("disks.") and
                                        c.field.endswith(".io")) for c in a.changes):
            for drive, limits in throttle.guest_limits(intent).items():
                await g.guest.set_disk_limits(drive, limits)
                written.append(f"{drive} limits: {throttle.shown(limits) or 'none'}")
        self.runtime.update_intent(g, intent, "updated", changes=changes, written=written)
        if owned and weights is not None and any(c.field.startswith("cpu.")
                                                 for c in a.changes):
            await weights.respec(g.name, intent)
