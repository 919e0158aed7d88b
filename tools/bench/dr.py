#!/usr/bin/env python3
"""Disaster-recovery benchmark: snapshots, backups, restores and clones, each against a
baseline measured in the same run.

  - the freeze window of `snapshot create --all` over N (8) running guests (agent
    freeze, disk snapshots, thaw), and of `--all --memory` (pause, save RAM, resume),
    against a bare QMP `stop` + `cont` of N QEMUs of the same argv;
  - an incremental backup of a 1 GiB data disk with 16 MiB changed, against `dd`
    copying 16 MiB (target: at most 3x);
  - a restore to READY (stop, disks from the backup, start), against a cold restart of
    the same guest;
  - a `--memory` revert of a running guest, against a cold boot of it (target: faster);
  - linked clones: 8 from one template in one apply, time and disk per clone.
Run as root: python tools/bench/dr.py [--guests 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
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


def inventory(inst: str, n: int, base: Path | None = None, clones: int = 0) -> str:
    lines = [f"instance: {inst}", "host:", f"  fabric_netns: {inst}-fab",
             "  overcommit: {cpus: 32, memory: 4}"]
    if base is not None:
        lines += ["images:", f"  base: {{builtin: tiny, disk: {base}}}"]
        if clones:
            lines.append("  golden: {from: g00@gold}")
    lines.append("guests:")
    for i in range(n):
        img = ", image: base" if base is not None and i == 0 else ""
        lines.append(f"  g{i:02d}: {{memory: {{max: 128MiB}}{img}, "
                     f"disks: [{{size: 1GiB, name: data}}]}}")
    for i in range(clones):
        lines.append(f"  c{i:02d}: {{memory: {{max: 96MiB}}, image: golden}}")
    return "\n".join(lines) + "\n"


class Product:
    def __init__(self, n: int) -> None:
        self.inst = "b" + uuid.uuid4().hex[:7]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-dr-"))
        self.base = self.dir / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.base), "64M"],
                       check=True)
        self.inv = self.dir / "inventory.yaml"
        self.n = n
        self.inv.write_text(inventory(self.inst, n, self.base))
        self.env = {**os.environ, "CONSOLIDATOR_STATE_DIR": str(self.dir / "state"),
                    "CONSOLIDATOR_IMAGE_CACHE": CACHE}

    def cli(self, *args: str) -> tuple[float, str]:
        cmd = [sys.executable, "-m", "consolidator", *args]
        if args[0] in ("apply",):
            cmd += ["-f", str(self.inv)]
        t = time.monotonic()
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{args}: {res.stdout}\n{res.stderr}")
        return time.monotonic() - t, res.stdout

    def call(self, op: str, **args: object) -> dict:
        from consolidator.daemon import protocol
        with protocol.Client(protocol.socket_path(self.dir / "state")) as c:
            return c.call(op, **args)

    def sh(self, guest: str, command: str) -> str:
        return self.call("agent", name=guest, command="sh", arg=command, timeout=120)["reply"]

    def close(self) -> None:
        subprocess.run([sys.executable, "-m", "consolidator", "destroy", "--yes", "--purge"],
                       env=self.env, capture_output=True, cwd=ROOT)
        shutil.rmtree(self.dir, ignore_errors=True)


def bare_stop_cont(n: int, runs: int) -> list[float]:
    """N bare QEMUs of the product's argv; QMP stop then cont on all, in ms."""
    from consolidator.vm.qmp import QMP

    def inv(inst: str, d: Path) -> str:
        return inventory(inst, n)
    bare = BareFleet(inv, prefix="c")
    try:
        prepared = bare.prepare()
        procs = [bare.spawn(*p) for p in prepared]

        async def go() -> list[float]:
            qs = []
            for (_, _, g, _), p in zip(prepared, procs):
                q = QMP(g.name)
                await q.connect(str(g.paths.qmp), timeout=30)
                qs.append(q)
            out = []
            for _ in range(runs):
                t = time.monotonic()
                await asyncio.gather(*(q.execute("stop") for q in qs))
                await asyncio.gather(*(q.execute("cont") for q in qs))
                out.append((time.monotonic() - t) * 1000)
            for q in qs:
                await q.execute("quit")
                await q.close()
            return out
        return asyncio.run(go())
    finally:
        bare.close()


def dd_16mib(dir_: Path) -> float:
    src, dst = dir_ / "src", dir_ / "dst"
    src.write_bytes(os.urandom(16 << 20))
    os.sync()
    t = time.monotonic()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"],
                   check=True)
    took = time.monotonic() - t
    src.unlink()
    dst.unlink()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = args.guests
    print(f"# disaster recovery, {n} builtin guests with a 1 GiB data disk (TCG here)")
    base = bare_stop_cont(n, args.runs)
    p = Product(n)
    try:
        p.cli("apply")
        frozen, paused = [], []
        for i in range(args.runs):
            r = p.call("snapshot-create", names=[f"g{j:02d}" for j in range(n)],
                       tag=f"f{i}")
            assert all(g["kind"] == "frozen" for g in r["guests"]), r
            frozen.append(r["window_ms"])
            r = p.call("snapshot-create", names=[f"g{j:02d}" for j in range(n)],
                       tag=f"m{i}", memory=True)
            paused.append(r["window_ms"])
        b = sorted(base)[len(base) // 2]
        f = sorted(frozen)[len(frozen) // 2]
        m = sorted(paused)[len(paused) // 2]
        print(f"freeze window, snapshot --all ({n}):   {f:8.1f} ms   bare stop+cont "
              f"{b:6.1f} ms   ratio {f / b:5.2f}")
        print(f"pause window, snapshot --all --memory: {m:8.1f} ms   bare stop+cont "
              f"{b:6.1f} ms   ratio {m / b:5.2f}")

        g = "g01"
        p.sh(g, "dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null")
        p.call("backup", names=[g])
        incs = []
        for i in range(args.runs):
            p.sh(g, f"dd if=/dev/urandom of=/dev/vda bs=1M count=16 seek={128 + 16 * i} "
                    "conv=fsync 2>/dev/null")
            r = p.call("backup", names=[g])["backups"][0]
            assert r["kind"] == "incremental", r
            incs.append((r["seconds"], r["disks"]["data-data"]["bytes"]))
        dd = sorted(dd_16mib(p.dir) for _ in range(args.runs))[args.runs // 2]
        inc = sorted(incs)[len(incs) // 2]
        print(f"incremental backup, 16 MiB of 1 GiB:  {inc[0] * 1000:8.1f} ms   dd 16 MiB "
              f"{dd * 1000:6.1f} ms   ratio {inc[0] / dd:5.2f} (target <= 3)   "
              f"increment {inc[1] / (1 << 20):.1f} MiB")

        t_restore, t_cold = [], []
        for _ in range(args.runs):
            t = time.monotonic()
            p.call("restore", names=[g], yes=True)
            t_restore.append(time.monotonic() - t)
            for aside in (p.dir / "state" / "guests" / g).glob("*.replaced-*"):
                aside.unlink()
            t = time.monotonic()
            p.call("restart", name=g)
            t_cold.append(time.monotonic() - t)
        r, c = sorted(t_restore)[1], sorted(t_cold)[1]
        print(f"restore to READY:                    {r * 1000:8.1f} ms   cold restart "
              f"{c * 1000:6.1f} ms   ratio {r / c:5.2f}")

        t_rev, t_boot = [], []
        for i in range(args.runs):
            t = time.monotonic()
            p.call("snapshot-revert", name="g02", tag=f"m{i}")
            t_rev.append(time.monotonic() - t)
            t = time.monotonic()
            p.call("restart", name="g02")
            t_boot.append(time.monotonic() - t)
        r, c = sorted(t_rev)[1], sorted(t_boot)[1]
        print(f"--memory revert to running:          {r * 1000:8.1f} ms   cold boot "
              f"{c * 1000:6.1f} ms   ratio {r / c:5.2f} (target < 1)")

        p.sh("g00", "dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null")
        p.call("snapshot-create", names=["g00"], tag="gold")
        p.inv.write_text(inventory(p.inst, n, p.base, clones=8))
        t, _ = p.cli("apply")
        tpl = p.dir / "state" / "images" / "templates" / "g00@gold.qcow2"
        per = [(p.dir / "state" / "guests" / f"c{i:02d}" / "disk.qcow2").stat().st_blocks * 512
               for i in range(8)]
        print(f"8 linked clones in one apply:        {t * 1000:8.1f} ms   template "
              f"{tpl.stat().st_blocks * 512 / (1 << 20):.1f} MiB, overlay "
              f"{sum(per) / len(per) / 1024:.0f} KiB each (a full copy: "
              f"{p.base.stat().st_size / (1 << 20):.1f} MiB + 8 MiB)")
    finally:
        p.close()


if __name__ == "__main__":
    main()
