#!/usr/bin/env python3
"""Boot benchmark: how fast a builtin guest comes up, and what QEMU costs.

Prints medians of N runs (default 5), each measured in this run:
  - spawn -> QMP greeting, and spawn -> READY, for microvm, q35 and pc under the
    accelerator this host offers;
  - the same argv launched by a bare shell with no QMP, lock or stats: the floor.
    Our overhead is the ratio of Guest.launch() to it;
  - QEMU's RSS after READY, minus the guest RAM it touched (from /proc/PID/smaps),
    for a few TCG translation-cache sizes;
  - Guest.launch() to READY confined (a uid of its own, the mount-namespace jail,
    no_new_privs) against the same launch as root with no jail: what confinement costs;
  - idle CPU of one READY guest over --idle seconds, per machine type: QEMU launched by
    Guest.launch(), the same argv launched bare, and the bare argv with the CPU model of
    before (qemu64 without ARAT, under which an idle microvm guest ticks at HZ).
Run as root: python tools/bench/boot.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from consolidator.hostfacts import HostFacts  # noqa: E402
from consolidator.model import parse_fleet  # noqa: E402
from consolidator.vm.guest import Guest  # noqa: E402
from consolidator.vm.handles import Opened  # noqa: E402
from consolidator.vm.identity import Identity  # noqa: E402
from consolidator.vm.jail import plan_jail  # noqa: E402
from consolidator.vm.placement import GuestPlacement  # noqa: E402
from consolidator.vm.image import build_tiny  # noqa: E402
from consolidator.vm.launch import VirtHost, launch_spec, prepare_boot  # noqa: E402
from consolidator.vm.qemu import Machine, RunPaths, build_argv  # noqa: E402
from consolidator.vm.qmp import QMP  # noqa: E402

CACHE = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE", "/var/tmp/consolidator-test-images"))
MiB = 1 << 20


def spec_for(workdir: Path, machine: str, tb: int | None = None):
    intent = parse_fleet("guests:\n  bench: {memory: {max: 256MiB}}\n", "b",
                             HostFacts.probe()).guests["bench"]
    built = build_tiny(CACHE)
    gdir = workdir / f"{machine}-{tb}-{time.monotonic_ns()}"
    gdir.mkdir()
    boot = prepare_boot(intent, CACHE, gdir, built=built)
    spec = launch_spec(intent, boot, RunPaths.for_guest(gdir), VirtHost.probe(),
                       tb_size_mib=tb)
    return replace(spec, machine=Machine(machine, "bench"))


def guest_ram_rss(pid: int, ram_bytes: int) -> int:
    """Rss of the guest-RAM mapping: the anonymous mapping at least as large as the RAM."""
    best = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                if size >= ram_bytes:
                    best = max(best, rss)
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                size, rss = hi - lo, 0
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    if size >= ram_bytes:
        best = max(best, rss)
    return best


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def bare(spec) -> tuple[float, float]:
    """The floor: the same argv from a shell; READY seen by polling the serial log."""
    spec.paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    spec.paths.serial_log.touch()
    opened = Opened(spec)
    argv = build_argv(spec, opened.handles)
    t0 = time.monotonic()
    p = subprocess.Popen(["sh", "-c", 'exec "$@"', "sh", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                         pass_fds=opened.handles.fds())
    opened.close()
    qmp_at = None
    try:
        while True:
            if qmp_at is None and spec.paths.qmp.exists():
                qmp_at = time.monotonic() - t0
            if b"CONSOLIDATOR-READY" in spec.paths.serial_log.read_bytes():
                return time.monotonic() - t0, qmp_at or 0.0
            if p.poll() is not None:
                raise RuntimeError("bare QEMU exited")
            await asyncio.sleep(0.005)
    finally:
        p.kill()
        p.wait()


async def ours(spec, placement=None) -> tuple[float, int, int]:
    """Guest.launch() to READY; QEMU's RSS and the guest RAM it touched, right after."""
    g = Guest(spec)
    t0 = time.monotonic()
    try:
        await g.launch(placement)
        ready = time.monotonic() - t0
        return ready, proc_rss(g.pid), guest_ram_rss(g.pid, spec.memory_mib * MiB)
    finally:
        await g.shutdown(timeout=5)


async def qmp_greeting(spec) -> float:
    spec.paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    opened = Opened(spec)
    argv = build_argv(spec, opened.handles)
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, pass_fds=opened.handles.fds())
    opened.close()
    q = QMP("bench")
    try:
        await q.connect(str(spec.paths.qmp), timeout=20, alive=lambda: p.poll() is None)
        return time.monotonic() - t0
    finally:
        await q.close()
        p.kill()
        p.wait()


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def idle_cpu(spec, seconds: float, how: str, settle: float = 3.0) -> float:
    """Percent of a core one READY guest's QEMU uses over ``seconds`` of idling.
    ``how``: "ours" (Guest.launch), "bare" (the same argv), "noarat" (bare, old CPU)."""
    if how == "ours":
        g = Guest(spec)
        await g.launch()
        pid, stop = g.pid, g.shutdown
    else:
        spec.paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec.paths.serial_log.touch()
        opened = Opened(spec)
        argv = build_argv(spec, opened.handles)
        if how == "noarat":
            argv = [("qemu64" if a == "qemu64,+arat" else a) for a in argv]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, pass_fds=opened.handles.fds())
        opened.close()
        pid = p.pid

        async def stop(timeout: float = 5) -> None:
            p.kill()
            p.wait()
        while b"CONSOLIDATOR-READY" not in spec.paths.serial_log.read_bytes():
            if p.poll() is not None:
                raise RuntimeError("bare QEMU exited")
            await asyncio.sleep(0.05)
    try:
        await asyncio.sleep(settle)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    finally:
        await stop(timeout=5)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


async def main(runs: int, machines: list[str], tbs: list[int], idle: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"# boot benchmark: {runs} runs each; accelerator "
          f"{spec_for(Path(tempfile.mkdtemp()), 'pc').accel.reason}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        print(f"\n{'machine':8} {'QMP greeting':>13} {'bare READY':>11} {'ours READY':>11} "
              f"{'ratio':>6}")
        for m in machines:
            greet, floor, mine = [], [], []
            for _ in range(runs):
                greet.append(await qmp_greeting(spec_for(work, m)))
                floor.append((await bare(spec_for(work, m)))[0])
                mine.append((await ours(spec_for(work, m)))[0])
            print(f"{m:8} {med(greet) * 1000:>10.0f} ms {med(floor):>9.2f} s {med(mine):>9.2f} s "
                  f"{med(mine) / med(floor):>6.2f}")
        print(f"\n{'idle CPU, one guest':20} {'ours':>7} {'bare argv':>10} {'ratio':>6} "
              f"{'bare, no ARAT':>14}   ({idle:g} s each, medians of {max(1, runs // 2)})")
        for m in machines:
            rows = {how: [] for how in ("ours", "bare", "noarat")}
            for _ in range(max(1, runs // 2)):
                for how in rows:
                    rows[how].append(await idle_cpu(spec_for(work, m), idle, how))
            ours_, bare_, old_ = (med(rows[h]) for h in ("ours", "bare", "noarat"))
            print(f"{m:20} {ours_:>6.2f}% {bare_:>9.2f}% {ours_ / max(bare_, 0.01):>6.2f} "
                  f"{old_:>13.2f}%")
        jail = plan_jail("qemu-system-x86_64")
        free, confined = [], []
        for _ in range(runs):
            free.append((await ours(spec_for(work, "microvm")))[0])
            pl = GuestPlacement([], None, identity=Identity(0x7FFF0000, 0x7FFF0000), jail=jail)
            try:
                confined.append((await ours(spec_for(work, "microvm"), pl))[0])
            finally:
                pl.close()
        print(f"\n{'microvm READY':14} {'as root, no jail':>17} {'confined':>9} {'ratio':>6}")
        print(f"{'':14} {med(free):>15.2f} s {med(confined):>7.2f} s "
              f"{med(confined) / med(free):>6.2f}")
        print(f"\n{'tb-size':>8} {'RSS after READY':>16} {'guest RAM touched':>18} "
              f"{'QEMU overhead':>14} {'READY':>7}")
        for tb in tbs:
            rows = [await ours(spec_for(work, "microvm", tb)) for _ in range(max(3, runs // 2))]
            rss = med([r[1] for r in rows])
            ram = med([r[2] for r in rows])
            print(f"{tb:>5} MiB {rss / MiB:>12.0f} MiB {ram / MiB:>14.0f} MiB "
                  f"{(rss - ram) / MiB:>10.0f} MiB {med([r[0] for r in rows]):>6.2f}s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--machines", default="microvm,q35,pc")
    ap.add_argument("--tb-sizes", default="32,64,256")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle measured")
    a = ap.parse_args()
    asyncio.run(main(a.runs, a.machines.split(","), [int(x) for x in a.tb_sizes.split(",")],
                     a.idle))
