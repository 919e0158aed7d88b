"""The planner: ``plan(desired, observed) -> Plan``. Pure: no I/O, no clock.

Every difference between the desired :class:`~consolidator.model.Fleet` and the
:class:`Observed` state becomes an immutable action labelled by its impact:

- ``live``: applied without disturbing a running guest (cgroup knobs, balloon
  floor, creating something new, starting something stopped);
- ``restart``: the guest must be stopped and started again (vcpus, memory.max,
  nics, kernel);
- ``replace``: the object is destroyed and made anew (a disk image change, a
  network's subnet, a pruned guest or network).

Restart and replace actions that would disturb a *running* guest are planned
only with ``allow_restart``; otherwise they are returned as :class:`Pending`.
Removals are planned only with ``prune``.

Actions come in dependency order, in seven phases (:data:`PHASES`): guests stop
or go; networks go; networks come or change; host settings change; guests change
live; guests are defined; guests start. So a network always exists before a guest
on it starts, and every guest has left a network before it is removed.

A plan has a :meth:`Plan.digest`: the supervisor executes a plan only when its own
plan from the same state has the digest of the one the operator was shown.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import PlanError
from .inventory.schema import HostSpec, NetworkSpec
from .model import Fleet, GuestIntent, GuestState
from .units import parse_size


class Impact(enum.StrEnum):
    LIVE = "live"
    RESTART = "restart"
    REPLACE = "replace"

    @property
    def rank(self) -> int:
        return {"live": 0, "restart": 1, "replace": 2}[self.value]


# ------------------------------------------------------------------ observed state

@dataclass(frozen=True)
class ObservedGuest:
    intent: GuestIntent          # what was last applied to it
    state: GuestState


@dataclass(frozen=True)
class Observed:
    """What the state dir (and, later, the supervisor) says exists."""

    instance: str | None = None
    host: HostSpec | None = None
    networks: dict[str, NetworkSpec] = field(default_factory=dict)
    guests: dict[str, ObservedGuest] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "Observed":
        return cls()

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance,
                "host": self.host.model_dump(mode="json") if self.host else None,
                "networks": {n: s.model_dump(mode="json") for n, s in self.networks.items()},
                "guests": {n: {"intent": g.intent.model_dump(mode="json"),
                               "state": g.state.value} for n, g in self.guests.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Observed":
        return cls(
            instance=d.get("instance"),
            host=HostSpec.model_validate(d["host"]) if d.get("host") else None,
            networks={n: NetworkSpec.model_validate(s) for n, s in d.get("networks",
                                                                         {}).items()},
            guests={n: ObservedGuest(GuestIntent.model_validate(g["intent"]),
                                     GuestState(g["state"]))
                    for n, g in d.get("guests", {}).items()})


# ------------------------------------------------------------------------ changes

@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any
    impact: Impact

    def render(self) -> str:
        return f"{self.field}: {_show(self.old)} → {_show(self.new)}"


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


# Impact of a change to a guest field, by dotted path (longest prefix wins).
GUEST_FIELDS: dict[str, Impact] = {
    "image": Impact.LIVE,            # a rename alone changes nothing; image_spec decides
    "image_spec": Impact.RESTART,    # kernel, initrd, cmdline, builtin, pvm
    "image_spec.disk": Impact.REPLACE,
    "image_spec.format": Impact.REPLACE,
    "vcpus": Impact.RESTART,
    "cpu": Impact.LIVE,              # shares, reserve, limit, pin: cgroup knobs
    "memory.max": Impact.RESTART,
    "memory.min": Impact.LIVE,
    "memory.shares": Impact.LIVE,
    "memory.merge": Impact.RESTART,  # QEMU marks guest RAM mergeable when it maps it
    "nics": Impact.RESTART,
    "restart": Impact.LIVE,
    "autostart": Impact.LIVE,
    "labels": Impact.LIVE,
    "cpu.model": Impact.RESTART,
    "os": Impact.LIVE,              # a profile acts through the devices it defaults
    "firmware": Impact.RESTART,
    "machine": Impact.RESTART,
    "disk_bus": Impact.RESTART,
    "display": Impact.RESTART,
    "rtc": Impact.RESTART,
    "hyperv": Impact.RESTART,
    "cdrom": Impact.RESTART,
    "boot": Impact.RESTART,
    "disks": Impact.RESTART,        # added, removed or moved; a grow alone is live (below)
    "disk_io": Impact.LIVE,         # QEMU throttle groups, set through QMP
    "io": Impact.LIVE,              # shares: the rebalancer's
    "ready": Impact.LIVE,           # how the next start is judged
    "ready_timeout": Impact.LIVE,
    "backup": Impact.LIVE,          # the supervisor's schedule, not QEMU's
    # cloud-init reads its seed at every boot but runs user-data once per instance-id,
    # which changes only when the guest is replaced: recorded now, the plan says so
    "cloud_init": Impact.LIVE,
}
# Host settings are read by the supervisor; none of them touches a running guest.
HOST_FIELDS: dict[str, Impact] = {f: Impact.LIVE for f in HostSpec.model_fields}
NETWORK_FIELDS: dict[str, Impact] = {
    "subnet": Impact.REPLACE,
    "gateway": Impact.LIVE,
    "nat": Impact.LIVE,
    "forward_to": Impact.LIVE,
    "dhcp": Impact.LIVE,
}
# Compared as a whole rather than field by field.
_ATOMIC = {"nics", "labels"}


def _classify(path: str, table: dict[str, Impact]) -> Impact:
    p = path
    while True:
        if p in table:
            return table[p]
        if "." not in p:
            raise PlanError(f"no impact rule for field {path!r}")
        p = p.rsplit(".", 1)[0]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _ATOMIC:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_fields(old: dict[str, Any], new: dict[str, Any], table: dict[str, Impact],
                skip: Iterable[str] = ()) -> tuple[Change, ...]:
    fo, fn = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(fo) | set(fn)):
        if key in skip:
            continue
        a, b = fo.get(key), fn.get(key)
        if a != b:
            out.append(Change(key, a, b, _classify(key, table)))
    return tuple(out)


def guest_changes(old: GuestIntent, new: GuestIntent) -> tuple[Change, ...]:
    """Field changes. NICs whose only change is their rate or burst (tc) change live.
    Data disks compare by name: a larger size is a live resize and new limits are live,
    a smaller size is refused (:class:`PlanError`), anything else restarts."""
    changes = diff_fields(old.model_dump(mode="json"), new.model_dump(mode="json"),
                          GUEST_FIELDS, skip=("name", "disks", "nics"))
    return tuple(sorted(changes + _nic_changes(old, new) + _disk_changes(old, new),
                        key=lambda c: c.field))


_NIC_LIVE = {"rate", "burst"}


def _nic_changes(old: GuestIntent, new: GuestIntent) -> tuple[Change, ...]:
    def wired(g: GuestIntent) -> list[dict[str, Any]]:
        return [{k: v for k, v in n.model_dump(mode="json").items() if k not in _NIC_LIVE}
                for n in g.nics]
    if old.nics == new.nics:
        return ()
    if wired(old) != wired(new):
        return (Change("nics", [n.model_dump(mode="json") for n in old.nics],
                       [n.model_dump(mode="json") for n in new.nics], Impact.RESTART),)
    return tuple(Change(f"nics.{i}.{k}", getattr(a, k), getattr(b, k), Impact.LIVE)
                 for i, (a, b) in enumerate(zip(old.nics, new.nics))
                 for k in sorted(_NIC_LIVE) if getattr(a, k) != getattr(b, k))


def _disk_changes(old: GuestIntent, new: GuestIntent) -> tuple[Change, ...]:
    if old.disks == new.disks:
        return ()
    before = {d.name: d for d in old.disks}
    for d in new.disks:
        was = before.get(d.name)
        if was is not None and d.size < was.size:
            raise PlanError(f"guest {new.name}: data disk {d.name} would shrink from "
                            f"{was.size} to {d.size} bytes, which loses data",
                            hint="keep its size, or add a new disk and move the data")
    same_shape = [(d.name, d.bus) for d in old.disks] == [(d.name, d.bus) for d in new.disks]
    if not same_shape:
        return (Change("disks", [d.model_dump(mode="json") for d in old.disks],
                       [d.model_dump(mode="json") for d in new.disks], Impact.RESTART),)
    out = []
    for b in new.disks:
        a = before[b.name]
        if a.size != b.size:
            out.append(Change(f"disks.{a.name}.size", a.size, b.size, Impact.LIVE))
        if a.io != b.io:
            out.append(Change(f"disks.{a.name}.io",
                              a.io.model_dump(mode="json", exclude_none=True) if a.io else None,
                              b.io.model_dump(mode="json", exclude_none=True) if b.io else None,
                              Impact.LIVE))
    return tuple(out)


def network_changes(old: NetworkSpec, new: NetworkSpec) -> tuple[Change, ...]:
    return diff_fields(old.model_dump(mode="json"), new.model_dump(mode="json"), NETWORK_FIELDS)


def _worst(changes: Iterable[Change]) -> Impact:
    return max((c.impact for c in changes), key=lambda i: i.rank, default=Impact.LIVE)


# ------------------------------------------------------------------------ actions

@dataclass(frozen=True)
class Action:
    name: str
    impact: Impact
    changes: tuple[Change, ...] = ()

    kind = "action"      # overridden: "create", "update", "remove", "start", "stop"
    target = "thing"     # "network", "guest" or "host"
    symbol = "?"

    def describe(self) -> str:
        head = f"{self.kind} {self.target} {self.name}".strip()
        if self.changes:
            head += ": " + "; ".join(c.render() for c in self.changes)
        return head

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": f"{self.kind}-{self.target}", "name": self.name,
                               "impact": self.impact.value}
        if self.changes:
            out["changes"] = [{"field": c.field, "old": c.old, "new": c.new,
                               "impact": c.impact.value} for c in self.changes]
        return out


@dataclass(frozen=True)
class CreateNetwork(Action):
    spec: NetworkSpec | None = None
    kind, target, symbol = "create", "network", "+"


@dataclass(frozen=True)
class UpdateNetwork(Action):
    spec: NetworkSpec | None = None
    kind, target, symbol = "update", "network", "~"


@dataclass(frozen=True)
class RemoveNetwork(Action):
    kind, target, symbol = "remove", "network", "-"


@dataclass(frozen=True)
class UpdateHost(Action):
    spec: HostSpec | None = None
    kind, target, symbol = "update", "host", "~"


@dataclass(frozen=True)
class CreateGuest(Action):
    """Define the guest: its record, and its disk overlay for disk images."""

    intent: GuestIntent | None = None
    kind, target, symbol = "create", "guest", "+"


@dataclass(frozen=True)
class UpdateGuest(Action):
    """Record the new definition; for a running guest, apply the live knobs."""

    intent: GuestIntent | None = None
    kind, target, symbol = "update", "guest", "~"


@dataclass(frozen=True)
class StartGuest(Action):
    intent: GuestIntent | None = None
    kind, target, symbol = "start", "guest", ">"


@dataclass(frozen=True)
class StopGuest(Action):
    kind, target, symbol = "stop", "guest", "<"


@dataclass(frozen=True)
class RemoveGuest(Action):
    purge: bool = False      # also delete the disk overlay
    kind, target, symbol = "remove", "guest", "-"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "purge": self.purge}


@dataclass(frozen=True)
class Pending:
    """A change that needs a restart of a running guest, not planned without allow_restart."""

    target: str
    name: str
    impact: Impact
    changes: tuple[Change, ...]

    def describe(self) -> str:
        return f"{self.target} {self.name}: " + "; ".join(c.render() for c in self.changes)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "name": self.name, "impact": self.impact.value,
                "changes": [{"field": c.field, "old": c.old, "new": c.new,
                             "impact": c.impact.value} for c in self.changes]}


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    pending: tuple[Pending, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.actions and not self.pending

    def counts(self) -> dict[str, int]:
        """Terraform-style summary: what is created, started, changed, restarted, replaced."""
        c = dict.fromkeys(("create", "start", "live", "restart", "replace", "remove"), 0)
        c["pending"] = len(self.pending)
        recreated = {(type(a).__name__, a.name) for a in self.actions
                     if isinstance(a, CreateNetwork) and a.impact is Impact.REPLACE}
        for a in self.actions:
            if a.impact is Impact.LIVE:
                if isinstance(a, (CreateGuest, CreateNetwork)):
                    c["create"] += 1
                elif isinstance(a, StartGuest):
                    c["start"] += 1
                else:
                    c["live"] += 1
            elif a.impact is Impact.RESTART:
                c["restart"] += isinstance(a, StopGuest)
            elif isinstance(a, RemoveNetwork):
                c["replace" if ("CreateNetwork", a.name) in recreated else "remove"] += 1
            elif isinstance(a, RemoveGuest):
                c["remove"] += 1
            elif isinstance(a, CreateGuest):
                c["replace"] += 1
        return c

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "actions": [a.to_json() for a in self.actions],
                "pending": [p.to_json() for p in self.pending], "notes": list(self.notes),
                "counts": self.counts(), "digest": self.digest()}

    def digest(self) -> str:
        """What this plan does, as a hash: every action with its changes, every pending
        change and note. Two plans with one digest do the same thing."""
        doc = {"actions": [a.to_json() for a in self.actions],
               "pending": [p.to_json() for p in self.pending], "notes": list(self.notes)}
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


# ------------------------------------------------------------------------ planning

#: The dependency order of actions: a phase runs only after every earlier one.
PHASES: tuple[tuple[type[Action], ...], ...] = (
    (StopGuest, RemoveGuest),
    (RemoveNetwork,),
    (CreateNetwork, UpdateNetwork),
    (UpdateHost,),
    (UpdateGuest,),
    (CreateGuest,),
    (StartGuest,),
)


def phase(a: Action) -> int:
    for i, kinds in enumerate(PHASES):
        if isinstance(a, kinds):
            return i
    raise PlanError(f"no phase for action {type(a).__name__}")


def plan(desired: Fleet, observed: Observed, *, prune: bool = False, purge: bool = False,
         allow_restart: bool = False) -> Plan:
    """What to do so that ``observed`` becomes ``desired``. Pure."""
    if observed.instance is not None and observed.instance != desired.instance and \
            (observed.guests or observed.networks):
        raise PlanError(
            f"instance changed from {observed.instance!r} to {desired.instance!r} while its "
            "guests and networks exist", hint="run destroy with the old inventory first")
    if observed.host is not None and observed.host.fabric_netns != desired.host.fabric_netns \
            and observed.networks:
        raise PlanError(
            f"host.fabric_netns changed from {observed.host.fabric_netns!r} to "
            f"{desired.host.fabric_netns!r} while networks exist", hint="destroy first")

    actions: list[Action] = []
    pending: list[Pending] = []
    notes: list[str] = []

    # Networks whose subnet changes are replaced; running guests on them make that gated.
    replaced_nets: set[str] = set()
    for name, want in desired.networks.items():
        have = observed.networks.get(name)
        if have is None:
            actions.append(CreateNetwork(name, Impact.LIVE, spec=want))
            continue
        ch = network_changes(have, want)
        if not ch:
            continue
        if _worst(ch) is Impact.REPLACE:
            users = [g for g, o in observed.guests.items() if o.state.active and
                     (g in desired.guests or not prune) and
                     any(n.network == name for n in o.intent.nics)]
            if users and not allow_restart:
                pending.append(Pending("network", name, Impact.REPLACE, ch))
                continue
            replaced_nets.add(name)
            actions.append(RemoveNetwork(name, Impact.REPLACE, ch))
            actions.append(CreateNetwork(name, Impact.REPLACE, ch, spec=want))
        else:
            actions.append(UpdateNetwork(name, Impact.LIVE, ch, spec=want))
    blocked_nets = {p.name for p in pending if p.target == "network"}

    if observed.host is not None:
        hch = diff_fields(observed.host.model_dump(mode="json"),
                          desired.host.model_dump(mode="json"), HOST_FIELDS)
        if hch:
            actions.append(UpdateHost("", Impact.LIVE, hch, spec=desired.host))

    for name, want in desired.guests.items():
        have = observed.guests.get(name)
        if have is None:
            actions.append(CreateGuest(name, Impact.LIVE, intent=want))
            if want.autostart:
                actions.append(StartGuest(name, Impact.LIVE, intent=want))
            continue
        ch = guest_changes(have.intent, want)
        if any(c.field == "cloud_init" for c in ch):
            replaced = any(c.impact is Impact.REPLACE for c in ch)
            notes.append(f"guest {name}: its user-data changed; " + (
                "it is replaced, so cloud-init runs the new user-data" if replaced else
                "cloud-init runs user-data once per instance, so the new one takes effect "
                "only when the guest is replaced (its disk made anew)"))
        touches_replaced = any(n.network in replaced_nets for n in have.intent.nics)
        on_blocked = any(n.network in blocked_nets for n in want.nics + have.intent.nics)
        heavy = tuple(c for c in ch if c.impact is not Impact.LIVE or
                      (c.impact is Impact.LIVE and _needs_pending(c, have.intent) and
                       any(x.impact is not Impact.LIVE for x in ch)))
        live = tuple(c for c in ch if c not in heavy)
        worst = _worst(heavy)
        if not have.state.active:
            if ch:
                if worst is Impact.REPLACE:
                    actions.append(CreateGuest(name, Impact.REPLACE, ch, intent=want))
                else:
                    actions.append(UpdateGuest(name, Impact.LIVE, ch, intent=want))
            if want.autostart:
                actions.append(StartGuest(name, Impact.LIVE, intent=want))
            continue
        if heavy and (not allow_restart or on_blocked):
            pending.append(Pending("guest", name, worst, heavy))
            if live:
                actions.append(UpdateGuest(name, Impact.LIVE, live,
                                           intent=_with_changes(have.intent, live)))
            continue
        if heavy or touches_replaced:
            impact = worst if heavy else Impact.RESTART
            actions.append(StopGuest(name, impact, ch))
            if impact is Impact.REPLACE:
                actions.append(CreateGuest(name, Impact.REPLACE, ch, intent=want))
            actions.append(StartGuest(name, impact, intent=want))
        elif live:
            actions.append(UpdateGuest(name, Impact.LIVE, live, intent=want))

    for name in sorted(set(observed.guests) - set(desired.guests)):
        if prune:
            actions.append(RemoveGuest(name, Impact.REPLACE, purge=purge))
        else:
            notes.append(f"guest {name} is not in the inventory; --prune removes it")

    # A pruned network goes only once no guest that keeps running is still on it.
    staying = {n.network for p_ in pending if p_.target == "guest"
               for n in observed.guests[p_.name].intent.nics}
    if not prune:
        staying |= {n.network for g in set(observed.guests) - set(desired.guests)
                    for n in observed.guests[g].intent.nics if observed.guests[g].state.active}
    for name in sorted(set(observed.networks) - set(desired.networks)):
        if not prune:
            notes.append(f"network {name} is not in the inventory; --prune removes it")
        elif name in staying:
            notes.append(f"network {name} stays until the guests still on it restart "
                         "(apply --allow-restart)")
        else:
            actions.append(RemoveNetwork(name, Impact.REPLACE))

    ordered = sorted(enumerate(actions), key=lambda ia: (phase(ia[1]), ia[1].name, ia[0]))
    return Plan(tuple(a for _, a in ordered), tuple(sorted(pending, key=lambda p: (p.target,
                                                                                    p.name))),
                tuple(notes))


def _with_changes(old: GuestIntent, changes: Iterable[Change]) -> GuestIntent:
    """``old`` with exactly ``changes`` applied: what a guest runs with after a live update
    when its restart-needing changes stay pending."""
    data = old.model_dump(mode="json")
    for c in changes:
        *parents, leaf = c.field.split(".")
        d = data
        for k in parents:
            # a list of named entries (data disks) is walked by name, NICs by index
            if isinstance(d, list):
                d = d[int(k)] if k.isdigit() else next(x for x in d if x["name"] == k)
            else:
                d = d[k]
        d[leaf] = c.new
    return GuestIntent.model_validate(data)


def _needs_pending(c: Change, old: GuestIntent) -> bool:
    """A live change that cannot apply before a pending restart (a floor above today's max)."""
    return c.field == "memory.min" and c.new is not None and parse_size(c.new) > old.memory.max


# ---------------------------------------------------------------- model execution

def simulate(observed: Observed, p: Plan, desired: Fleet) -> Observed:
    """Execute ``p`` against a model of ``observed``, checking dependencies as it goes.

    This is the contract the executor keeps; tests check that planning then
    simulating converges. Raises :class:`PlanError` on an order violation.
    """
    nets = dict(observed.networks)
    guests = dict(observed.guests)
    host = observed.host
    for a in p.actions:
        if isinstance(a, CreateNetwork):
            if a.name in nets:
                raise PlanError(f"create network {a.name}: exists")
            nets[a.name] = a.spec  # type: ignore[assignment]
        elif isinstance(a, UpdateNetwork):
            nets[a.name] = a.spec  # type: ignore[assignment]
        elif isinstance(a, RemoveNetwork):
            users = [g for g, o in guests.items() if o.state.active and
                     any(n.network == a.name for n in o.intent.nics)]
            if users:
                raise PlanError(f"remove network {a.name}: still used by {users}")
            del nets[a.name]
        elif isinstance(a, UpdateHost):
            host = a.spec
        elif isinstance(a, CreateGuest):
            guests[a.name] = ObservedGuest(a.intent, GuestState.DEFINED)  # type: ignore[arg-type]
        elif isinstance(a, UpdateGuest):
            g = guests[a.name]
            guests[a.name] = ObservedGuest(a.intent, g.state)  # type: ignore[arg-type]
        elif isinstance(a, StartGuest):
            missing = [n.network for n in a.intent.nics if n.network not in nets]  # type: ignore
            if missing:
                raise PlanError(f"start guest {a.name}: networks {missing} do not exist yet")
            if a.name not in guests:
                raise PlanError(f"start guest {a.name}: not defined")
            guests[a.name] = ObservedGuest(a.intent, GuestState.RUNNING)  # type: ignore[arg-type]
        elif isinstance(a, StopGuest):
            g = guests[a.name]
            guests[a.name] = ObservedGuest(g.intent, GuestState.STOPPED)
        elif isinstance(a, RemoveGuest):
            del guests[a.name]
    return Observed(instance=desired.instance, host=host or desired.host, networks=nets,
                    guests=guests)
