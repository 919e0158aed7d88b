#!/usr/bin/env python3
"""KSM benchmark: what the policy saves and what ksmd costs under it, against fixed
aggressive settings, on the same idle guests in the same run.

One fleet of N idle builtin guests (256 MiB each) whose maxima exceed the budget (memory
is short, so ``auto`` merges). Two phases of ``--seconds`` each, from nothing merged:

  - aggressive: host.ksm off, and ksmd set by hand to a fixed high rate (ksmtuned's
    ceiling: 1250 pages every 10 ms);
  - policy: everything unmerged, then host.ksm auto applied live.

For each: the memory saved at the end (pages_sharing), per guest, and ksmd's CPU over
the whole phase and over its last ``--tail`` seconds (steady state). Targets: the policy
saves at least 80 % of what the aggressive settings save, at a quarter of the steady CPU
or less. ``--debian`` adds the same for 2 Debian 12 guests (the CI's cached image).

Run as root: python tools/bench/ksm.py [--guests 8] [--seconds 90]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rebalance import Fleet  # noqa: E402

from consolidator.sched.ksmfs import KSM_DIR, ksmd_pid  # noqa: E402

MiB = 1 << 20
AGGRESSIVE = {"pages_to_scan": 1250, "sleep_millisecs": 10}
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")

TINY = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: @BUDGET@MiB
  overcommit: {cpus: 8}
  ksm: @MODE@
  metrics: {enabled: false}
guests:
@GUESTS@
"""

DEBIAN = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: 1200MiB
  ksm: @MODE@
  image_roots: [@ROOT@]
  metrics: {enabled: false}
images:
  deb12: {disk: @DISK@, os: debian12, firmware: uefi}
guests:
  web1: {image: deb12, machine: q35, memory: {max: 768MiB, min: 384MiB}, ready: agent}
  web2: {image: deb12, machine: q35, memory: {max: 768MiB, min: 384MiB}, ready: agent}
"""


def read(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def write(name: str, v: int) -> None:
    (KSM_DIR / name).write_text(str(v))


def cpu() -> float:
    return int(Path(f"/proc/{ksmd_pid()}/schedstat").read_text().split()[0]) / 1e9


def unmerge() -> None:
    write("run", 2)
    end = time.monotonic() + 60
    while read("pages_sharing") and time.monotonic() < end:
        time.sleep(0.5)
    write("run", 0)


def phase(seconds: float, tail: float) -> dict[str, float]:
    """Watch ksmd for ``seconds``: savings at the end, CPU overall and in the tail."""
    c0, t0 = cpu(), time.monotonic()
    c_tail = None
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        if c_tail is None and time.monotonic() - t0 >= seconds - tail:
            c_tail, t_tail = cpu(), time.monotonic()
    c1, t1 = cpu(), time.monotonic()
    return {"saved": read("pages_sharing") * 4096, "cpu": (c1 - c0) / (t1 - t0),
            "tail_cpu": (c1 - c_tail) / (t1 - t_tail), "cpu_s": c1 - c0}


def run(text: str, n: int, seconds: float, tail: float, label: str) -> None:
    f = Fleet(text.replace("@MODE@", "off"))
    try:
        f.cli("apply")
        time.sleep(5)                                        # the guests settle
        unmerge()
        for k, v in AGGRESSIVE.items():
            write(k, v)
        write("run", 1)
        agg = phase(seconds, tail)
        unmerge()
        f.write(text.replace("@MODE@", "auto"))
        f.cli("apply")                                       # live: host settings only
        pol = phase(seconds, tail)
    finally:
        f.destroy()
    print(f"\n{label}: {n} guests, {seconds:.0f}s a phase, steady = the last {tail:.0f}s")
    print(f"{'':28}{'policy':>14}{'aggressive':>14}{'ratio':>8}")
    for key, what, fmt in (("saved", "memory saved", lambda v: f"{v / MiB:.1f} MiB"),
                           ("saved_pg", "  per guest", lambda v: f"{v / MiB:.1f} MiB"),
                           ("cpu", "ksmd CPU, whole phase", lambda v: f"{v * 100:.2f}%"),
                           ("tail_cpu", "ksmd CPU, steady", lambda v: f"{v * 100:.2f}%"),
                           ("cpu_s", "ksmd CPU-seconds", lambda v: f"{v:.2f} s")):
        a = agg["saved"] / n if key == "saved_pg" else agg[key]
        p = pol["saved"] / n if key == "saved_pg" else pol[key]
        print(f"{what:28}{fmt(p):>14}{fmt(a):>14}{(p / a if a else float('nan')):>8.2f}")
    print(f"targets: savings ratio >= 0.80 (got {pol['saved'] / max(agg['saved'], 1):.2f}); "
          f"steady CPU ratio <= 0.25 (got {pol['tail_cpu'] / max(agg['tail_cpu'], 1e-9):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--tail", type=float, default=30)
    ap.add_argument("--debian", action="store_true", help="also 2 Debian 12 guests")
    ap.add_argument("--no-tiny", action="store_true", help="only the Debian guests")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    # a SIGTERM unwinds too: the fleet is destroyed and KSM put back as found
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    found = {k: read(k) for k in KNOBS}
    try:
        guests = "\n".join(f"  g{i}: {{memory: {{max: 256MiB, min: 96MiB}}}}"
                           for i in range(a.guests))
        budget = a.guests * 256 * 3 // 4                  # maxima over the budget: short
        if not a.no_tiny:
            run(TINY.replace("@GUESTS@", guests).replace("@BUDGET@", str(budget)), a.guests,
                a.seconds, a.tail, "builtin tiny guests, idle")
        if a.debian:
            from consolidator.vm.osimage import find_built
            cache = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE",
                                        "/var/tmp/consolidator-test-images"))
            img = find_built(cache, "bookworm", "uefi")
            if img is None:
                raise SystemExit(f"no Debian 12 UEFI image in {cache}: run the suite first")
            run(DEBIAN.replace("@ROOT@", str(img.dir)).replace("@DISK@", str(img.disk)), 2,
                a.seconds * 2, a.tail, "Debian 12 guests, idle")
    finally:
        unmerge()
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            write(k, found[k])


if __name__ == "__main__":
    main()
