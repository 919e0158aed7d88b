"""The one owner of guest state: every guest's runtime, and the one way its state moves.

:class:`Runtime` is the supervisor's world: the fleet it runs, the networks that exist,
one :class:`GuestRuntime` per guest and the state **index**. :meth:`Runtime.transition`
is the only code that changes a guest's :class:`~consolidator.model.GuestState`, and it
does four things together, every time: checks the move against
:data:`~consolidator.model.TRANSITIONS`, bumps the index (plans made before are stale),
writes the event (structured log and the guest's ``log.jsonl``) and persists the record
through :class:`~consolidator.state.StateDir`. ``GuestRuntime.state`` has no setter.

Records hold the intent, the state, restart count and last event, and the *facts* of a
running guest (pid, its start time, QMP path, machine, accelerator, boot files, the
kernel objects it was given): everything a supervisor needs to adopt the guest after
a restart. The runtime writes them and nobody else does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import structlog

from ..errors import StateError, UsageError
from ..inventory.schema import NetworkSpec
from ..model import Fleet, GuestIntent, GuestState
from ..plan import Observed, ObservedGuest
from ..state import StateDir
from ..vm.guest import Guest
from . import guestlog

log = structlog.get_logger("supervisor")


class GuestRuntime:
    """One guest as the supervisor holds it. Its state moves only by Runtime.transition."""

    def __init__(self, name: str, intent: GuestIntent,
                 state: GuestState = GuestState.DEFINED) -> None:
        self.name = name
        self.intent = intent                  # what it runs with (the applied intent)
        self._state = state
        self.guest: Guest | None = None       # the QEMU, while there is one
        self.restarts: deque[float] = deque(maxlen=64)   # times of automatic restarts
        self.restart_count = 0
        self.last_event: str | None = None
        self.facts: dict[str, Any] = {}       # pid, pid_start, boot, objects, started_at...
        self.serial_offset = 0                # how far serial.log is in log.jsonl
        self.serial_seen = -1                 # its size when last looked at, all of it
        self.monitor: asyncio.Task[None] | None = None
        self.pending_restart: asyncio.Task[None] | None = None
        self.busy = asyncio.Lock()            # one operation at a time per guest
        self.agent_view: dict[str, Any] = {}  # what its qemu-ga last reported

    @property
    def state(self) -> GuestState:
        return self._state

    @property
    def live(self) -> bool:
        """Running, with QMP connected: block operations go through QEMU."""
        return self._state is GuestState.RUNNING and self.guest is not None and \
            self.guest.qmp is not None

    @property
    def started_at(self) -> float | None:
        return self.facts.get("started_at")

    def record(self, instance: str | None, index: int) -> dict[str, Any]:
        return {"name": self.name, "instance": instance, "index": index,
                "intent": self.intent.model_dump(mode="json"),
                "spec_hash": self.intent.spec_hash(), "state": self._state.value,
                "restarts": self.restart_count, "last_event": self.last_event,
                "facts": self.facts}


class Runtime:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.fleet: Fleet | None = None
        self.networks: dict[str, NetworkSpec] = {}
        self.guests: dict[str, GuestRuntime] = {}
        self.index = 0

    # ------------------------------------------------------------------ reading
    @property
    def instance(self) -> str | None:
        return self.fleet.instance if self.fleet else None

    def get(self, name: str) -> GuestRuntime:
        g = self.guests.get(name)
        if g is None:
            raise UsageError(f"no guest {name!r}",
                             hint=f"known: {', '.join(sorted(self.guests)) or 'none'}")
        return g

    def observed(self) -> Observed:
        return Observed(
            instance=self.instance, host=self.fleet.host if self.fleet else None,
            networks=dict(self.networks),
            guests={n: ObservedGuest(g.intent, g.state) for n, g in self.guests.items()})

    # ------------------------------------------------------------------ loading
    def load(self) -> list[GuestRuntime]:
        """What the state dir records. Returns the guests recorded as active: they may
        still run, and are to be reattached (from their facts)."""
        applied = self.state.read_applied()
        if applied:
            self.fleet = Fleet.model_validate(applied["fleet"])
            self.index = int(applied.get("index", 0))
        for n in self.state.network_names():
            rec = self.state.read_network_record(n)
            if rec and rec.get("phase") == "created":
                self.networks[n] = NetworkSpec.model_validate(rec["spec"])
        active = []
        index = self.index
        for name in self.state.guest_names():
            rec = self.state.read_guest_record(name) or {}
            if "intent" not in rec:
                continue
            try:
                g = GuestRuntime(name, GuestIntent.model_validate(rec["intent"]),
                                 GuestState(rec.get("state", "defined")))
            except ValueError as e:
                raise StateError(f"guest {name}: unreadable record ({e})",
                                 hint="move the record aside; apply defines the guest again"
                                 ) from None
            index = max(index, int(rec.get("index", 0)))
            g.restart_count = int(rec.get("restarts", 0))
            g.last_event = rec.get("last_event")
            facts = rec.get("facts")      # format 2: the supervisor migrated older dirs
            g.facts = dict(facts) if isinstance(facts, dict) else {}
            g.serial_offset = guestlog.last_serial_offset(self.state.guest_log_path(name))
            self.guests[name] = g
            if g.state.active:
                active.append(g)
        self.index = index + 1      # past every plan made before: the index never goes back
        return active

    # ------------------------------------------------------------------ changing
    def transition(self, g: GuestRuntime, to: GuestState, event: str, *,
                   facts: dict[str, Any] | None = None, **fields: Any) -> None:
        """Move ``g`` to ``to``: checked, indexed, logged and recorded, together."""
        if not g.state.may_become(to):
            raise StateError(f"guest {g.name}: no transition from {g.state.value} to "
                             f"{to.value} ({event})",
                             hint="a supervisor bug: please report it with its log")
        g._state = to
        self.index += 1
        if facts:
            g.facts.update(facts)
        self._event(g, event, fields)
        self._persist(g)

    def event(self, g: GuestRuntime, kind: str, **fields: Any) -> None:
        """Something happened to ``g`` that leaves its state as it is."""
        self._event(g, kind, fields)
        self._persist(g)

    def note(self, g: GuestRuntime, **facts: Any) -> None:
        """Record facts about ``g`` (before the objects they name are made)."""
        g.facts.update(facts)
        self._persist(g)

    def define(self, name: str, intent: GuestIntent, event: str, **fields: Any
               ) -> GuestRuntime:
        """Define a new guest, or define an existing (stopped) one anew."""
        g = self.guests.get(name)
        if g is None:
            g = self.guests[name] = GuestRuntime(name, intent)
            self.index += 1
            self.event(g, event, **fields)
            return g
        g.intent = intent
        self.transition(g, GuestState.DEFINED, event, **fields)
        return g

    def update_intent(self, g: GuestRuntime, intent: GuestIntent, event: str,
                      **fields: Any) -> None:
        """``g`` runs (or will run) with ``intent`` from now on."""
        g.intent = intent
        self.index += 1
        self.event(g, event, **fields)

    def remove(self, name: str) -> None:
        if self.guests.pop(name, None) is not None:
            self.index += 1

    def set_network(self, name: str, spec: NetworkSpec) -> None:
        self.networks[name] = spec
        self.index += 1

    def drop_network(self, name: str) -> None:
        if self.networks.pop(name, None) is not None:
            self.index += 1

    def set_fleet(self, fleet: Fleet, inventory_text: str, *, complete: bool,
                  path: str | None = None) -> None:
        """The fleet being applied (``complete`` false: written ahead, so a supervisor
        killed mid-apply is followed by one that knows it), or applied."""
        self.fleet = fleet
        if complete:
            self.index += 1
        self.state.write_applied(fleet, inventory_text, complete=complete, index=self.index,
                                 path=path)

    def clear(self) -> None:
        """After destroy: nothing is known, nothing runs."""
        self.fleet = None
        self.networks.clear()
        self.guests.clear()
        self.index += 1

    # ------------------------------------------------------------------ records
    def _event(self, g: GuestRuntime, kind: str, fields: dict[str, Any]) -> None:
        g.last_event = kind
        log.info(f"guest.{kind}", guest=g.name, state=g.state.value, **fields)
        guestlog.append(self.state.guest_log_path(g.name),
                        [{"kind": "event", "event": kind, **fields}])

    def _persist(self, g: GuestRuntime) -> None:
        try:
            self.state.write_guest_record(g.name, g.record(self.instance, self.index))
        except OSError as e:     # a full disk must not take the supervisor down
            log.warning("guest.record_failed", guest=g.name, error=str(e))

