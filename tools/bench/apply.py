#!/usr/bin/env python3
"""Apply benchmark: the whole product against a bare launch of the same QEMU argv.

Measured in this run:
  - `consolidator apply` of N (8) builtin guests, each with a NIC, cold: no supervisor
    runs and no guest exists, so the supervisor's start is inside the clock;
  - the floor: the same argv launched in parallel by a bare script, inside netns and
    cgroups made beforehand (not timed), READY seen on the serial logs. Ratio target <= 1.05;
  - a no-op re-apply with 8 and with 20 guests;
  - the supervisor's RSS with 0, 8 and 20 guests, and what each guest adds;
  - the supervisor's CPU % at idle with 8 guests.
Run as root: python tools/bench/apply.py [--guests 8] [--many 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CACHE = os.environ.get("CONSOLIDATOR_IMAGE_CACHE", "/var/tmp/consolidator-test-images")


def inventory(inst: str, n: int) -> str:
    lines = [f"instance: {inst}", "host:", f"  fabric_netns: {inst}-fab",
             "  overcommit: {cpus: 32, memory: 4}", "networks:",
             "  lan: {subnet: 10.90.0.0/24, gateway: 10.90.0.1}", "guests:"]
    for i in range(n):
        lines.append(f"  g{i:02d}: {{memory: {{max: 192MiB}}, "
                     f"nics: [{{network: lan, ip: 10.90.0.{10 + i}}}]}}")
    return "\n".join(lines) + "\n"


class Fleet:
    def __init__(self, n: int) -> None:
        self.inst = "b" + uuid.uuid4().hex[:7]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-apply-"))
        self.inv = self.dir / "inventory.yaml"
        self.inv.write_text(inventory(self.inst, n))
        self.env = {**os.environ, "CONSOLIDATOR_STATE_DIR": str(self.dir / "state"),
                    "CONSOLIDATOR_IMAGE_CACHE": CACHE}

    def cli(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        cmd = [sys.executable, "-m", "consolidator", *args]
        if args[0] in ("apply", "plan"):
            cmd += ["-f", str(self.inv)]
        t = time.monotonic()
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=ROOT)
        took = time.monotonic() - t
        if res.returncode != 0:
            raise SystemExit(f"{args}: {res.stdout}\n{res.stderr}")
        return took, res

    def supervisor(self):
        import psutil
        pid = int((self.dir / "state" / "supervisor" / "pid").read_text())
        return psutil.Process(pid)

    def destroy(self) -> None:
        subprocess.run([sys.executable, "-m", "consolidator", "destroy", "--yes", "--purge"],
                       env=self.env, capture_output=True, cwd=ROOT)
        from consolidator.daemon import teardown
        teardown.collect(teardown.Scope(self.inst, f"{self.inst}-fab"))
        shutil.rmtree(self.dir, ignore_errors=True)


def bare(n: int) -> float:
    """The floor: netns, taps, bridge and cgroups made first (untimed), then the same
    argv spawned in parallel with the same placement, READY watched on serial logs."""
    from consolidator.daemon.executor import Executor
    from consolidator.hostfacts import HostFacts
    from consolidator.model import parse_fleet
    from consolidator.state import StateDir
    from consolidator.vm.handles import Opened
    from consolidator.vm.qemu import build_argv
    inst = "b" + uuid.uuid4().hex[:7]
    d = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    fleet = parse_fleet(inventory(inst, n), "b.yaml", HostFacts.probe())
    ex = Executor(fleet, StateDir(d / "state").ensure())
    os.environ["CONSOLIDATOR_IMAGE_CACHE"] = CACHE
    ex.image_cache = Path(CACHE)
    procs = []
    try:
        for name, spec in fleet.networks.items():
            ex.create_network(name, spec)
        prepared = [ex.prepare_guest(g) for g in fleet.guests.values()]
        for _, g, _ in prepared:
            g.paths.dir.mkdir(parents=True, exist_ok=True)
            g.paths.serial_log.touch()
        t0 = time.monotonic()
        for (wiring, g, ident), intent in zip(prepared, fleet.guests.values()):
            pl = ex.placement(intent, wiring, ident)        # the same uid, jail, cgroup, netns
            opened = Opened(g.spec, pl.tap_fds)
            procs.append(subprocess.Popen(build_argv(g.spec, opened.handles),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          pass_fds=opened.handles.fds(),
                                          preexec_fn=pl.preexec))
            opened.close()
            pl.close()
        pending = {g.paths.serial_log for _, g, _ in prepared}
        while pending:
            for p in list(pending):
                if b"CONSOLIDATOR-READY" in p.read_bytes():
                    pending.discard(p)
            time.sleep(0.01)
        return time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        ex.destroy()
        ex.ids.release_state(str(ex.state.root.resolve()))
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--many", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    from consolidator.vm.image import build_tiny
    build_tiny(Path(CACHE))
    ours, floor, noop8, idle_cpu, rss = [], [], [], [], {}
    for run in range(a.runs):
        floor.append(bare(a.guests))
        f0 = Fleet(a.guests)
        try:
            f0.cli("status")                      # a supervisor with no guests: its RSS
            rss.setdefault(0, []).append(f0.supervisor().memory_info().rss)
        finally:
            f0.destroy()
        f = Fleet(a.guests)
        try:
            # cold: no supervisor runs and no guest exists; `apply` starts the supervisor
            # inside the clock, as an operator's first apply on a stopped host does
            took, _ = f.cli("apply")
            ours.append(took)
            noop8.append(f.cli("apply")[0])
            sup = f.supervisor()
            rss.setdefault(a.guests, []).append(sup.memory_info().rss)
            c0, t0 = sum(sup.cpu_times()[:2]), time.monotonic()
            time.sleep(10)
            idle_cpu.append((sum(sup.cpu_times()[:2]) - c0) / (time.monotonic() - t0) * 100)
        finally:
            f.destroy()
        print(f"run {run + 1}: apply {ours[-1]:.2f}s, bare {floor[-1]:.2f}s", flush=True)
    many = Fleet(a.many)
    try:
        many.cli("apply")
        noop_many = [many.cli("apply")[0] for _ in range(3)]
        rss_many = many.supervisor().memory_info().rss
    finally:
        many.destroy()
    m = statistics.median
    MiB = 1 << 20
    r0, r8 = m(rss[0]), m(rss[a.guests])
    print(f"\n# apply benchmark, medians of {a.runs} (floor measured in the same run)")
    print(f"apply {a.guests} guests, cold (supervisor stopped, no guests; its start "
          f"inside the clock) -> all READY : {m(ours):6.2f} s")
    print(f"bare parallel launch, same argv (floor)   : {m(floor):6.2f} s")
    print(f"ratio                                     : {m(ours) / m(floor):6.2f}  "
          f"(target <= 1.05)")
    print(f"no-op re-apply, {a.guests} guests                  : {m(noop8):6.2f} s")
    print(f"no-op re-apply, {a.many} guests                 : {m(noop_many):6.2f} s")
    print(f"supervisor RSS: {r0 / MiB:.0f} MiB idle, {r8 / MiB:.0f} MiB with {a.guests}, "
          f"{rss_many / MiB:.0f} MiB with {a.many}: "
          f"{(rss_many - r0) / a.many / MiB:.2f} MiB per guest")
    print(f"supervisor CPU at idle, {a.guests} guests         : {m(idle_cpu):6.2f} %")


if __name__ == "__main__":
    main()
