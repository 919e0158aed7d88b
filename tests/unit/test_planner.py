"""The planner: table tests for change impacts, hypothesis properties for convergence."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consolidator.errors import PlanError
from consolidator.inventory.schema import CpuSpec, HostSpec, ImageSpec, MemorySpec, NetworkSpec
from consolidator.model import Fleet, GuestIntent, NicIntent
from consolidator.inventory.derive import derive_mac
from consolidator.plan import (CreateGuest, CreateNetwork, GuestState, Impact, Observed,
                               ObservedGuest, RemoveGuest, RemoveNetwork, StartGuest, StopGuest,
                               UpdateGuest, UpdateNetwork, guest_changes, plan, simulate)

MiB = 1 << 20
IMAGES = {
    "tiny": ImageSpec(builtin="tiny"),
    "tiny2": ImageSpec(builtin="tiny", kernel="/k/vmlinuz-2"),
    "disk1": ImageSpec(disk="/d/one.qcow2", format="qcow2"),
    "disk2": ImageSpec(disk="/d/two.raw", format="raw"),
}
NETS = ["n1", "n2", "n3"]
SUBNETS = ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/16"]
GUESTS = ["a", "b", "c", "d"]


def nic(net: str, spec: NetworkSpec, host_index: int | None, guest: str, i: int) -> NicIntent:
    ip = str(spec.subnet.network_address + host_index + 1) if host_index is not None else None
    return NicIntent(network=net, mac=derive_mac("t", guest, i), ip=ip,
                     prefix=spec.subnet.prefixlen,
                     gateway=spec.gateway)


@st.composite
def networks(draw) -> dict[str, NetworkSpec]:
    out = {}
    for n in sorted(draw(st.sets(st.sampled_from(NETS)))):
        subnet = ipaddress.ip_network(draw(st.sampled_from(SUBNETS)))
        gw = draw(st.booleans())
        out[n] = NetworkSpec(subnet=str(subnet),
                             gateway=str(next(subnet.hosts())) if gw else None,
                             nat=gw and draw(st.booleans()))
    return out


@st.composite
def intents(draw, name: str, nets: dict[str, NetworkSpec]) -> GuestIntent:
    image = draw(st.sampled_from(sorted(IMAGES)))
    mx = draw(st.sampled_from([256 * MiB, 512 * MiB]))
    mn = draw(st.sampled_from([128 * MiB, mx]))
    chosen = draw(st.lists(st.sampled_from(sorted(nets)), unique=True, max_size=2)) if nets else []
    nics = tuple(nic(n, nets[n], draw(st.sampled_from([None, 5, 6])), name, i)
                 for i, n in enumerate(chosen))
    return GuestIntent(
        name=name, image=image, image_spec=IMAGES[image], vcpus=draw(st.integers(1, 3)),
        cpu=CpuSpec(shares=draw(st.sampled_from([512, 1024, 4096])),
                    reserve=draw(st.sampled_from([0.0, 0.25])),
                    limit=draw(st.sampled_from([None, 1.0]))),
        memory=MemorySpec(max=mx, min=mn, shares=draw(st.sampled_from([1000, 3000]))),
        nics=nics, restart=draw(st.sampled_from(["always", "on-failure", "never"])),
        autostart=draw(st.booleans()),
        labels=draw(st.sampled_from([{}, {"role": "web"}])))


@st.composite
def fleets(draw) -> Fleet:
    nets = draw(networks())
    names = sorted(draw(st.sets(st.sampled_from(GUESTS))))
    guests = {g: draw(intents(g, nets)) for g in names}
    return Fleet(instance="t", host=HostSpec(), budget=8 << 30, usable_cpus=1.5,
                 images=IMAGES, networks=nets, guests=guests)


@st.composite
def observed_states(draw) -> Observed:
    f = draw(fleets())
    states = list(GuestState)
    return Observed(instance="t", host=f.host, networks=dict(f.networks),
                    guests={g: ObservedGuest(i, draw(st.sampled_from(states)))
                            for g, i in f.guests.items()})


def running(fleet: Fleet) -> Observed:
    """The state an apply of ``fleet`` leaves: autostart guests running, others defined."""
    return Observed(instance=fleet.instance, host=fleet.host, networks=dict(fleet.networks),
                    guests={g: ObservedGuest(i, GuestState.RUNNING if i.autostart
                                             else GuestState.DEFINED)
                            for g, i in fleet.guests.items()})


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------- properties

@FAST
@given(fleets(), observed_states())
def test_executing_the_plan_yields_the_desired_state(desired, observed):
    p = plan(desired, observed, prune=True, allow_restart=True)
    after = simulate(observed, p, desired)          # raises on any dependency violation
    assert after.networks == desired.networks
    assert {g: o.intent for g, o in after.guests.items()} == desired.guests
    for g, o in after.guests.items():
        was_active = g in observed.guests and observed.guests[g].state.active
        if desired.guests[g].autostart or was_active:
            assert o.state.active, (g, o.state)
    assert plan(desired, after, prune=True, allow_restart=True).empty


@FAST
@given(fleets(), observed_states())
def test_without_allow_restart_a_second_plan_has_nothing_left_to_do(desired, observed):
    p = plan(desired, observed, prune=True)
    after = simulate(observed, p, desired)
    again = plan(desired, after, prune=True)
    assert again.actions == ()
    assert {(x.target, x.name) for x in again.pending} == {(x.target, x.name) for x in p.pending}
    for a in p.actions:
        if isinstance(a, (StopGuest, StartGuest)) and a.impact is not Impact.LIVE:
            raise AssertionError(f"restart planned without allow_restart: {a}")


@FAST
@given(fleets())
def test_unchanged_fleet_plans_nothing(desired):
    assert plan(desired, running(desired), prune=True, allow_restart=True).empty
    assert plan(desired, running(desired)).empty


@FAST
@given(fleets(), st.data())
def test_live_only_changes_never_restart(desired, data):
    observed = running(desired)
    changed = {}
    for g, i in desired.guests.items():
        changed[g] = i.model_copy(update={
            "cpu": CpuSpec(shares=data.draw(st.sampled_from([2, 100, 1024, 262144])),
                           reserve=data.draw(st.sampled_from([0.0, 0.5])),
                           limit=data.draw(st.sampled_from([None, 2.0])),
                           pin=data.draw(st.sampled_from([None, (0,), (0, 1)]))),
            "memory": i.memory.model_copy(update={
                "min": data.draw(st.sampled_from([64 * MiB, i.memory.max])),
                "shares": data.draw(st.sampled_from([0, 1000, 50000]))}),
            "restart": data.draw(st.sampled_from(["always", "never"])),
            "labels": data.draw(st.sampled_from([{}, {"tier": "x"}])),
        })
    new = desired.model_copy(update={"guests": changed})
    for allow in (False, True):
        p = plan(new, observed, allow_restart=allow)
        assert not p.pending
        for a in p.actions:
            assert isinstance(a, UpdateGuest) and a.impact is Impact.LIVE, a


@FAST
@given(fleets(), observed_states())
def test_order_respects_dependencies(desired, observed):
    p = plan(desired, observed, prune=True, allow_restart=True)
    idx = {(type(a).__name__, a.name): i for i, a in enumerate(p.actions)}
    for i, a in enumerate(p.actions):
        if isinstance(a, StartGuest):
            for n in a.intent.nics:
                made = idx.get(("CreateNetwork", n.network))
                assert made is None or made < i, f"{a} before network {n.network} exists"
        if isinstance(a, RemoveNetwork):
            for g, o in observed.guests.items():
                if any(n.network == a.name for n in o.intent.nics) and o.state.active:
                    leave = idx.get(("StopGuest", g), idx.get(("RemoveGuest", g)))
                    assert leave is not None and leave < i, f"{a} while {g} is on it"


# ---------------------------------------------------------------------- table tests

BASE = GuestIntent(name="web", image="tiny", image_spec=IMAGES["tiny"], vcpus=1,
                   cpu=CpuSpec(), memory=MemorySpec(max=256 * MiB, min=128 * MiB),
                   nics=(), restart="on-failure", autostart=True, labels={})
NET = NetworkSpec(subnet="10.1.0.0/24", gateway="10.1.0.1")


@pytest.mark.parametrize("update,field,impact", [
    ({"cpu": CpuSpec(shares=2048)}, "cpu.shares", Impact.LIVE),
    ({"cpu": CpuSpec(reserve=0.5)}, "cpu.reserve", Impact.LIVE),
    ({"cpu": CpuSpec(limit=0.5)}, "cpu.limit", Impact.LIVE),
    ({"cpu": CpuSpec(pin=(0,))}, "cpu.pin", Impact.LIVE),
    ({"memory": MemorySpec(max=256 * MiB, min=64 * MiB)}, "memory.min", Impact.LIVE),
    ({"memory": MemorySpec(max=256 * MiB, min=128 * MiB, shares=5)}, "memory.shares",
     Impact.LIVE),
    ({"restart": "always"}, "restart", Impact.LIVE),
    ({"autostart": False}, "autostart", Impact.LIVE),
    ({"labels": {"a": "b"}}, "labels", Impact.LIVE),
    ({"vcpus": 2}, "vcpus", Impact.RESTART),
    ({"memory": MemorySpec(max=512 * MiB, min=128 * MiB)}, "memory.max", Impact.RESTART),
    ({"memory": MemorySpec(max=256 * MiB, min=128 * MiB, merge=False)}, "memory.merge",
     Impact.RESTART),
    ({"nics": (nic("n1", NET, 5, "web", 0),)}, "nics", Impact.RESTART),
    ({"image": "tiny2", "image_spec": IMAGES["tiny2"]}, "image_spec.kernel", Impact.RESTART),
    ({"image": "disk1", "image_spec": IMAGES["disk1"]}, "image_spec.disk", Impact.REPLACE),
])
def test_change_impacts(update, field, impact):
    changes = {c.field: c.impact for c in guest_changes(BASE, BASE.model_copy(update=update))}
    assert changes[field] is impact


def fleet_of(*guests: GuestIntent, nets: dict | None = None) -> Fleet:
    return Fleet(instance="t", host=HostSpec(), budget=8 << 30, usable_cpus=1.5, images=IMAGES,
                 networks=nets or {}, guests={g.name: g for g in guests})


def test_empty_state_creates_networks_then_guests_then_starts():
    g = BASE.model_copy(update={"nics": (nic("n1", NET, 5, "web", 0),)})
    p = plan(fleet_of(g, nets={"n1": NET}), Observed.empty())
    assert [type(a) for a in p.actions] == [CreateNetwork, CreateGuest, StartGuest]
    assert all(a.impact is Impact.LIVE for a in p.actions)


def test_restart_change_is_pending_without_allow_restart():
    new = BASE.model_copy(update={"vcpus": 2, "cpu": CpuSpec(shares=2048)})
    observed = running(fleet_of(BASE))
    p = plan(fleet_of(new), observed)
    assert [type(a) for a in p.actions] == [UpdateGuest]
    assert [c.field for c in p.actions[0].changes] == ["cpu.shares"]
    assert p.actions[0].intent.vcpus == 1          # runs with the old vcpus until restarted
    assert [(x.name, x.impact) for x in p.pending] == [("web", Impact.RESTART)]
    p2 = plan(fleet_of(new), observed, allow_restart=True)
    assert [type(a) for a in p2.actions] == [StopGuest, StartGuest]
    assert {c.field for c in p2.actions[0].changes} == {"vcpus", "cpu.shares"}


def test_min_above_pending_max_waits_for_the_restart():
    new = BASE.model_copy(update={"memory": MemorySpec(max=1024 * MiB, min=512 * MiB)})
    p = plan(fleet_of(new), running(fleet_of(BASE)))
    assert p.actions == ()
    assert {c.field for c in p.pending[0].changes} == {"memory.max", "memory.min"}


def test_stopped_guest_takes_restart_changes_without_restart():
    new = BASE.model_copy(update={"vcpus": 2, "autostart": False})
    observed = Observed(instance="t", guests={"web": ObservedGuest(BASE, GuestState.STOPPED)})
    p = plan(fleet_of(new), observed)
    assert [type(a) for a in p.actions] == [UpdateGuest]
    assert not p.pending


def test_failed_guest_is_started_by_apply():
    observed = Observed(instance="t", guests={"web": ObservedGuest(BASE, GuestState.FAILED)})
    p = plan(fleet_of(BASE), observed)
    assert [type(a) for a in p.actions] == [StartGuest]


def test_removal_only_with_prune():
    observed = running(fleet_of(BASE, nets={"n1": NET}))
    p = plan(fleet_of(), observed)
    assert p.actions == () and len(p.notes) == 2
    p = plan(fleet_of(), observed, prune=True, purge=True)
    assert [type(a) for a in p.actions] == [RemoveGuest, RemoveNetwork]
    assert p.actions[0].purge


def test_subnet_change_replaces_network_and_restarts_its_guests():
    g = BASE.model_copy(update={"nics": (nic("n1", NET, 5, "web", 0),)})
    net2 = NetworkSpec(subnet="10.9.0.0/24", gateway="10.9.0.1")
    g2 = BASE.model_copy(update={"nics": (nic("n1", net2, 5, "web", 0),)})
    observed = running(fleet_of(g, nets={"n1": NET}))
    p = plan(fleet_of(g2, nets={"n1": net2}), observed)
    assert p.actions == ()
    assert {(x.target, x.name) for x in p.pending} == {("network", "n1"), ("guest", "web")}
    p = plan(fleet_of(g2, nets={"n1": net2}), observed, allow_restart=True)
    assert [type(a) for a in p.actions] == [StopGuest, RemoveNetwork, CreateNetwork, StartGuest]
    assert p.counts()["replace"] == 1 and p.counts()["restart"] == 1


def test_gateway_change_is_live_for_the_network():
    nogw = NetworkSpec(subnet="10.1.0.0/24")
    p = plan(fleet_of(nets={"n1": NET}), running(fleet_of(nets={"n1": nogw})))
    assert [type(a) for a in p.actions] == [UpdateNetwork]


def test_instance_change_with_objects_is_refused():
    observed = Observed(instance="old", guests={"web": ObservedGuest(BASE, GuestState.RUNNING)})
    with pytest.raises(PlanError, match="instance changed"):
        plan(fleet_of(BASE), observed)


def test_plan_json_is_stable():
    p = plan(fleet_of(BASE), Observed.empty())
    j = p.to_json()
    assert j["format"] == 1
    assert [a["action"] for a in j["actions"]] == ["create-guest", "start-guest"]
    assert j["counts"]["create"] == 1 and j["counts"]["start"] == 1


def test_the_digest_names_what_the_plan_does():
    """apply-commit carries the digest of the plan shown; the supervisor runs only a plan
    with the same digest, made from its own state."""
    a = plan(fleet_of(BASE), Observed.empty())
    again = plan(fleet_of(BASE), Observed.from_json(Observed.empty().to_json()))
    assert a.digest() == again.digest() == a.to_json()["digest"]
    running = Observed(instance="t", guests={"web": ObservedGuest(BASE, GuestState.RUNNING)})
    other = plan(fleet_of(BASE.model_copy(update={"vcpus": 2})), running,
                 allow_restart=True)
    pending = plan(fleet_of(BASE.model_copy(update={"vcpus": 2})), running)
    assert len({a.digest(), other.digest(), pending.digest()}) == 3


def test_the_digest_survives_the_trip_through_the_socket():
    """The CLI plans against the observed state it got as JSON, the supervisor against its
    own: the same state must give the same digest."""
    running = Observed(instance="t", guests={"web": ObservedGuest(BASE, GuestState.RUNNING)})
    want = fleet_of(BASE.model_copy(update={"cpu": CpuSpec(shares=4096, limit=0.75)}))
    cli = plan(Fleet.model_validate(want.model_dump(mode="json")),
               Observed.from_json(running.to_json()))
    daemon = plan(want, running)
    assert cli.actions and cli.digest() == daemon.digest()
