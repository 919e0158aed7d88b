#!/usr/bin/env python3
"""Apply benchmark: the whole product against a bare launch of the same QEMU argv.

Measured in this run, each next to its bare baseline where one exists:
  - `consolidator apply` of N (8) builtin guests, each with a NIC, cold: no supervisor
    runs and no guest exists, so the supervisor's start is inside the clock;
  - the floor: the same argv launched in parallel by a bare script, inside netns and
    cgroups made beforehand (not timed), READY seen on the serial logs. Ratio target <= 1.05;
  - the daemon's CPU during that boot (supervisor, and the CLI);
  - the guests' QEMU CPU over --idle seconds of idling, summed, ours and bare;
  - the supervisor's CPU % at idle with 8 guests, and its RSS with 0, 8 and 20 guests;
  - status --json, status and logs -n, medians of 7;
  - graceful teardown: `destroy -y` against QMP system_powerdown of the bare QEMUs;
  - a no-op re-apply with 8 and with 20 guests.
Run as root: python tools/bench/apply.py [--guests 8] [--many 20] [--runs 3] [--idle 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare import BareFleet  # noqa: E402

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
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=ROOT)
        took = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cli_cpu = after.ru_utime + after.ru_stime - ru.ru_utime - ru.ru_stime
        if res.returncode != 0:
            raise SystemExit(f"{args}: {res.stdout}\n{res.stderr}")
        return took, res

    def supervisor(self):
        import psutil
        pid = int((self.dir / "state" / "supervisor" / "pid").read_text())
        return psutil.Process(pid)

    def qemus(self) -> list[int]:
        import json
        doc = json.loads(self.cli("status", "--json")[1].stdout)
        return [g["pid"] for g in doc["guests"] if g.get("pid")]

    def destroy(self) -> None:
        subprocess.run([sys.executable, "-m", "consolidator", "destroy", "--yes", "--purge"],
                       env=self.env, capture_output=True, cwd=ROOT)
        try:                                # a supervisor with no fleet: destroy refuses
            sup = self.supervisor()
            sup.terminate()
            sup.wait(15)
        except Exception:  # noqa: BLE001 - none runs (no pid file, or it is gone): fine
            pass
        from consolidator.daemon import teardown
        teardown.collect(teardown.Scope(self.inst, f"{self.inst}-fab"))
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_s(pid: int) -> float:
    import psutil
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def idle_cpu(pids: list[int], seconds: float) -> float:
    """Seconds of CPU the processes used over ``seconds``, summed."""
    c0 = sum(cpu_s(p) for p in pids)
    time.sleep(seconds)
    return sum(cpu_s(p) for p in pids) - c0


def timed(cmd: list[str], env: dict[str, str], runs: int = 7) -> float:
    took = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT, check=True)
        took.append(time.monotonic() - t)
    return statistics.median(took)


async def powerdown(qmp_paths: list[Path], procs: list[subprocess.Popen]) -> float:
    """The floor of a graceful teardown: QMP system_powerdown to every QEMU at once, until
    every one has exited."""
    from consolidator.vm.qmp import QMP
    clients = []
    for path in qmp_paths:
        q = QMP("bench")
        await q.connect(str(path), timeout=10)
        clients.append(q)
    t0 = time.monotonic()
    await asyncio.gather(*(q.powerdown() for q in clients))
    while any(p.poll() is None for p in procs):
        await asyncio.sleep(0.005)
    took = time.monotonic() - t0
    for q in clients:
        try:
            await q.close()
        except Exception:  # noqa: BLE001 - QEMU is gone: the socket with it
            pass
    return took


def bare(n: int, idle: float) -> dict[str, float]:
    """The floor: netns, taps, bridge and cgroups made first (untimed), then the same
    argv spawned in parallel with the same placement, READY watched on serial logs."""
    os.environ["CONSOLIDATOR_IMAGE_CACHE"] = CACHE
    b = BareFleet(lambda inst, _d: inventory(inst, n))
    try:
        b.ex.image_cache = Path(CACHE)
        prepared = b.prepare()
        t0 = time.monotonic()
        for guest in prepared:
            b.spawn(*guest)
        pending = {g.paths.serial_log for _, _, g, _ in prepared}
        while pending:
            for p in list(pending):
                if b"CONSOLIDATOR-READY" in p.read_bytes():
                    pending.discard(p)
            time.sleep(0.01)
        ready = time.monotonic() - t0
        time.sleep(5)                       # settle, as the product's run does
        qemu_idle = idle_cpu([p.pid for p in b.procs], idle)
        down = asyncio.run(powerdown([g.paths.qmp for _, _, g, _ in prepared], b.procs))
        return {"ready": ready, "qemu_idle": qemu_idle, "down": down}
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--many", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idling measured")
    a = ap.parse_args()
    from consolidator.vm.image import build_tiny
    build_tiny(Path(CACHE))
    ours, floor, noop8, idle_cpu_pct, rss = [], [], [], [], {}
    boot_sup, boot_cli, q_ours, destroy, queries = [], [], [], [], []
    for run in range(a.runs):
        floor.append(bare(a.guests, a.idle))
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
            sup = f.supervisor()
            boot_sup.append(cpu_s(sup.pid))       # all of its life: the boot
            boot_cli.append(f.cli_cpu)
            time.sleep(5)
            sc0, t0 = cpu_s(sup.pid), time.monotonic()
            q_ours.append(idle_cpu(f.qemus(), a.idle))
            idle_cpu_pct.append((cpu_s(sup.pid) - sc0) / (time.monotonic() - t0) * 100)
            rss.setdefault(a.guests, []).append(sup.memory_info().rss)
            queries.append([timed([sys.executable, "-m", "consolidator", *q], f.env)
                            for q in (["status", "--json"], ["status"],
                                      ["logs", "-n", "20", "g00"])])
            noop8.append(f.cli("apply")[0])
            destroy.append(f.cli("destroy", "-y")[0])
        finally:
            f.destroy()
        print(f"run {run + 1}: apply {ours[-1]:.2f}s, bare {floor[-1]['ready']:.2f}s; "
              f"destroy {destroy[-1]:.2f}s, powerdown {floor[-1]['down']:.2f}s", flush=True)
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
    fl = {k: m([x[k] for x in floor]) for k in floor[0]}
    n = a.guests
    print(f"\n# apply benchmark, medians of {a.runs}; each baseline measured in the same run")
    print(f"apply {n} guests, cold (supervisor stopped, no guests; its start inside the "
          f"clock) -> all READY : {m(ours):6.2f} s")
    print(f"  bare parallel launch, same argv (floor)    : {fl['ready']:6.2f} s   ratio "
          f"{m(ours) / fl['ready']:.2f} (target <= 1.05)")
    print(f"daemon CPU during the boot: supervisor {m(boot_sup):.2f} s + CLI "
          f"{m(boot_cli):.2f} s (libvirt in the issue: libvirtd 0.27 s + virsh 0.12 s)")
    print(f"QEMU CPU over {a.idle:g} s idle, sum of {n}: ours {m(q_ours):.2f} s, bare "
          f"{fl['qemu_idle']:.2f} s   ratio {m(q_ours) / fl['qemu_idle']:.2f}; per guest "
          f"{m(q_ours) / n / a.idle * 100:.2f} % of a core")
    print(f"supervisor CPU at idle, {n} guests       : {m(idle_cpu_pct):6.2f} % of a core "
          f"(target <= 0.3)")
    print(f"supervisor RSS: {r0 / MiB:.0f} MiB idle, {r8 / MiB:.0f} MiB with {n}, "
          f"{rss_many / MiB:.0f} MiB with {a.many}: "
          f"{(rss_many - r0) / a.many / MiB:.2f} MiB per guest")
    qs = [m([q[i] for q in queries]) for i in range(3)]
    print(f"status --json {qs[0] * 1000:.0f} ms, status {qs[1] * 1000:.0f} ms, logs -n 20 "
          f"{qs[2] * 1000:.0f} ms (medians of 7 each; target < 80 ms)")
    print(f"destroy -y of {n}                          : {m(destroy):6.2f} s")
    print(f"  QMP powerdown of the bare {n} (floor)      : {fl['down']:6.2f} s   ratio "
          f"{m(destroy) / fl['down']:.2f} (target <= 1.2)")
    print(f"no-op re-apply, {n} guests                  : {m(noop8):6.2f} s")
    print(f"no-op re-apply, {a.many} guests                 : {m(noop_many):6.2f} s")


if __name__ == "__main__":
    main()
