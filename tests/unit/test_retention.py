"""The keep rules of backups, and when a guest's next backup is due (pure)."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.backup.retention import Keep, due, select

UTC = dt.timezone.utc
DAY = 86400.0
T0 = dt.datetime(2026, 11, 2, 12, tzinfo=UTC).timestamp()      # a Monday, noon


def ids(*days_hours: tuple[int, int]) -> list[tuple[str, float]]:
    return [(f"d{d}h{h}", T0 + d * DAY + h * 3600) for d, h in days_hours]


def test_last_keeps_the_newest():
    d = select(ids((0, 0), (0, 1), (0, 2)), Keep(last=2, daily=0, weekly=0), UTC)
    assert d.keep == ("d0h2", "d0h1") and d.remove == ("d0h0",)


def test_daily_keeps_the_newest_of_each_day_not_already_kept():
    backups = ids((0, 1), (0, 5), (1, 1), (1, 6), (2, 3))
    d = select(backups, Keep(last=1, daily=2, weekly=0), UTC)
    # last 1 keeps day 2's; days 1 and 0 then each keep their newest
    assert d.keep == ("d2h3", "d1h6", "d0h5")
    assert set(d.remove) == {"d1h1", "d0h1"}
    assert d.why["d1h6"] == "daily 2026-11-03"


def test_weekly_counts_iso_weeks():
    backups = ids((0, 0), (3, 0), (7, 0), (14, 0), (15, 0))
    d = select(backups, Keep(last=0, daily=0, weekly=2), UTC)
    assert d.keep == ("d15h0", "d7h0")      # week of day 14-15, then the week of day 7


def test_rules_that_keep_nothing_still_keep_the_newest():
    d = select(ids((0, 0), (1, 0)), Keep(last=0, daily=0, weekly=0), UTC)
    assert d.keep == ("d1h0",) and d.why["d1h0"] == "newest"


def test_due():
    assert not due(None, None, 100.0)
    assert due(None, 3600.0, 100.0)
    assert not due(1000.0, 3600.0, 4000.0)
    assert due(1000.0, 3600.0, 4600.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 60 * DAY), min_size=1, max_size=40, unique=True),
       st.integers(0, 5), st.integers(0, 5), st.integers(0, 3))
def test_every_backup_is_kept_or_removed_once_and_the_counts_hold(times, last, daily, weekly):
    backups = [(f"b{i}", T0 + t) for i, t in enumerate(times)]
    d = select(backups, Keep(last, daily, weekly), UTC)
    assert sorted(d.keep + d.remove) == sorted(b for b, _ in backups)
    assert not set(d.keep) & set(d.remove)
    newest = max(backups, key=lambda b: (b[1], b[0]))[0]
    assert newest in d.keep
    assert len(d.keep) <= max(1, min(len(backups), last + daily + weekly))
