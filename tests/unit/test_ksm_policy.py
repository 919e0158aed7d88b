"""The KSM policy: snapshots of ksmd and of the host's memory -> ksmd's settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from consolidator.sched.ksm import (KsmMode, KsmNeed, KsmObs, KsmParams, KsmState, Need,
                                    guest_saved, ksm_policy, merge_budget, predicted_cpu,
                                    settings_for)
from consolidator.sched.memory import HostState

MiB = 1 << 20
P = KsmParams()
COST = 1e-6


def obs(t: float = 0.0, sharing: int = 0, cpu: float = 0.0, scans: int = 0,
        scanned: int | None = 0, run: int = 0, pages: int = 100, sleep: int = 20,
        shared: int | None = None) -> KsmObs:
    return KsmObs(t, run, pages, sleep, sharing // 3 if shared is None else shared, sharing,
                  scans, cpu, scanned)


SHORT = KsmNeed(HostState.NORMAL, committed=2048 * MiB, budget=1024 * MiB, guests=4)
FITS = KsmNeed(HostState.NORMAL, committed=512 * MiB, budget=1024 * MiB, guests=4)


def run_ticks(readings: list[KsmObs], need: KsmNeed = SHORT, mode: KsmMode = KsmMode.AUTO):
    state: KsmState | None = None
    out = []
    for o in readings:
        d = ksm_policy(mode, o, need, state, P)
        assert d is not None
        state = d.state
        out.append(d)
    return out


def test_off_leaves_everything_alone():
    assert ksm_policy(KsmMode.OFF, obs(run=1), SHORT) is None


@pytest.mark.parametrize("need, mode, run, phase, words", [
    (FITS, KsmMode.AUTO, False, "idle", "memory is not short"),
    (replace(SHORT, guests=0), KsmMode.AUTO, False, "idle", "no running guest"),
    (SHORT, KsmMode.AUTO, True, "merge", "over the budget"),
    (FITS, KsmMode.ON, True, "merge", "host.ksm on"),
    (replace(FITS, host_state=HostState.SOFT), KsmMode.AUTO, True, "merge", "soft"),
    (replace(FITS, host_state=HostState.HARD), KsmMode.AUTO, True, "merge", "hard"),
])
def test_first_tick(need, mode, run, phase, words):
    d = ksm_policy(mode, obs(), need)
    assert d is not None
    assert (d.run, d.phase) == (run, phase)
    assert words in d.reason


def test_budget_grows_with_need():
    b = [merge_budget(n) for n in (Need.OVERCOMMITTED, Need.SOFT, Need.HARD)]
    assert b == sorted(b) and b[0] < b[-1]
    d_soft = ksm_policy(KsmMode.AUTO, obs(), replace(SHORT, host_state=HostState.SOFT))
    d_hard = ksm_policy(KsmMode.AUTO, obs(), replace(SHORT, host_state=HostState.HARD))
    assert d_hard.pages_to_scan > d_soft.pages_to_scan


def test_merges_while_it_pays_then_settles_to_the_steady_budget():
    # 4 guests: 40k pages gained per CPU-second for 20 s, then nothing
    readings, cpu, sharing, scanned = [], 0.0, 0, 0
    for t in range(60):
        cpu += 0.08
        scanned += 80_000
        if t < 20:
            sharing += 3200
        readings.append(obs(t, sharing, cpu, scans=t // 2, scanned=scanned, run=1))
    ds = run_ticks(readings)
    assert ds[0].phase == "merge" and ds[0].budget == P.cpu_overcommitted
    assert all(d.phase == "merge" for d in ds[:20])
    settled = [i for i, d in enumerate(ds) if d.phase == "steady"]
    assert settled and settled[0] <= 35, [d.reason for d in ds]
    last = ds[-1]
    assert last.run and last.budget == P.cpu_steady
    assert "stopped growing" in ds[settled[0]].reason
    assert last.predicted <= P.cpu_steady
    # the cost was measured: 0.08 s per 80k pages = 1 us a page
    assert last.state.cost == pytest.approx(1e-6)


def test_steady_with_almost_nothing_saved_stops_the_scanner():
    readings = [obs(t, 10, t * 0.08, scans=t, scanned=t * 80_000, run=1) for t in range(30)]
    ds = run_ticks(readings)
    assert ds[-1].phase == "steady" and not ds[-1].run
    assert "scanner stopped" in ds[-1].reason


def _steady_state() -> tuple[KsmState, KsmObs]:
    readings = [obs(t, 50_000, t * 0.08, scans=t, scanned=t * 80_000, run=1) for t in range(30)]
    ds = run_ticks(readings)
    assert ds[-1].phase == "steady"
    return ds[-1].state, readings[-1]


@pytest.mark.parametrize("change, words", [
    (dict(need=replace(SHORT, host_state=HostState.HARD)), "need rose"),
    (dict(need=replace(SHORT, guests=5)), "a guest was added"),
    (dict(sharing=40_000), "savings fell"),
    (dict(dt=P.reprobe_s + 1), "periodic probe"),
])
def test_steady_merges_again_when(change, words):
    state, last = _steady_state()
    o = obs(last.mono + change.get("dt", 1), change.get("sharing", 50_000), last.cpu_s + 0.01,
            scans=last.full_scans + 1, scanned=last.pages_scanned + 10_000, run=1)
    d = ksm_policy(KsmMode.AUTO, o, change.get("need", SHORT), state, P)
    assert d.phase == "merge" and d.run
    assert words in d.reason


def test_a_guest_going_away_is_no_reason_to_merge_again():
    state, last = _steady_state()
    fewer = replace(SHORT, guests=3)
    o = replace(last, mono=last.mono + 1, pages_sharing=30_000)    # its pages went too
    d = ksm_policy(KsmMode.AUTO, o, fewer, state, P)
    assert d.phase == "steady", d.reason
    d = ksm_policy(KsmMode.AUTO, replace(o, mono=o.mono + 1), SHORT, d.state, P)
    assert d.phase == "merge" and "a guest was added" in d.reason


def test_memory_no_longer_short_stops_the_scanner():
    state, last = _steady_state()
    d = ksm_policy(KsmMode.AUTO, replace(last, mono=last.mono + 1), FITS, state, P)
    assert d.phase == "idle" and not d.run
    assert d.changed(last)          # it was running: the stop is a write
    # on keeps it at the steady rate
    d_on = ksm_policy(KsmMode.ON, replace(last, mono=last.mono + 1), FITS, state, P)
    assert d_on.run and d_on.phase == "steady"


def test_a_host_that_ran_ksm_before_keeps_at_least_its_own_rate():
    host = (400, 50)             # the host's own settings, found with run 1
    # memory not short: auto would stop the scanner, but ksmd serves the whole host
    d = ksm_policy(KsmMode.AUTO, obs(run=1, pages=400, sleep=50), FITS, None, P, host=host)
    assert (d.run, d.pages_to_scan, d.sleep_ms, d.phase) == (True, 400, 50, "idle")
    assert "the host ran KSM before this supervisor" in d.reason
    assert not d.changed(obs(run=1, pages=400, sleep=50))     # nothing written
    # no guest may merge: the same
    d = ksm_policy(KsmMode.AUTO, obs(run=1), replace(FITS, guests=0), None, P, host=host)
    assert (d.run, d.pages_to_scan, d.sleep_ms) == (True, 400, 50)
    # steady: at the faster of the steady rate and the host's
    state, last = _steady_state()
    later = replace(last, mono=last.mono + 1)
    d = ksm_policy(KsmMode.AUTO, later, SHORT, state, P, host=host)
    assert d.phase == "steady" and "host ran KSM" not in d.reason    # 400/50 ms is slower
    d = ksm_policy(KsmMode.AUTO, later, SHORT, state, P, host=(4000, 20))
    assert (d.run, d.pages_to_scan, d.sleep_ms, d.phase) == (True, 4000, 20, "steady")
    # merging faster than the host's rate: the policy's own settings
    d = ksm_policy(KsmMode.AUTO, obs(), replace(SHORT, host_state=HostState.HARD), None, P,
                   host=(16, 1000))
    assert d.run and d.phase == "merge" and "host ran KSM" not in d.reason
    assert d.predicted > predicted_cpu(16, 1000, P.cost_prior)
    # a host that had KSM stopped: stopped as before
    d = ksm_policy(KsmMode.AUTO, obs(), FITS, None, P, host=None)
    assert not d.run


def test_under_the_kernel_s_scan_time_advisor_only_run_is_the_policy_s():
    advised = replace(obs(run=1, pages=2500, sleep=20), advisor=True)
    d = ksm_policy(KsmMode.AUTO, advised, SHORT, None, P)
    assert (d.run, d.pages_to_scan, d.sleep_ms, d.phase) == (True, 2500, 20, "merge")
    assert "scan-time advisor" in d.reason and not d.changed(advised)
    # memory not short: the scanner is stopped all the same
    d = ksm_policy(KsmMode.AUTO, advised, FITS, None, P)
    assert not d.run and d.changed(advised)


def test_judging_waits_for_two_full_scans():
    # nothing gained yet, but only one full scan done: KSM merges on the second
    readings = [obs(t, 0, t * 0.08, scans=min(t // 15, 1), scanned=t * 80_000, run=1)
                for t in range(25)]
    ds = run_ticks(readings)
    assert all(d.phase == "merge" for d in ds), [d.reason for d in ds]
    assert "judging after 2 full scans" in ds[-1].reason


def test_changed_compares_only_what_is_written():
    d = ksm_policy(KsmMode.AUTO, obs(), SHORT)
    assert d.changed(obs())
    same = obs(run=1, pages=d.pages_to_scan, sleep=d.sleep_ms)
    assert not d.changed(same)
    idle = ksm_policy(KsmMode.AUTO, obs(), FITS)
    assert not idle.changed(obs(run=0, pages=777))    # stopped: the rest is not ours


@pytest.mark.parametrize("budget, cost", [(0.02, 1e-6), (0.4, 1e-6), (0.001, 5e-6),
                                          (0.1, 2e-7), (0.02, 2e-5)])
def test_settings_fit_the_budget(budget, cost):
    pages, sleep = settings_for(budget, cost)
    assert pages == 0 or predicted_cpu(pages, sleep, cost) <= budget
    assert P.pages_min <= pages <= P.pages_max or pages == 0
    assert 1 <= sleep <= P.sleep_max_ms


def test_guest_saved_attributes_the_sharing_pages():
    o = obs(sharing=3000, shared=1000)
    # a guest holding 2000 of the 4000 merged mappings saves half of the 3000 pages
    assert guest_saved(2000, o) == 1500 * 4096
    assert guest_saved(0, o) == 0
    assert guest_saved(100, obs(sharing=0, shared=0)) == 0


costs = st.floats(min_value=1e-7, max_value=5e-5)


@settings(max_examples=300, deadline=None)
@given(cost=costs, ticks=st.integers(min_value=40, max_value=120),
       gained=st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=8),
       level=st.sampled_from([HostState.NORMAL, HostState.SOFT, HostState.HARD]),
       mode=st.sampled_from([KsmMode.AUTO, KsmMode.ON]))
def test_steady_state_never_exceeds_the_cpu_budget(cost, ticks, gained, level, mode):
    """Feed the policy a ksmd that costs what its settings predict at ``cost`` a page and
    whose savings stop growing; once they have, every decision keeps within the steady
    budget, and at every tick within the budget of its phase."""
    need = replace(SHORT, host_state=level)
    state: KsmState | None = None
    t, cpu, scanned, sharing, scans = 0.0, 0.0, 0, 50_000, 0
    run, pages, sleep = 0, 100, 20
    decisions = []
    for i in range(ticks):
        # ksmd does what it was told for a second
        if run:
            used = predicted_cpu(pages, sleep, cost)
            cpu += used
            scanned += int(used / cost)
            scans += 1
            if i < len(gained):
                sharing += gained[i] * 100
        t += 1.0
        o = KsmObs(t, run, pages, sleep, sharing // 4, sharing, scans, cpu, scanned)
        d = ksm_policy(mode, o, need, state, P)
        state = d.state
        decisions.append(d)
        if d.run:
            run, pages, sleep = 1, d.pages_to_scan, d.sleep_ms
        else:
            run = 0
        assert d.predicted <= d.budget + 1e-9
    steady = [i for i, d in enumerate(decisions) if d.phase == "steady"]
    assert steady, [d.reason for d in decisions][-3:]
    for d in decisions[steady[0]:]:
        assert d.phase == "steady" and d.budget <= P.cpu_steady
    # what ksmd really costs (at ``cost``, not the policy's estimate), once it has been
    # measured: a scanner too slow to measure in a tick is measured over several
    measured = [d for d in decisions[steady[0]:] if d.state.cost is not None]
    if len(decisions) - steady[0] >= 30:
        assert measured
    for d in measured[3:]:
        assert not d.run or predicted_cpu(d.pages_to_scan, d.sleep_ms, cost) <= P.cpu_steady


def test_the_cost_is_measured_over_smart_scan_s_whole_cycle():
    """ksmd with smart_scan: 8 scans at 0.3 us a page, then one at 2 us (it looks at every
    page again). Sampled per scan the estimate swung with the cycle; over 9 scans it is
    the cycle's average, and holds still from one cycle to the next."""
    cheap, dear, per_scan = 0.3e-6, 2.0e-6, 10_000
    state: KsmState | None = None
    t, cpu, scanned, costs = 0.0, 0.0, 0, []
    for scan in range(1, 5 * P.cost_scans + 1):       # one full scan a tick
        cpu += per_scan * (dear if scan % P.cost_scans == 0 else cheap)
        scanned += per_scan
        t += 1.0
        o = KsmObs(t, 1, 1000, 100, 1000, 3000, scan, cpu, scanned)
        d = ksm_policy(KsmMode.ON, o, SHORT, state, P)
        state = d.state
        costs.append(state.cost)
    average = (8 * cheap + dear) / 9
    settled = [c for c in costs[3 * P.cost_scans:] if c is not None]
    assert settled and all(abs(c - average) / average < 0.15 for c in settled), \
        (average, settled)
    # within a cycle the estimate does not move
    assert len(set(costs[3 * P.cost_scans:4 * P.cost_scans])) <= 2
