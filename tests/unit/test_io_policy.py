"""The disk I/O policy: snapshots in, each guest's share of the host budget out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.sched.io import IoInput, IoParams, io_policy

MiB = 1 << 20
BUDGET = 24 * MiB


def caps(guests, previous=None, budget=BUDGET, iops=None):
    return {d.name: d for d in io_policy(guests, budget_bps=budget, budget_iops=iops,
                                         previous=previous)}


def test_two_busy_guests_held_at_their_ceilings_split_by_shares():
    prev = {"a": (6 * MiB, None), "b": (18 * MiB, None)}
    got = caps([IoInput("a", 1000, 6 * MiB, 6), IoInput("b", 3000, 18 * MiB, 18)], prev)
    assert (got["a"].bps, got["b"].bps) == (6 * MiB, 18 * MiB)
    assert not got["a"].changed and "shares 1000 of 4000 busy" in got["a"].reason


def test_first_sight_of_two_unthrottled_writers_divides_by_shares():
    got = caps([IoInput("a", 1000, 300 * MiB, 300), IoInput("b", 3000, 300 * MiB, 300)])
    assert got["a"].bps == 6 * MiB and got["b"].bps == 18 * MiB


def test_an_idle_guest_keeps_nothing_back_and_the_busy_one_takes_the_budget():
    prev = {"a": (6 * MiB, None), "b": (18 * MiB, None)}
    got = caps([IoInput("a", 1000, 0.0, 0), IoInput("b", 3000, 18 * MiB, 18)], prev)
    assert got["a"].bps is None and "idle" in got["a"].reason
    assert got["b"].bps == BUDGET


def test_a_guest_using_little_leaves_the_rest_to_the_others():
    prev = {"a": (12 * MiB, None), "b": (12 * MiB, None)}
    got = caps([IoInput("a", 1000, 2 * MiB, 2), IoInput("b", 1000, 12 * MiB, 12)], prev)
    assert got["a"].bps == 3 * MiB                    # its use and headroom
    assert got["b"].bps == 21 * MiB                   # what a leaves
    assert "uses 2 MiB/s" in got["a"].reason


def test_declared_limits_are_ceilings_and_what_they_leave_goes_to_others():
    prev = {"a": (12 * MiB, None), "b": (12 * MiB, None)}
    got = caps([IoInput("a", 3000, 4 * MiB, 4, ceiling_bps=4 * MiB),
                IoInput("b", 1000, 12 * MiB, 12)], prev)
    assert got["a"].bps == 4 * MiB and got["b"].bps == 20 * MiB


def test_no_budget_no_ceilings():
    got = caps([IoInput("a", 1000, 50 * MiB, 50)], budget=None)
    assert got["a"].bps is None and "no host bps budget" in got["a"].reason


def test_a_small_move_is_held_by_hysteresis():
    prev = {"a": (6 * MiB, None), "b": (18 * MiB, None)}
    got = caps([IoInput("a", 1050, 6 * MiB, 6), IoInput("b", 3000, 18 * MiB, 18)], prev)
    assert got["a"].bps == 6 * MiB and "kept bytes" in got["a"].reason


def test_when_a_guest_stops_the_other_gets_all_of_the_budget_past_hysteresis():
    prev = {"a": (1_562_515, None), "b": (23_603_308, None)}   # a was stopping
    got = caps([IoInput("a", 1000, 0.0, 0), IoInput("b", 3000, 22.5 * MiB, 22)], prev)
    assert got["a"].bps is None and got["b"].bps == BUDGET      # 6.6 %: not held back


def test_operations_are_divided_by_their_own_budget():
    got = caps([IoInput("a", 1000, 1 * MiB, 400), IoInput("b", 1000, 1 * MiB, 400)],
               previous={"a": (None, 200), "b": (None, 200)}, budget=None, iops=400)
    assert (got["a"].iops, got["b"].iops) == (200, 200)


guest = st.builds(lambda i, s, u, held, ceil: (f"g{i}", s, u, held, ceil),
                  st.integers(0, 1000), st.integers(1, 10000),
                  st.floats(0, 500 * MiB), st.booleans(),
                  st.one_of(st.none(), st.floats(1 * MiB, 100 * MiB)))


@settings(max_examples=300, deadline=None)
@given(st.lists(guest, min_size=1, max_size=12, unique_by=lambda g: g[0]),
       st.floats(1 * MiB, 1000 * MiB))
def test_shares_never_exceed_the_budget_nor_a_ceiling(gs, budget):
    ins = [IoInput(n, s, u, None, ceiling_bps=c) for n, s, u, _, c in gs]
    prev = {n: ((int(u) or 1) if held else None, None) for n, s, u, held, c in gs}
    out = io_policy(ins, budget_bps=budget, budget_iops=None, previous=prev,
                    params=IoParams(min_change=0.0))
    given_ = [d.bps for d in out if d.bps is not None]
    assert sum(given_) <= budget + len(given_)           # int() rounds down; >= 1 each
    for d, g in zip(out, ins):
        if d.bps is not None and g.ceiling_bps is not None:
            assert d.bps <= g.ceiling_bps + 1
        if (g.bps or 0) < IoParams().idle_bps:
            assert d.bps is None


@pytest.mark.parametrize("shares", [(1000, 3000), (1, 10000), (500, 500, 1000)])
def test_saturating_guests_get_their_weights(shares):
    ins = [IoInput(f"g{i}", s, 500 * MiB, None) for i, s in enumerate(shares)]
    out = io_policy(ins, budget_bps=BUDGET, budget_iops=None)
    for d, s in zip(out, shares):
        assert d.bps == pytest.approx(BUDGET * s / sum(shares), abs=1)
