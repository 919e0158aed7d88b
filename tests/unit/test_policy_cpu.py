from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.sched.cpu import CpuInput, cpu_policy, smooth_demand

HOST = (0, 1)


def g(name, shares=1024, reserve=0.0, demand=1.0, usage=None, cpus=None, vcpus=1):
    return CpuInput(name, shares, reserve, vcpus, cpus, demand,
                    demand if usage is None else usage)


def weights(guests, usable=1.5, prev=None):
    return {d.name: d.weight for d in cpu_policy(guests, host_cpus=HOST, usable=usable,
                                                 previous=prev)}


def test_without_reserves_weights_are_shares():
    assert weights([g("a", 1024), g("b", 2048), g("c", 4096)]) == \
        {"a": 1024, "b": 2048, "c": 4096}


def test_reserve_raises_weight_against_busy_competitors_on_one_core():
    gs = [g("small", 256, reserve=0.5, demand=1.0, usage=0.02, cpus=(0,)),
          g("big1", 8192, cpus=(0,)), g("big2", 8192, cpus=(0,))]
    w = weights(gs)
    share = w["small"] / sum(w.values())
    assert share >= 0.5, w


def test_idle_guests_do_not_dilute_and_need_no_boost():
    gs = [g("small", 256, reserve=0.5, demand=1.0, cpus=(0,)),
          g("big", 8192, cpus=(0,)), g("idle", 262144, demand=0.0, cpus=(0,))]
    w = weights(gs)
    # only "big" competes: the huge idle weight does not count against small's guarantee
    assert w["small"] / (w["small"] + w["big"]) >= 0.5
    assert w["small"] < 262144


def test_no_contention_no_boost():
    gs = [g("small", 256, reserve=0.5, demand=0.6, cpus=(0,)),
          g("other", 8192, demand=0.2, cpus=(0,))]
    assert weights(gs)["small"] == 256


def test_reserve_not_wanted_when_demand_is_low():
    gs = [g("small", 256, reserve=0.5, demand=0.1, cpus=(0,)), g("big", 8192, cpus=(0,))]
    assert weights(gs)["small"] == 256


def test_two_reserved_guests_both_fit():
    gs = [g("a", 100, reserve=0.4, cpus=(0,)), g("b", 100, reserve=0.4, cpus=(0,)),
          g("hog", 100000, cpus=(0,))]
    w = weights(gs)
    tot = sum(w.values())
    assert w["a"] / tot >= 0.4 and w["b"] / tot >= 0.4


def test_hysteresis_keeps_a_close_weight():
    prev = {"a": 1000}
    d = cpu_policy([g("a", 1050)], host_cpus=HOST, usable=1.5, previous=prev)[0]
    assert d.weight == 1000 and not d.changed
    d = cpu_policy([g("a", 2048)], host_cpus=HOST, usable=1.5, previous=prev)[0]
    assert d.weight == 2048 and d.changed


def test_a_held_weight_keeps_the_reason_it_was_raised_for():
    gs = [g("small", 256, reserve=0.5, demand=1.0, usage=0.55, cpus=(0,)),
          g("big", 8192, demand=1.0, usage=0.45, cpus=(0,))]
    first = next(d for d in cpu_policy(gs, host_cpus=HOST, usable=1.5) if d.name == "small")
    assert first.reason.startswith("shares 256, raised for reserve 0.5 cores")
    near = {"small": int(first.weight * 1.05)}
    held = next(d for d in cpu_policy(gs, host_cpus=HOST, usable=1.5, previous=near)
                if d.name == "small")
    assert held.weight == near["small"] and not held.changed
    assert held.reason.startswith("shares 256, raised for reserve 0.5 cores") and "kept" in held.reason


def test_shortfall_pushes_harder():
    gs = [g("small", 256, reserve=0.5, demand=1.0, usage=0.1, cpus=(0,)),
          g("big", 8192, cpus=(0,))]
    first = weights(gs)
    again = weights(gs, prev=first)
    assert again["small"] > first["small"]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(2, 262144), st.sampled_from([0.0, 0.25, 0.5]),
                          st.floats(0, 2), st.floats(0, 2)), min_size=1, max_size=6))
def test_weights_are_positive_and_bounded(rows):
    gs = [g(f"g{i}", s, r, d, u, vcpus=2) for i, (s, r, d, u) in enumerate(rows)]
    for d in cpu_policy(gs, host_cpus=HOST, usable=1.5):
        assert 2 <= d.weight <= 262144


@settings(max_examples=300)
@given(st.lists(st.integers(2, 100000), min_size=2, max_size=6), st.floats(0, 2))
def test_ordered_by_shares_at_equal_demand(shares, demand):
    gs = [g(f"g{i}", s, 0.0, demand) for i, s in enumerate(shares)]
    ds = cpu_policy(gs, host_cpus=HOST, usable=1.5)
    for a in ds:
        for b in ds:
            sa = next(x.shares for x in gs if x.name == a.name)
            sb = next(x.shares for x in gs if x.name == b.name)
            if sa < sb:
                assert a.weight <= b.weight


@pytest.mark.parametrize("prev,measured,want", [
    (None, 0.3, 0.3),          # first reading: taken as it is
    (0.2, 0.9, 0.9),           # up at once
    (1.0, 0.0, 0.5),           # down by half the gap a tick
    (0.5, 0.0, 0.25),
    (0.4, 0.4, 0.4),
])
def test_demand_rises_at_once_and_falls_by_half_the_gap(prev, measured, want):
    assert smooth_demand(prev, measured) == pytest.approx(want)


def test_one_idle_tick_does_not_drop_a_busy_guest_below_half():
    d = smooth_demand(None, 1.0)
    d = smooth_demand(d, 0.0)
    assert d == 0.5 and smooth_demand(d, 1.0) == 1.0
