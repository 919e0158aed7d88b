"""How a plan's actions run: phase by phase, targets concurrently, a failure skipping only
the rest of its own target's actions."""

from __future__ import annotations

import asyncio

from consolidator.daemon.applier import run_phases
from consolidator.errors import LaunchError
from consolidator.hostfacts import HostFacts
from consolidator.model import parse_fleet
from consolidator.plan import (Action, CreateNetwork, Impact, Observed, StartGuest,
                               StopGuest, plan)

FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)


def run(actions: tuple[Action, ...], fail: set[tuple[str, str, str]]):
    done: list[str] = []

    async def one(a: Action) -> None:
        await asyncio.sleep(0)
        if (a.kind, a.target, a.name) in fail:
            raise LaunchError(f"{a.kind} {a.name} failed")
        done.append(f"{a.kind} {a.target} {a.name}")

    failures = asyncio.run(run_phases(actions, one))
    return done, failures


def test_a_failed_guest_does_not_skip_a_network_of_the_same_name():
    """Regression: failures were keyed by name alone, so a guest named like a network
    made the network's later actions vanish."""
    front = parse_fleet("networks: {front: {subnet: 10.9.0.0/24}}\n"
                        "guests: {front: {}}\n", "t.yaml", FACTS)
    actions = (StopGuest("front", Impact.RESTART),
               CreateNetwork("front", Impact.LIVE, spec=front.networks["front"]),
               StartGuest("front", Impact.RESTART, intent=front.guests["front"]))
    done, failures = run(actions, fail={("stop", "guest", "front")})
    assert done == ["create network front"]
    assert failures == [{"target": "guest front", "action": "stop",
                         "error": "stop front failed"}]


def test_a_failure_skips_the_rest_of_its_target_only():
    fleet = parse_fleet("guests: {a: {}, b: {}}\n", "t.yaml", FACTS)
    p = plan(fleet, Observed())
    done, failures = run(p.actions, fail={("create", "guest", "a")})
    assert done == ["create guest b", "start guest b"]
    assert [f["target"] for f in failures] == ["guest a"]


def test_phases_run_in_order_and_a_targets_actions_in_order():
    fleet = parse_fleet("networks: {n: {subnet: 10.9.0.0/24}}\n"
                        "guests: {a: {nics: [{network: n}]}, b: {}}\n", "t.yaml", FACTS)
    p = plan(fleet, Observed())
    done, failures = run(p.actions, fail=set())
    assert failures == []
    assert done.index("create network n") < done.index("create guest a") < \
        done.index("start guest a")
    assert done.index("create guest b") < done.index("start guest b")
    assert set(done) == {f"{a.kind} {a.target} {a.name}" for a in p.actions}
