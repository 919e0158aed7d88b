"""History in SQLite: downsampling, retention, schema version, crash safety."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consolidator.errors import StateError
from consolidator.report.history import (SCHEMA_VERSION, History,
                                        Retention, open_db, percentile)

T0 = 1_800_000_000.0          # a minute- and hour-aligned epoch second


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


samples = st.lists(st.tuples(st.floats(0, 7200, allow_nan=False),
                             st.floats(0, 4, allow_nan=False),
                             st.integers(0, 1 << 30)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(samples)
def test_aggregates_equal_the_aggregates_of_the_raw_data(tmp_path, rows):
    db_path = tmp_path / f"h{abs(hash(tuple(rows)))}.sqlite"
    h = History(db_path, Retention(raw=10 ** 9, minute=10 ** 9, hour=10 ** 9))
    seen: dict[float, tuple[float, int]] = {}
    for off, cpu, ws in rows:
        t = T0 + round(off, 3)
        seen[t] = (cpu, ws)                   # INSERT OR REPLACE: the last one wins
        h.record(t, {"cpu": cpu, "mem_available": ws}, {"g": {"cpu": cpu, "ws": ws}})
    h.maintain(T0 + 3 * 3600)
    for res, size in (("1m", 60), ("1h", 3600)):
        buckets: dict[float, list[tuple[float, int]]] = {}
        for t, v in seen.items():
            buckets.setdefault(math.floor(t / size) * size, []).append(v)
        got = {r[0]: r[1:] for r in h.db.execute(
            "SELECT t, n, cpu_min, cpu_mean, cpu_max, cpu_p95, ws_p95 FROM agg_guest "
            "WHERE res = ? AND guest = 'g'", (res,))}
        assert set(got) == set(buckets)
        for b, vals in buckets.items():
            cpus = [c for c, _ in vals]
            n, mn, mean, mx, p95, ws95 = got[b]
            assert n == len(vals)
            assert close(mn, min(cpus)) and close(mx, max(cpus))
            assert close(mean, sum(cpus) / len(cpus)) and close(p95, percentile(cpus, 0.95))
            assert close(ws95, percentile([w for _, w in vals], 0.95))
        hosts = {r[0]: r[1] for r in h.db.execute(
            "SELECT t, cpu_max FROM agg_host WHERE res = ?", (res,))}
        assert {b: max(c for c, _ in v) for b, v in buckets.items()} == \
            {b: v for b, v in hosts.items()}
    h.close()


def test_percentile_matches_numpy_linear():
    assert percentile([1, 2, 3, 4, 5], 0.95) == 4.8
    assert percentile([7], 0.95) == 7
    assert math.isnan(percentile([], 0.5))


def test_retention_and_raw_kept_until_its_hour_is_aggregated(tmp_path):
    h = History(tmp_path / "r.sqlite", Retention(raw=600, minute=3 * 3600, hour=10 * 86400))
    for i in range(0, 5 * 3600, 30):
        h.record(T0 + i, {"cpu": 1.0}, {"g": {"cpu": 1.0}})
    now = T0 + 5 * 3600
    h.maintain(now)
    first_raw = h.db.execute("SELECT MIN(t) FROM raw_host").fetchone()[0]
    assert first_raw >= now - 3600 - 30          # raw kept back to the last full hour
    first_min = h.db.execute("SELECT MIN(t) FROM agg_host WHERE res='1m'").fetchone()[0]
    assert first_min >= now - 3 * 3600 - 60
    hours = h.db.execute("SELECT COUNT(*) FROM agg_host WHERE res='1h'").fetchone()[0]
    assert hours == 5
    h.maintain(now + 20 * 86400)                  # long after: everything ages out
    assert h.db.execute("SELECT COUNT(*) FROM agg_host").fetchone()[0] == 0


def test_schema_version_and_wal(tmp_path):
    db = open_db(tmp_path / "v.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match=f"history schema {SCHEMA_VERSION + 1}, this "
                                         f"consolidator reads {SCHEMA_VERSION}"):
        open_db(tmp_path / "v.sqlite")


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from consolidator.report.history import History
h = History({path!r})
i = 0
while True:
    h.record({t0} + i, {{"cpu": float(i)}},
             {{f"g{{k}}": {{"cpu": float(i), "ws": i}} for k in range(20)}})
    if i % 50 == 0:
        print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_write_leaves_a_sound_database(tmp_path):
    path = tmp_path / "crash.sqlite"
    p = subprocess.Popen([sys.executable, "-c", WRITER.format(
        root=str(Path(__file__).resolve().parents[2]), path=str(path), t0=T0)],
        stdout=subprocess.PIPE, text=True)
    for _ in range(5):                       # let it write a few hundred intervals
        p.stdout.readline()
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = db.execute("SELECT COUNT(*) FROM raw_host").fetchone()[0]
    assert n >= 200
    # every committed interval is whole: a host row and its 20 guest rows, t contiguous
    ts = [r[0] for r in db.execute("SELECT t FROM raw_host ORDER BY t")]
    assert ts == [T0 + i for i in range(len(ts))]
    per = db.execute("SELECT t, COUNT(*) FROM raw_guest GROUP BY t").fetchall()
    assert len(per) == len(ts) and all(c == 20 for _, c in per)
    db.close()


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e9)), min_size=0, max_size=2500),
       st.integers(1, 700))
def test_thin_keeps_at_most_limit_points_and_every_value_once(values, limit):
    from consolidator.report.history import thin
    pts = [(float(i), v) for i, v in enumerate(values)]
    known = [(t, v) for t, v in pts if v is not None]
    out = thin(pts, limit)
    assert len(out) == min(len(known), limit)
    if len(known) > limit:
        # buckets partition the points: bucket means weighted by size give the overall mean
        n = len(known)
        sizes = [(i + 1) * n // limit - i * n // limit for i in range(limit)]
        total = sum(v * k for (_, v), k in zip(out, sizes))
        assert math.isclose(total, sum(v for _, v in known), rel_tol=1e-9, abs_tol=1e-3)
        assert all(a[0] < b[0] for a, b in zip(out, out[1:]))
    else:
        assert out == known


def test_a_corrupt_database_is_a_clear_error_for_writer_and_reader(tmp_path):
    """It used to surface as 'internal error: DatabaseError'."""
    from consolidator.report.history import open_db
    bad = tmp_path / "history.sqlite"
    bad.write_bytes(b"this is not a database, it only has the name of one" * 100)
    for readonly in (False, True):
        with pytest.raises(StateError, match="not a usable history database") as ei:
            open_db(bad, readonly=readonly)
        assert "move it aside" in ei.value.hint


def test_the_reader_checks_the_schema_version(tmp_path):
    from consolidator.report.history import open_db
    path = tmp_path / "history.sqlite"
    open_db(path).execute("PRAGMA user_version=7")
    with pytest.raises(StateError, match="history schema 7, this consolidator reads 3"):
        open_db(path, readonly=True)


def test_a_version_1_file_gains_the_io_and_ksm_columns_and_keeps_its_samples(tmp_path):
    """The format of the stop before I/O was measured: its samples stay, and the new
    metrics are recorded beside them."""
    import sqlite3
    from consolidator.report.history import History, _agg_cols
    path = tmp_path / "history.sqlite"
    v1_host = ("cpu", "mem_available", "mem_used", "psi_mem", "psi_cpu", "budget")
    v1_guest = ("cpu", "ws", "available", "balloon", "cgmem", "max")
    db = sqlite3.connect(path)
    db.executescript(
        f"CREATE TABLE raw_host (t REAL PRIMARY KEY, {', '.join(m + ' REAL' for m in v1_host)});"
        f"CREATE TABLE raw_guest (t REAL, guest TEXT, state TEXT, "
        f"{', '.join(m + ' REAL' for m in v1_guest)}, PRIMARY KEY (guest, t));"
        f"CREATE TABLE agg_host (res TEXT, t REAL, n INTEGER, "
        f"{', '.join(c + ' REAL' for c in _agg_cols(v1_host))}, PRIMARY KEY (res, t));"
        f"CREATE TABLE agg_guest (res TEXT, t REAL, guest TEXT, n INTEGER, "
        f"{', '.join(c + ' REAL' for c in _agg_cols(v1_guest))}, PRIMARY KEY (res, guest, t));"
        "CREATE TABLE marks (name TEXT PRIMARY KEY, t REAL);"
        "INSERT INTO raw_host (t, cpu) VALUES (10.0, 0.5);"
        "INSERT INTO raw_guest (t, guest, cpu) VALUES (10.0, 'g', 0.25);"
        "PRAGMA user_version=1;")
    db.commit()
    db.close()
    h = History(path)
    h.record(11.0, {"cpu": 1.0, "disk_bps": 2e6, "ksm_saved": 5e6},
             {"g": {"cpu": 0.5, "disk_wr": 1e6, "ksm_saved": 4096.0}}, maintain=False)
    rows = h.db.execute("SELECT t, cpu, disk_wr, ksm_saved FROM raw_guest ORDER BY t").fetchall()
    assert rows == [(10.0, 0.25, None, None), (11.0, 0.5, 1e6, 4096.0)]
    assert h.db.execute("PRAGMA user_version").fetchone()[0] == 3
    cols = {r[1] for r in h.db.execute("PRAGMA table_info(agg_guest)")}
    assert {"disk_wr_p95", "net_tx_max", "ksm_saved_p95"} <= cols
    cols = {r[1] for r in h.db.execute("PRAGMA table_info(agg_host)")}
    assert {"ksm_saved_max", "ksm_cpu_mean", "ksm_fleet_p95"} <= cols
    h.close()


def test_the_database_and_its_wal_are_for_root_only(tmp_path):
    from consolidator.report.history import History
    h = History(tmp_path / "history.sqlite")
    h.record(1.0, {"cpu": 1.0}, {"g": {"cpu": 1.0}})
    for f in ("history.sqlite", "history.sqlite-wal"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o600, f
    h.close()
