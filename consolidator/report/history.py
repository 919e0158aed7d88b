"""History: one sample per rebalancer interval into SQLite, downsampled and pruned.

- **Write path**: one transaction per interval (a host row and a row per guest), WAL
  mode, ``synchronous=NORMAL``: a committed interval survives a crash of the supervisor
  (WAL is only at risk on power loss, and then only the last intervals). Cost: see
  tools/bench/history.py and the README.
- **Downsampling**: when a minute (an hour) is over, min / mean / max / p95 of every metric
  for it are computed from the *raw* samples, so that hourly percentiles are exact, not
  percentiles of percentiles. Raw samples are kept until the hour they belong to has been
  aggregated, and at least ``raw`` seconds.
- **Retention** (configurable, ``host.history``): raw 1 h, minute aggregates 7 d, hour
  aggregates 90 d.
- **Schema version** in ``PRAGMA user_version``; :func:`open_db` migrates older files.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import HistoryUnavailable, StateError

SCHEMA_VERSION = 3
HOST_METRICS = ("cpu", "mem_available", "mem_used", "psi_mem", "psi_cpu", "budget",
                "disk_bps", "io_budget", "ksm_saved", "ksm_shared", "ksm_cpu", "ksm_fleet")
GUEST_METRICS = ("cpu", "ws", "available", "balloon", "cgmem", "max",
                 "disk_rd", "disk_wr", "disk_iops", "net_rx", "net_tx", "ksm_saved")
#: metrics each schema version added: an older file gains their columns when opened
ADDED = {2: (("disk_bps", "io_budget"),
             ("disk_rd", "disk_wr", "disk_iops", "net_rx", "net_tx")),
         3: (("ksm_saved", "ksm_shared", "ksm_cpu", "ksm_fleet"), ("ksm_saved",))}
STATS = ("min", "mean", "max", "p95")
RES = {"1m": 60, "1h": 3600}


@dataclass(frozen=True)
class Retention:
    raw: float = 3600.0
    minute: float = 7 * 86400.0
    hour: float = 90 * 86400.0


def _agg_cols(metrics: Sequence[str]) -> list[str]:
    return [f"{m}_{s}" for m in metrics for s in STATS]


def _schema() -> list[str]:
    host_raw = ", ".join(f"{m} REAL" for m in HOST_METRICS)
    guest_raw = ", ".join(f"{m} REAL" for m in GUEST_METRICS)
    host_agg = ", ".join(f"{c} REAL" for c in _agg_cols(HOST_METRICS))
    guest_agg = ", ".join(f"{c} REAL" for c in _agg_cols(GUEST_METRICS))
    return [
        f"CREATE TABLE IF NOT EXISTS raw_host (t REAL PRIMARY KEY, {host_raw})",
        f"CREATE TABLE IF NOT EXISTS raw_guest (t REAL, guest TEXT, state TEXT, {guest_raw},"
        " PRIMARY KEY (guest, t))",
        "CREATE INDEX IF NOT EXISTS raw_guest_t ON raw_guest (t)",
        f"CREATE TABLE IF NOT EXISTS agg_host (res TEXT, t REAL, n INTEGER, {host_agg},"
        " PRIMARY KEY (res, t))",
        f"CREATE TABLE IF NOT EXISTS agg_guest (res TEXT, t REAL, guest TEXT, n INTEGER,"
        f" {guest_agg}, PRIMARY KEY (res, guest, t))",
        "CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, t REAL)",
    ]


def open_db(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open (and create or migrate) the history database. A file that is not a SQLite
    database, or of another schema, is a StateError that says so, for writers and readers
    alike; one that cannot be opened for now is :class:`HistoryUnavailable`. New files
    (and their WAL) are created 0600."""
    try:
        return _open(Path(path), readonly)
    except sqlite3.OperationalError as e:
        raise HistoryUnavailable(f"{path}: cannot open the history for now ({e})",
                                 hint="room on the state dir's filesystem, or its access; "
                                      "the supervisor tries again") from None
    except sqlite3.DatabaseError as e:
        raise StateError(f"{path}: not a usable history database ({e})",
                         hint="move it aside: the supervisor starts a new one, and the "
                              "report has no history until then") from None


def _open(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        _check_version(db, path, readonly=True)
        return db
    old = os.umask(0o077)
    try:
        db = sqlite3.connect(str(path), timeout=5, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        os.umask(old)
    db.execute("PRAGMA synchronous=NORMAL")
    # no checkpoint (and its fsync) inside a commit of the loop: maintain() checkpoints
    db.execute("PRAGMA wal_autocheckpoint=0")
    version = _check_version(db, path, readonly=False)
    if version < SCHEMA_VERSION:
        db.execute("BEGIN")
        if version == 0:
            for stmt in _schema():
                db.execute(stmt)
        for v, (host, guest) in sorted(ADDED.items()):
            if 0 < version < v:                 # one transaction: all of it, or none
                for table, metrics in (("host", host), ("guest", guest)):
                    for m in metrics:
                        db.execute(f"ALTER TABLE raw_{table} ADD COLUMN {m} REAL")
                    for c in _agg_cols(metrics):
                        db.execute(f"ALTER TABLE agg_{table} ADD COLUMN {c} REAL")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    return db


def _check_version(db: sqlite3.Connection, path: Path, *, readonly: bool) -> int:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION or (readonly and version != SCHEMA_VERSION):
        db.close()
        raise StateError(f"{path}: history schema {version}, this consolidator reads "
                         f"{SCHEMA_VERSION}",
                         hint="use the consolidator that wrote it, or move the file away")
    return version


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] if lo == hi else v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(values: Iterable[float | None]) -> tuple[float | None, ...]:
    v = [x for x in values if x is not None]
    if not v:
        return (None, None, None, None)
    return (min(v), sum(v) / len(v), max(v), percentile(v, 0.95))


class History:
    def __init__(self, path: Path | str, retention: Retention = Retention()) -> None:
        self.path = Path(path)
        self.retention = retention
        self.db = open_db(self.path)
        self._host_sql = (f"INSERT OR REPLACE INTO raw_host (t, {', '.join(HOST_METRICS)}) "
                          f"VALUES ({', '.join('?' * (len(HOST_METRICS) + 1))})")
        self._guest_sql = (f"INSERT OR REPLACE INTO raw_guest (t, guest, state, "
                           f"{', '.join(GUEST_METRICS)}) "
                           f"VALUES ({', '.join('?' * (len(GUEST_METRICS) + 3))})")
        self._last_maint = 0.0
        self._last_t: float | None = None

    def close(self) -> None:
        self.db.close()

    def record(self, t: float, host: dict[str, float | None],
               guests: dict[str, dict[str, Any]], *, maintain: bool = True) -> None:
        """One interval, one transaction. ``maintain=False`` leaves downsampling to
        :func:`maintain_file` (the supervisor runs it in a worker thread)."""
        db = self.db
        db.execute("BEGIN")
        try:
            if self._last_t is not None and t < self._last_t:
                # the clock stepped back: this sample may land in an aggregated bucket
                db.execute("INSERT INTO marks (name, t) VALUES ('rewind', ?) ON CONFLICT(name)"
                           " DO UPDATE SET t = MIN(t, excluded.t)", (t,))
            db.execute(self._host_sql, (t, *(host.get(m) for m in HOST_METRICS)))
            db.executemany(self._guest_sql, [
                (t, name, g.get("state"), *(g.get(m) for m in GUEST_METRICS))
                for name, g in guests.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._last_t = t if self._last_t is None else max(self._last_t, t)
        if maintain and t - self._last_maint >= 10:
            self._last_maint = t
            self.maintain(t)

    # ------------------------------------------------------------ downsampling
    def _mark(self, name: str) -> float:
        row = self.db.execute("SELECT t FROM marks WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0.0

    def maintain(self, now: float | None = None) -> None:
        """Aggregate every finished minute and hour, then prune by retention."""
        now = time.time() if now is None else now
        rewind = self.db.execute("SELECT t FROM marks WHERE name = 'rewind'").fetchone()
        for res, size in RES.items():
            self._aggregate(res, size, now, rewind[0] if rewind else None)
        if rewind:
            self.db.execute("DELETE FROM marks WHERE name = 'rewind'")
        self._prune(now)
        # move the WAL into the database here, off the loop (PASSIVE: never waits for
        # the recorder, which may be mid-transaction)
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _aggregate(self, res: str, size: int, now: float, rewind: float | None) -> None:
        db = self.db
        done = self._mark(f"agg_{res}")
        if rewind is not None and rewind < done:
            # a sample landed in a bucket already aggregated: aggregate again from there
            done = math.floor(rewind / size) * size
        first = db.execute("SELECT MIN(t) FROM raw_host WHERE t >= ?", (done,)).fetchone()[0]
        if first is None:
            return
        start = math.floor(first / size) * size
        end = math.floor(now / size) * size           # the current bucket is not over
        if start >= end:
            return
        db.execute("BEGIN")
        try:
            b = start
            while b < end:
                self._bucket(res, b, b + size)
                b += size
            db.execute("INSERT OR REPLACE INTO marks (name, t) VALUES (?, ?)",
                       (f"agg_{res}", end))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _bucket(self, res: str, lo: float, hi: float) -> None:
        db = self.db
        rows = db.execute(f"SELECT {', '.join(HOST_METRICS)} FROM raw_host "
                          "WHERE t >= ? AND t < ?", (lo, hi)).fetchall()
        if rows:
            vals = [summarize(r[i] for r in rows) for i in range(len(HOST_METRICS))]
            flat = [x for v in vals for x in v]
            db.execute(f"INSERT OR REPLACE INTO agg_host (res, t, n, "
                       f"{', '.join(_agg_cols(HOST_METRICS))}) VALUES "
                       f"({', '.join('?' * (3 + len(flat)))})", (res, lo, len(rows), *flat))
        by_guest: dict[str, list[tuple]] = {}
        for r in db.execute(f"SELECT guest, {', '.join(GUEST_METRICS)} FROM raw_guest "
                            "WHERE t >= ? AND t < ?", (lo, hi)):
            by_guest.setdefault(r[0], []).append(r[1:])
        for guest, grows in by_guest.items():
            vals = [summarize(r[i] for r in grows) for i in range(len(GUEST_METRICS))]
            flat = [x for v in vals for x in v]
            db.execute(f"INSERT OR REPLACE INTO agg_guest (res, t, guest, n, "
                       f"{', '.join(_agg_cols(GUEST_METRICS))}) VALUES "
                       f"({', '.join('?' * (4 + len(flat)))})",
                       (res, lo, guest, len(grows), *flat))

    def _prune(self, now: float) -> None:
        db = self.db
        hour_done = self._mark("agg_1h")
        raw_cut = min(now - self.retention.raw, hour_done)   # never drop un-aggregated hours
        db.execute("BEGIN")
        db.execute("DELETE FROM raw_host WHERE t < ?", (raw_cut,))
        db.execute("DELETE FROM raw_guest WHERE t < ?", (raw_cut,))
        db.execute("DELETE FROM agg_host WHERE res = '1m' AND t < ?",
                   (now - self.retention.minute,))
        db.execute("DELETE FROM agg_guest WHERE res = '1m' AND t < ?",
                   (now - self.retention.minute,))
        db.execute("DELETE FROM agg_host WHERE res = '1h' AND t < ?",
                   (now - self.retention.hour,))
        db.execute("DELETE FROM agg_guest WHERE res = '1h' AND t < ?",
                   (now - self.retention.hour,))
        db.execute("COMMIT")


def maintain_file(path: Path | str, retention: Retention, now: float | None = None) -> float:
    """Downsample and prune with a connection of its own (for a worker thread). Returns
    the seconds it took."""
    t0 = time.perf_counter()
    h = History(path, retention)
    try:
        h.maintain(now)
    finally:
        h.close()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ reading

@dataclass(frozen=True)
class Series:
    """A metric over a window: (t, value) points from the finest data covering it."""

    source: str           # "raw", "1m" or "1h"
    points: list[tuple[float, float]]

    def values(self) -> list[float]:
        return [v for _, v in self.points if v is not None]


def covered_since(db: sqlite3.Connection) -> float | None:
    row = db.execute("SELECT MIN(t) FROM (SELECT MIN(t) AS t FROM raw_host "
                     "UNION ALL SELECT MIN(t) FROM agg_host)").fetchone()
    return row[0] if row else None


def choose_source(db: sqlite3.Connection, since: float) -> str:
    """The finest series that reaches back to ``since``, or failing that, the one that
    reaches back furthest (finest first on a tie): a short history reads raw samples."""
    firsts = {
        "raw": db.execute("SELECT MIN(t) FROM raw_host").fetchone()[0],
        "1m": db.execute("SELECT MIN(t) FROM agg_host WHERE res='1m'").fetchone()[0],
        "1h": db.execute("SELECT MIN(t) FROM agg_host WHERE res='1h'").fetchone()[0],
    }
    bucket = {"raw": 60, "1m": 60, "1h": 3600}   # an aggregate's t is its bucket's start
    have = {k: v for k, v in firsts.items() if v is not None}
    if not have:
        return "raw"
    for k in ("raw", "1m", "1h"):
        if k in have and have[k] <= since + bucket[k]:
            return k
    earliest = min(have.values())
    return next(k for k in ("raw", "1m", "1h") if k in have and have[k] <= earliest + bucket[k])


def guest_table(db: sqlite3.Connection, metrics: Sequence[str], since: float,
                source: str | None = None) -> dict[str, dict[str, Series]]:
    """Several guest metrics in one pass: {guest: {metric: Series}}."""
    src = source or choose_source(db, since)
    cols = ", ".join(metrics if src == "raw" else [f"{m}_mean" for m in metrics])
    if src == "raw":
        q = db.execute(f"SELECT guest, t, {cols} FROM raw_guest WHERE t >= ? ORDER BY guest, t",
                       (since,))
    else:
        q = db.execute(f"SELECT guest, t, {cols} FROM agg_guest WHERE res = ? AND t >= ? "
                       "ORDER BY guest, t", (src, since))      # the primary key's order
    acc: dict[str, list[list[tuple[float, float]]]] = {}
    for row in q:
        lists = acc.get(row[0])
        if lists is None:
            lists = acc[row[0]] = [[] for _ in metrics]
        t = row[1]
        for i, v in enumerate(row[2:]):
            lists[i].append((t, v))
    return {g: {m: Series(src, lists[i]) for i, m in enumerate(metrics)}
            for g, lists in acc.items()}


def host_table(db: sqlite3.Connection, metrics: Sequence[str], since: float,
               source: str | None = None) -> dict[str, Series]:
    src = source or choose_source(db, since)
    cols = ", ".join(metrics if src == "raw" else [f"{m}_mean" for m in metrics])
    if src == "raw":
        rows = db.execute(f"SELECT t, {cols} FROM raw_host WHERE t >= ? ORDER BY t",
                          (since,)).fetchall()
    else:
        rows = db.execute(f"SELECT t, {cols} FROM agg_host WHERE res = ? AND t >= ? "
                          "ORDER BY t", (src, since)).fetchall()
    return {m: Series(src, [(r[0], r[i + 1]) for r in rows]) for i, m in enumerate(metrics)}


def thin(points: list[tuple[float, float]], limit: int = 600) -> list[tuple[float, float]]:
    """At most ``limit`` points: bucket averages, for charts."""
    pts = [(t, v) for t, v in points if v is not None]
    n = len(pts)
    if n <= limit:
        return pts
    ts, vs = zip(*pts)                     # sums over tuple slices run in C
    out = []
    for i in range(limit):
        lo, hi = i * n // limit, (i + 1) * n // limit      # n > limit: never empty
        k = hi - lo
        out.append((sum(ts[lo:hi]) / k, sum(vs[lo:hi]) / k))
    return out
