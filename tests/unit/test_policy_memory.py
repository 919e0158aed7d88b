from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.sched.memory import (HostState, MemHost, MemInput, MemParams, host_state,
                                       memory_policy, watchdog_target)

MiB = 1 << 20
HOST = MemHost(budget=4096 * MiB, mem_available=20000 * MiB, mem_total=24000 * MiB)


def guest(name, *, mx=256, mn=128, shares=1000, actual=None, used=60, avail=None,
          faults=0.0, stale=False):
    actual = mx if actual is None else actual
    total = mx - 38                                  # the kernel keeps some for itself
    inflated = mx - actual
    available = (total - used - inflated) if avail is None else avail
    return MemInput(name, mx * MiB, mn * MiB, shares, actual * MiB, total * MiB,
                    max(0, available) * MiB, faults, 0.0, stale)


def run(guests, host=HOST, **kw):
    r = memory_policy(guests, host, **kw)
    return r, {d.name: d for d in r.decisions}


def test_idle_guest_shrinks_stepwise_towards_working_set_but_not_below_min():
    r, d = run([guest("a", mx=512, mn=64, used=40)])
    assert d["a"].target == 512 * MiB - MemParams().max_step     # one step
    assert "at most" in d["a"].reason
    r, d = run([guest("a", mx=512, mn=200, actual=205, used=40)])
    assert d["a"].target == 205 * MiB                            # under min change
    r, d = run([guest("a", mx=512, mn=300, actual=300, used=40)])
    assert d["a"].target == 300 * MiB                            # never below min


def test_pressure_deflates_at_once():
    r, d = run([guest("a", mx=512, mn=64, actual=128, avail=10)])
    assert d["a"].pressure and d["a"].target >= 128 * MiB + MemParams().grow_min
    assert "pressure" in d["a"].reason


def test_a_deflation_in_flight_is_never_taken_back_under_pressure():
    # the last tick asked for 600 MiB; the balloon is still at 300 and the guest is short
    g = guest("a", mx=1024, mn=64, actual=300, avail=10)
    _, d = run([MemInput(**{**g.__dict__, "target": 600 * MiB})])
    assert d["a"].pressure and d["a"].target > 600 * MiB


def test_a_guest_at_its_ceiling_doubles():
    _, d = run([guest("a", mx=2048, mn=64, actual=200, avail=2)])
    assert d["a"].target == 400 * MiB and "ceiling" in d["a"].reason
    _, d = run([guest("a", mx=300, mn=64, actual=200, avail=2)])
    assert d["a"].target == 300 * MiB                            # never above max


def test_working_set_is_read_against_the_balloon_the_stats_saw():
    # stats taken with the balloon at 512 (nothing inflated) show 200 MiB in use; the
    # balloon has since gone to 256. Mixing the two would read 200 - 256 < 0 in use.
    g = MemInput("a", 512 * MiB, 64 * MiB, 1000, 256 * MiB, 474 * MiB, 274 * MiB,
                 stats_actual=(512 * MiB, 512 * MiB))
    _, d = run([g])
    assert d["a"].ws == 200 * MiB
    _, mixed = run([MemInput(**{**g.__dict__, "stats_actual": None})])
    assert mixed["a"].ws == MemParams().floor_ws                 # what it would have read


def test_stats_taken_while_the_balloon_moved_move_the_estimate_only_as_far_as_forced():
    # stats say 400 MiB in use (deflate-on-oom counts ballooned pages); the balloon was
    # somewhere between 300 and 512 MiB when they were taken: 188..400 MiB working set
    g = MemInput("a", 512 * MiB, 64 * MiB, 1000, 300 * MiB, 474 * MiB, 74 * MiB,
                 stats_actual=(300 * MiB, 512 * MiB))
    for prev, ws in ((60, 188), (250, 250), (450, 400)):
        _, d = run([g], estimates={"a": prev * MiB})
        assert d["a"].ws == ws * MiB, prev
    _, d = run([g])
    assert d["a"].ws == 400 * MiB                    # no estimate yet: the high end
    _, d = run([MemInput(**{**g.__dict__, "available": 5 * MiB})], estimates={"a": 60 * MiB})
    assert d["a"].pressure and d["a"].target > 300 * MiB     # short is short, moving or not


def test_growth_trend_widens_the_headroom():
    _, calm = run([guest("a", mx=1024, mn=64, actual=400, used=300)], estimates={"a": 300 * MiB})
    _, rising = run([guest("a", mx=1024, mn=64, actual=400, used=300)],
                    estimates={"a": 200 * MiB})
    assert rising["a"].target > calm["a"].target


def test_major_faults_are_pressure():
    r, d = run([guest("a", mx=512, mn=64, actual=200, used=60, faults=500)])
    assert d["a"].pressure and d["a"].target > 200 * MiB


def test_stale_stats_drift_towards_deflated_never_inflated():
    r, d = run([guest("a", mx=512, mn=64, actual=200, stale=True)])
    assert d["a"].target == 200 * MiB + MemParams().stale_step
    assert "stale" in d["a"].reason
    r, d = run([guest("a", mx=512, mn=64, actual=500, stale=True)])
    assert d["a"].target == 512 * MiB


def test_working_set_excludes_the_balloon():
    # 256 MiB guest ballooned to 128: the 128 MiB in the balloon count as used inside
    r, d = run([guest("a", actual=128, used=50)])
    assert d["a"].ws == 50 * MiB


def test_estimate_rises_at_once_and_decays_slowly():
    r, _ = run([guest("a", used=200)], estimates={"a": 50 * MiB})
    assert r.estimates["a"] == 200 * MiB
    r, _ = run([guest("a", used=50)], estimates={"a": 200 * MiB})
    assert 50 * MiB < r.estimates["a"] < 200 * MiB


def test_budget_takes_from_the_idlest_low_share_guest_first():
    host = MemHost(budget=700 * MiB, mem_available=20000 * MiB, mem_total=24000 * MiB)
    gs = [guest("busy", mx=512, mn=64, actual=300, avail=8),     # under pressure
          guest("idle_low", mx=512, mn=64, actual=300, used=30, shares=100),
          guest("idle_high", mx=512, mn=64, actual=300, used=30, shares=5000)]
    r, d = run(gs, host)
    assert sum(x.target for x in r.decisions) <= 700 * MiB
    assert d["idle_low"].target <= d["idle_high"].target
    assert "budget pressure" in d["idle_low"].reason
    # the guests hold 900 MiB now: busy is not squeezed, but waits for the room
    assert d["busy"].target == 300 * MiB and "held back" in d["busy"].reason
    # once the idle balloons have inflated, busy is fed
    gs2 = [replace(g, actual=d[g.name].target) for g in gs]
    r, d = run(gs2, host, holds=r.holds, estimates=r.estimates)
    assert d["busy"].target > 300 * MiB
    assert sum(x.target for x in r.decisions) <= 700 * MiB


def test_growth_never_takes_the_guests_over_the_budget_while_balloons_move():
    host = MemHost(budget=640 * MiB, mem_available=20000 * MiB, mem_total=24000 * MiB)
    gs = [guest("a", mx=512, mn=96, actual=240, avail=4),        # short: doubles
          guest("b", mx=512, mn=96, actual=115, used=40),
          guest("c", mx=512, mn=96, actual=115, used=40)]
    r, d = run(gs, host)
    # b and c still hold 230 MiB until their balloons inflate
    assert d["a"].target <= (640 - 230) * MiB and d["a"].target > 240 * MiB


def test_budget_infeasible_is_reported():
    host = MemHost(budget=100 * MiB, mem_available=20000 * MiB, mem_total=24000 * MiB)
    r, _ = run([guest("a", mn=128), guest("b", mn=128)], host)
    assert not r.feasible and any("infeasible" in n for n in r.notes)


@pytest.mark.parametrize("psi,avail,prev,state", [
    (0, 20000, HostState.NORMAL, HostState.NORMAL),
    (12, 20000, HostState.NORMAL, HostState.SOFT),
    (7, 20000, HostState.SOFT, HostState.SOFT),          # hysteresis: stays soft
    (3, 20000, HostState.SOFT, HostState.NORMAL),
    (45, 20000, HostState.NORMAL, HostState.HARD),
    (25, 20000, HostState.HARD, HostState.HARD),
    (15, 20000, HostState.HARD, HostState.SOFT),
    (0, 1000, HostState.NORMAL, HostState.HARD),          # MemAvailable 4 %
])
def test_host_states(psi, avail, prev, state):
    h = MemHost(0, avail * MiB, 24000 * MiB, psi_some10=psi)
    assert host_state(h, prev) is state


def test_host_pressure_tightens_the_budget():
    h = MemHost(1000 * MiB, 1000 * MiB, 24000 * MiB)     # hard
    r = memory_policy([guest("a")], h)
    assert r.host_state is HostState.HARD and r.budget == int(1000 * MiB * 0.85)


guests_st = st.lists(
    st.builds(lambda mx, mnf, af, usedf, avail_override, shares, faults, stale:
              (mx, max(32, int(mx * mnf)), af, usedf, avail_override, shares, faults, stale),
              st.sampled_from([128, 256, 512, 1024]), st.floats(0.1, 1.0), st.floats(0.1, 1.0),
              st.floats(0.05, 0.9), st.sampled_from([None, 4, 20]), st.integers(0, 5000),
              st.sampled_from([0.0, 0.0, 200.0]), st.booleans()),
    min_size=1, max_size=6)


def build(rows):
    out = []
    for i, (mx, mn, af, usedf, avail, shares, faults, stale) in enumerate(rows):
        actual = max(mn, int(mx * af))
        out.append(guest(f"g{i}", mx=mx, mn=mn, actual=actual, used=int(mx * usedf * 0.7),
                         avail=avail, shares=shares, faults=faults, stale=stale))
    return out


@settings(max_examples=400, deadline=None)
@given(guests_st, st.integers(256, 4096), st.floats(0, 50))
def test_properties(rows, budget_mib, psi):
    gs = build(rows)
    host = MemHost(budget_mib * MiB, 20000 * MiB, 24000 * MiB, psi_some10=psi)
    r = memory_policy(gs, host)
    by = {g.name: g for g in gs}
    for d in r.decisions:
        g = by[d.name]
        assert g.min <= d.target <= g.max                  # within [min, max]
        if d.pressure or g.stale:
            assert d.target >= g.actual                    # never squeezed
    if r.feasible:
        assert sum(d.target for d in r.decisions) <= r.budget
    # what the guests hold while balloons move (a shrinking one still has its actual)
    # never goes over the budget, or over what they already held
    holding = sum(max(d.target, by[d.name].actual) for d in r.decisions)
    assert holding <= max(r.budget, sum(g.actual for g in gs)) or not r.feasible


@pytest.mark.parametrize("current,maximum,step,want", [
    (128 * MiB, 512 * MiB, 32 * MiB, 160 * MiB),     # one step towards deflated
    (500 * MiB, 512 * MiB, 32 * MiB, 512 * MiB),     # never past max
    (512 * MiB, 512 * MiB, 32 * MiB, None),          # already there: nothing to do
    (None, 512 * MiB, 32 * MiB, None),               # unknown size: taken as max
])
def test_the_watchdog_walks_balloons_towards_deflated(current, maximum, step, want):
    assert watchdog_target(current, maximum, step) == want


def test_memory_merged_by_ksm_is_counted_once():
    """What merging saves is memory the host does not hold: the guests' sizes may add up
    to the budget plus it, and the decision says so."""
    gs = [guest("a", mx=512, mn=64, actual=300, used=200),
          guest("b", mx=512, mn=64, actual=300, used=200)]
    plain = MemHost(budget=500 * MiB, mem_available=20000 * MiB, mem_total=24000 * MiB)
    r0, _ = run(gs, plain)
    r1, _ = run(gs, replace(plain, merged=80 * MiB))
    assert r0.budget == 500 * MiB and r1.budget == 580 * MiB
    assert sum(x.target for x in r0.decisions) <= 500 * MiB
    assert 500 * MiB < sum(x.target for x in r1.decisions) <= 580 * MiB
    assert any("merged by KSM" in n for n in r1.notes)
