#!/usr/bin/env python3
"""Soak: many guests for a long time under random load and churn; what leaks, and how fast.

N builtin guests (default 20) whose maxima exceed the budget, for --minutes (default 30),
while a seeded random driver, every --every seconds, does one of:

  - CPU load in a guest for a while (the agent's ``cpu``), or stops it;
  - memory held in a guest (the agent's ``mem``), or released;
  - a live apply (one guest's CPU shares changed);
  - a restart of a guest (``consolidator restart``);
  - a SIGKILL of a guest's QEMU (its restart policy, always, brings it back).

Every --sample seconds it reads the supervisor's RSS, open descriptors and threads, the
rebalancer's tick CPU times, and the history's size on disk. At the end it reports each
figure's slope per hour (least squares over the second half, after warm-up), the loop's
p50/p99 tick CPU time, the history's growth against the prediction (bytes per sample
measured over the first minutes, times the samples since), leftovers after destroy,
and whether every guest still runs.

Run as root: python tools/soak.py [--guests 20] [--minutes 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consolidator.daemon.restartpolicy import MAX_RESTARTS, WINDOW  # noqa: E402
from tools.fleetdir import FleetDir  # noqa: E402

HEAD = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: {budget}MiB
  overcommit: {{cpus: 16, memory: 3}}
  metrics: {{enabled: false}}
guests:
"""


class Soak(FleetDir):
    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.inst = "s" + uuid.uuid4().hex[:7]
        super().__init__(Path(tempfile.mkdtemp(prefix="soak-")))
        self.shares = {f"g{i}": 1000 for i in range(n)}
        self.actions: dict[str, int] = {}
        self.kills: dict[str, list[float]] = {}     # each guest's QEMU kills (monotonic)

    def write_inventory(self) -> None:
        text = HEAD.format(inst=self.inst, budget=self.n * 96)
        text += "".join(f"  {g}: {{memory: {{max: 128MiB, min: 64MiB}}, restart: always, "
                        f"cpu: {{shares: {s}}}}}\n" for g, s in self.shares.items())
        self.write(text)

    # ------------------------------------------------------------------ driving
    def act(self) -> None:
        g = f"g{self.rng.randrange(self.n)}"
        kind = self.rng.choices(["cpu", "mem", "apply", "restart", "kill"],
                                weights=[4, 4, 2, 1, 1])[0]
        self.actions[kind] = self.actions.get(kind, 0) + 1
        try:
            if kind == "cpu":
                self.call("agent", name=g, command="cpu",
                          arg=str(self.rng.choice([0, 0, 20, 50, 100])), timeout=20)
            elif kind == "mem":
                self.call("agent", name=g, command="mem",
                          arg=str(self.rng.choice([0, 0, 16, 32, 48])), timeout=20)
            elif kind == "apply":
                self.shares[g] = self.rng.choice([500, 1000, 2000, 4000])
                self.write_inventory()
                self.cli("apply")
            elif kind == "restart":
                self.cli("restart", g)
            else:
                pid = {x["name"]: x["pid"] for x in self.call("status")["guests"]}.get(g)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    self.kills.setdefault(g, []).append(time.monotonic())
        except Exception as e:  # noqa: BLE001 - a guest mid-restart may not answer
            self.actions[f"{kind} failed"] = self.actions.get(f"{kind} failed", 0) + 1
            if kind in ("apply",):
                print(f"  {kind} {g}: {e}", flush=True)

    def sample(self, t0: float) -> dict:
        import psutil
        pid = self.supervisor_pid()
        if pid is None:      # psutil.Process(None) would be this process
            raise RuntimeError("the supervisor is not running")
        p = psutil.Process(pid)
        hist = sum(f.stat().st_size for f in self.state.glob("history.sqlite*"))
        perf = self.call("rebalancer")
        return {"t": time.monotonic() - t0, "rss": p.memory_info().rss,
                "fds": p.num_fds(), "threads": p.num_threads(), "history": hist,
                "rows": self.rows(), "running": sum(g["state"] == "running" for g in
                                                    self.call("status")["guests"]),
                "ticks": perf["ticks"], "tick_ms": perf["tick_cpu_ms"]}

    def rows(self) -> int:
        """Raw rows in the history (host and guest samples): what grows with time, unlike
        the file, whose pages SQLite allocates and reuses in steps."""
        from consolidator.report.history import open_db
        path = self.state / "history.sqlite"
        if not path.exists():                  # before the first tick's sample
            return 0
        db = open_db(path, readonly=True)
        try:
            return sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                       for t in ("raw_host", "raw_guest"))
        finally:
            db.close()


def most_in(times: list[float], window: float) -> int:
    """The most of ``times`` that fall within any ``window`` seconds."""
    ts = sorted(times)
    return max((sum(1 for u in ts[i:] if u - t <= window) for i, t in enumerate(ts)),
               default=0)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return float("nan")
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=3.0, help="seconds between actions")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    s = Soak(a.guests, a.seed)
    samples: list[dict] = []
    ticks_ms: list[float] = []
    left: list[str] = []
    try:
        s.write_inventory()
        s.cli("apply")
        t0 = time.monotonic()
        next_sample = 0.0
        while time.monotonic() - t0 < a.minutes * 60:
            s.act()
            if time.monotonic() - t0 >= next_sample:
                smp = s.sample(t0)
                samples.append(smp)
                ticks_ms += smp.pop("tick_ms")[-int(a.sample):]
                next_sample += a.sample
                print(f"{smp['t']:7.0f}s rss {smp['rss'] / 2**20:6.1f} MiB  fds "
                      f"{smp['fds']:4d}  threads {smp['threads']:3d}  history "
                      f"{smp['history'] / 2**20:6.2f} MiB  ticks {smp['ticks']}", flush=True)
            time.sleep(a.every)
        final = s.call("status")["guests"]
        running = sum(g["state"] == "running" for g in final)
        others = {g["name"]: (g["state"], g["restarts"], g["last_event"],
                              f"killed {len(s.kills.get(g['name'], []))}x, at most "
                              f"{most_in(s.kills.get(g['name'], []), WINDOW)} in "
                              f"{WINDOW:g}s (limit {MAX_RESTARTS})")
                  for g in final if g["state"] != "running"}
    finally:
        s.cli("destroy", "--yes", "--purge", check=False)
        from consolidator.daemon import teardown
        left = [x.describe() for x in teardown.scan(teardown.Scope(s.inst, f"{s.inst}-fab"))]
        teardown.collect(teardown.Scope(s.inst, f"{s.inst}-fab"))
    half = [x for x in samples if x["t"] >= samples[-1]["t"] / 2]
    warm = next((x for x in samples if x["t"] >= 120), samples[min(2, len(samples) - 1)])
    per_tick = (warm["history"] - samples[0]["history"]) / max(1, warm["ticks"] -
                                                               samples[0]["ticks"])
    predicted = samples[0]["history"] + per_tick * (samples[-1]["ticks"] - samples[0]["ticks"])
    tk = sorted(ticks_ms)
    print(f"\n{a.guests} guests, {samples[-1]['t'] / 60:.1f} min, seed {a.seed}; actions: "
          f"{json.dumps(s.actions)}")
    print(f"guests running at the end: {running}/{a.guests}" +
          (f"; the others (state, restarts, last event): {others}" if others else ""))
    for key, unit, scale in (("rss", "MiB", 2**20), ("fds", "", 1), ("threads", "", 1)):
        pts = [(x["t"], x[key] / scale) for x in half]
        print(f"supervisor {key}: {samples[0][key] / scale:.1f} -> "
              f"{samples[-1][key] / scale:.1f} {unit}; slope over the second half "
              f"{slope_per_hour(pts):+.2f} {unit}/h")
    print(f"loop tick CPU: p50 {tk[len(tk) // 2]:.2f} ms, p99 {tk[int(len(tk) * 0.99)]:.2f} ms "
          f"({len(tk)} ticks)")
    print(f"history: {samples[-1]['history'] / 2**20:.2f} MiB, predicted "
          f"{predicted / 2**20:.2f} MiB from the first {warm['t']:.0f}s "
          f"(ratio {samples[-1]['history'] / predicted:.2f})")
    # by design one host row and one row per running guest each tick (no raw row is old
    # enough to be downsampled away within a soak of an hour or less)
    want = samples[0]["rows"] + sum((b["ticks"] - a["ticks"]) * (1 + b["running"])
                                    for a, b in zip(samples, samples[1:]))
    print(f"history rows: {samples[-1]['rows']}, predicted {want:.0f} (one host row and one "
          f"per running guest a tick; ratio {samples[-1]['rows'] / max(want, 1):.3f})")
    print(f"left over after destroy: {left or 'nothing'}")


if __name__ == "__main__":
    main()
