from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consolidator.daemon.restartpolicy import BACKOFF_MAX, MAX_RESTARTS, WINDOW, backoff, decide


@pytest.mark.parametrize("policy,clean,restart", [
    ("never", False, False), ("never", True, False),
    ("on-failure", False, True), ("on-failure", True, False),
    ("always", False, True), ("always", True, True),
])
def test_policies(policy, clean, restart):
    d = decide(policy, clean, (), now=100.0)
    assert d.restart is restart and not d.failed


@pytest.mark.parametrize("n,delay", [(1, 1), (2, 2), (3, 4), (4, 8), (6, 32), (7, 60), (50, 60)])
def test_backoff_doubles_from_1s_to_60s(n, delay):
    assert backoff(n) == delay


def test_gives_up_after_max_restarts_in_the_window():
    history = tuple(100.0 + i for i in range(MAX_RESTARTS))
    d = decide("always", False, history, now=110.0)
    assert d.failed and not d.restart
    # once they age out of the window, restarts resume
    d = decide("always", False, history, now=110.0 + WINDOW)
    assert d.restart and d.delay == backoff(1)


@given(st.lists(st.floats(0, 1000), max_size=20), st.floats(0, 2000),
       st.sampled_from(["always", "on-failure"]))
def test_delay_is_bounded_and_counts_only_the_window(times, now, policy):
    times = tuple(t for t in times if t <= now)
    d = decide(policy, False, times, now)
    recent = [t for t in times if now - t <= WINDOW]
    assert d.failed == (len(recent) >= MAX_RESTARTS)
    if d.restart:
        assert 1 <= d.delay <= BACKOFF_MAX
