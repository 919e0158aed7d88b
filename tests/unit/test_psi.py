"""The memory-pressure watch's fallback rule (pure parts)."""

from __future__ import annotations

from collections import deque

import pytest

from consolidator.sched.psi import some_total, stalled

TEXT = ("some avg10=0.00 avg60=0.00 avg300=0.00 total=1234567\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=42\n")


def test_some_total_reads_the_some_line():
    assert some_total(TEXT) == 1234567
    with pytest.raises(ValueError):
        some_total("full avg10=0.00 total=1\n")


def test_stalled_applies_the_triggers_rule_over_a_sliding_window():
    s: deque = deque()
    t0 = 100.0
    assert not stalled(s, t0, 0)
    assert not stalled(s, t0 + 0.1, 50_000)           # 50 ms stalled so far
    assert stalled(s, t0 + 0.2, 100_000)              # 100 ms within the window
    # a second later the old readings have left the window: no new stall, no firing
    assert not stalled(s, t0 + 1.3, 100_000)
    assert not stalled(s, t0 + 1.4, 150_000)          # 50 ms in this window
    assert stalled(s, t0 + 1.5, 260_000)


def test_slow_stalls_spread_over_more_than_a_window_do_not_fire():
    s: deque = deque()
    fired = [stalled(s, 100.0 + i * 0.1, i * 9_000) for i in range(40)]  # 90 ms a second
    assert not any(fired)
