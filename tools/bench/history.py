#!/usr/bin/env python3
"""History benchmark: the recording cost per interval, and the report on 7 days.

  - one sample (a host row and 20 guest rows, one transaction, WAL) per interval, as the
    supervisor records it: median and p99 over 600 intervals, with the downsampling work
    the recorder does every 10 s included in the p99. Target < 2 ms;
  - `report --window 7d` on 7 days of history for 20 guests: minute aggregates for 7 days
    and hourly ones, as retention leaves them, plus an hour of raw samples. Target < 2 s.
Each against a baseline taken in the same run: bare SQLite inserts of the same rows, and
a bare scan of the rows the report reads.
Run: python tools/bench/history.py (no root needed)
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from consolidator.report.history import (GUEST_METRICS, HOST_METRICS, History,  # noqa
                                        Retention, _agg_cols, maintain_file)

GUESTS = [f"g{i:02d}" for i in range(20)]
MiB = 1 << 20


def record_cost(n: int = 600) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        h = History(Path(d) / "h.sqlite")
        t0 = 1_800_000_000.0
        costs, maint = [], []
        for i in range(n):
            guests = {g: {"state": "running", "cpu": random.random(), "ws": 100 * MiB,
                          "available": 50 * MiB, "balloon": 200 * MiB, "cgmem": 300 * MiB,
                          "max": 256 * MiB} for g in GUESTS}
            c = time.perf_counter()
            h.record(t0 + i, {"cpu": 1.0, "mem_available": 20 << 30, "mem_used": 4 << 30,
                              "psi_mem": 0.0, "psi_cpu": 1.0, "budget": 22 << 30}, guests,
                     maintain=False)            # as the supervisor records
            costs.append((time.perf_counter() - c) * 1000)
            if i % 10 == 0:
                maint.append(maintain_file(Path(d) / "h.sqlite", Retention(),
                                           now=t0 + i) * 1000)
        h.close()
    costs.sort()
    return statistics.median(costs), costs[int(len(costs) * 0.99)], statistics.median(maint)


def bare_cost(n: int = 600) -> float:
    """Baseline: the same 21 rows per interval into one plain table each, one transaction,
    WAL and synchronous=NORMAL, no schema of ours: what SQLite itself costs."""
    import sqlite3
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(str(Path(d) / "b.sqlite"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE h (t REAL, a, b, c, d, e, f)")
        db.execute("CREATE TABLE g (t REAL, n TEXT, s TEXT, a, b, c, d, e, f)")
        costs = []
        for i in range(n):
            rows = [(float(i), g, "running", random.random(), 1.0, 2.0, 3.0, 4.0, 5.0)
                    for g in GUESTS]
            c = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO h VALUES (?, ?, ?, ?, ?, ?, ?)", (float(i), 1, 2, 3, 4, 5, 6))
            db.executemany("INSERT INTO g VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
            costs.append((time.perf_counter() - c) * 1000)
        db.close()
    return statistics.median(costs)


def bare_scan(state: Path) -> float:
    """Baseline: reading the rows the 7-day report reads, with nothing done to them."""
    import sqlite3
    db = sqlite3.connect(f"file:{state / 'history.sqlite'}?mode=ro", uri=True)
    t = time.perf_counter()
    db.execute("SELECT t, cpu_mean, mem_used_mean, budget_mean FROM agg_host "
               "WHERE res = '1m'").fetchall()
    db.execute("SELECT guest, t, cpu_mean, ws_mean, balloon_mean FROM agg_guest "
               "WHERE res = '1m'").fetchall()
    took = time.perf_counter() - t
    db.close()
    return took


def fill_week(state: Path) -> None:
    """An applied fleet of 20 guests and the history retention would leave after 7 days."""
    from consolidator.hostfacts import HostFacts
    from consolidator.model import parse_fleet
    from consolidator.state import StateDir
    inv = "host: {overcommit: {cpus: 32, memory: 4}}\nguests:\n" + "".join(
        f"  {g}: {{memory: {{max: 256MiB, min: 128MiB}}}}\n" for g in GUESTS)
    fleet = parse_fleet(inv, "b.yaml", HostFacts.probe())
    st = StateDir(state).ensure()
    st.write_applied(fleet, inv, complete=True, index=1)
    h = History(st.history_path)
    now = time.time()
    db = h.db
    rnd = random.Random(1)

    def stats(base: float) -> list[float]:
        vals = [base * (0.8 + 0.4 * rnd.random()) for _ in range(4)]
        return [min(vals), sum(vals) / 4, max(vals), sorted(vals)[-1]]

    hc = _agg_cols(HOST_METRICS)
    gc = _agg_cols(GUEST_METRICS)
    db.execute("BEGIN")
    for res, step, span in (("1m", 60, 7 * 86400), ("1h", 3600, 90 * 86400)):
        start = (now - span) // step * step
        host_rows, guest_rows = [], []
        t = start
        while t < now - step:
            host_rows.append((res, t, 60, *[x for m in HOST_METRICS for x in stats(1.0)]))
            for g in GUESTS:
                guest_rows.append((res, t, g, 60,
                                   *[x for m in GUEST_METRICS for x in stats(100.0 * MiB)]))
            t += step
        db.executemany(f"INSERT INTO agg_host (res, t, n, {', '.join(hc)}) VALUES "
                       f"({', '.join('?' * (3 + len(hc)))})", host_rows)
        db.executemany(f"INSERT INTO agg_guest (res, t, guest, n, {', '.join(gc)}) VALUES "
                       f"({', '.join('?' * (4 + len(gc)))})", guest_rows)
    db.execute("COMMIT")
    for i in range(3600):
        t = now - 3600 + i
        h.record(t, {m: 1.0 for m in HOST_METRICS},
                 {g: {"state": "running", **{m: 100.0 * MiB for m in GUEST_METRICS}}
                  for g in GUESTS})
    h.close()


def report_time(state: Path) -> tuple[float, int]:
    from consolidator.report.document import build
    times = []
    for _ in range(3):
        t = time.perf_counter()
        doc = build(state, "7d")
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(doc["charts"]["host_cpu"])


def main() -> None:
    bare = bare_cost()
    med, p99, maint = record_cost()
    with tempfile.TemporaryDirectory() as d:
        state = Path(d) / "state"
        t = time.perf_counter()
        fill_week(state)
        fill = time.perf_counter() - t
        rt, points = report_time(state)
        scan = bare_scan(state)
        t = time.perf_counter()
        from consolidator.report.document import build
        from consolidator.report.html import render
        html = render(build(state, "7d"))
        ht = time.perf_counter() - t
        size = (state / "history.sqlite").stat().st_size
    print("# history benchmark")
    print(f"record one interval, 20 guests : {med:.2f} ms median, {p99:.2f} ms p99 "
          f"(target < 2 ms)")
    print(f"  baseline: bare SQLite inserts : {bare:.2f} ms median; ratio {med / bare:.2f}")
    print(f"downsampling every 10 s (worker): {maint:.2f} ms median, off the loop")
    print(f"report --window 7d, 20 guests   : {rt:.2f} s ({points} points per series; "
          f"target < 2 s)")
    print(f"  baseline: bare scan of its rows: {scan:.2f} s; ratio {rt / scan:.2f}")
    print(f"  ... as HTML with charts       : {ht:.2f} s, {len(html) // 1024} KiB")
    print(f"database after 7 d (+90 d hourly): {size / MiB:.1f} MiB (filled in {fill:.1f} s)")


if __name__ == "__main__":
    main()
