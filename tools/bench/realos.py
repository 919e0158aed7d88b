#!/usr/bin/env python3
"""Real-OS benchmark: a Debian 12 guest under consolidator against its bare argv.

Measured in this run:
  - Debian 12 (UEFI, q35, virtio, cloud-init seed with a static address) from start to
    the QEMU guest agent answering: `consolidator apply` of that one guest, cold (the
    supervisor's start inside the clock), and the same QEMU argv launched bare in the
    same netns, cgroup and jail made beforehand, the agent polled the same way.
    Ratio target <= 1.05;
  - DHCP: the time from a client's first request to its lease, on a network the
    supervisor serves (busybox udhcpc on a veth joined to the bridge, a MAC the
    inventory declares), median of --leases;
  - the image build: the manifest's figure for each cached Debian image, or a fresh
    build with --build (its .debs cached, as on a second run).
Run as root: python tools/bench/realos.py [--runs 3] [--leases 9] [--build]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare import BareFleet  # noqa: E402

CACHE = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE", "/var/tmp/consolidator-test-images"))


def inventory(inst: str, disk: Path, probe_mac: str) -> str:
    return f"""
instance: {inst}
host:
  fabric_netns: {inst}-fab
  image_roots: [{CACHE}]
  metrics: {{enabled: false}}
images:
  deb12: {{disk: {disk}, os: debian12, firmware: uefi}}
networks:
  lan: {{subnet: 10.97.0.0/24, gateway: 10.97.0.1}}
guests:
  web:
    image: deb12
    memory: {{max: 512MiB}}
    nics: [{{network: lan, ip: 10.97.0.10}}]
    cloud_init: {{user_data: {{runcmd: [[true]]}}}}
  probe:
    autostart: false
    nics: [{{network: lan, ip: 10.97.0.50, mac: "{probe_mac}"}}]
"""


class Fleet:
    def __init__(self, disk: Path) -> None:
        self.inst = "r" + uuid.uuid4().hex[:7]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-realos-"))
        self.inv = self.dir / "inventory.yaml"
        self.mac = "52:54:00:aa:bb:" + uuid.uuid4().hex[:2]
        self.inv.write_text(inventory(self.inst, disk, self.mac))
        self.env = {**os.environ, "CONSOLIDATOR_STATE_DIR": str(self.dir / "state"),
                    "CONSOLIDATOR_IMAGE_CACHE": str(CACHE)}

    def cli(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        cmd = [sys.executable, "-m", "consolidator", *args]
        if args[0] == "apply":
            cmd += ["-f", str(self.inv)]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=1200)
        took = time.monotonic() - t0
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return took, res

    def close(self) -> None:
        subprocess.run([sys.executable, "-m", "consolidator", "destroy", "-y", "--purge"],
                       capture_output=True, env=self.env)
        from consolidator.daemon import teardown
        teardown.collect(teardown.Scope(self.inst, f"{self.inst}-fab"))
        shutil.rmtree(self.dir, ignore_errors=True)


def leases(f: Fleet, n: int) -> list[float]:
    """udhcpc from a veth on the bridge, with the MAC of the inventory's probe NIC."""
    from consolidator.net import names
    from consolidator.net import netns as ns
    client = f"{f.inst}-dhcpc"
    ns.create(client)
    port = f"dh{uuid.uuid4().hex[:6]}"
    took = []
    try:
        with ns.iproute(f"{f.inst}-fab") as fab:
            fab.link("add", ifname=port, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": client, "address": f.mac})
            br = fab.link_lookup(ifname=names.bridge(f.inst, "lan"))[0]
            fab.link("set", index=fab.link_lookup(ifname=port)[0], master=br, state="up")
        with ns.iproute(client) as c:
            c.link("set", index=c.link_lookup(ifname="eth0")[0], state="up")
        time.sleep(2)                                   # the bridge port forwards
        for _ in range(n):
            t0 = time.monotonic()
            res = subprocess.run(["ip", "netns", "exec", client, "busybox", "udhcpc", "-i",
                                  "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s",
                                  "/bin/true"], capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                raise SystemExit(f"udhcpc: {res.stdout}{res.stderr}")
            took.append(time.monotonic() - t0)
    finally:
        ns.remove(client)
    return took


def product(disk: Path, n_leases: int) -> dict[str, float]:
    f = Fleet(disk)
    try:
        took, _ = f.cli("apply")
        log = [json.loads(x) for x in (f.dir / "state" / "guests" / "web" / "log.jsonl")
               .read_text().splitlines()]
        ready = next(e for e in log if e.get("event") == "ready")
        out = {"apply": took, "ready_after": float(ready.get("after_s", 0))}
        out["lease"] = statistics.median(leases(f, n_leases))
        return out
    finally:
        f.close()


def bare(disk: Path) -> float:
    """The same argv, spawned by hand in the same placement; the agent polled alike."""
    from consolidator.vm.qga import GuestAgent
    b = BareFleet(lambda inst, _d: inventory(inst, disk, "52:54:00:aa:bb:cc"), "r")
    try:
        ((intent, wiring, g, ident),) = b.prepare(["web"])
        t0 = time.monotonic()
        b.spawn(intent, wiring, g, ident)
        asyncio.run(GuestAgent("web", str(g.paths.agent)).wait(900))
        return time.monotonic() - t0
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--leases", type=int, default=9)
    ap.add_argument("--build", action="store_true", help="build the images again (--force)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    from consolidator.vm.osimage import build_debian, find_built
    builds = {}
    for release, fw in (("bookworm", "uefi"), ("bullseye", "bios")):
        if a.build:
            t0 = time.monotonic()
            build_debian(CACHE, release, fw, force=True)
            builds[f"{release}/{fw}"] = time.monotonic() - t0
        else:
            img = find_built(CACHE, release, fw) or build_debian(CACHE, release, fw)
            builds[f"{release}/{fw}"] = float(img.manifest.get("build_seconds", 0))
    disk = build_debian(CACHE, "bookworm", "uefi").disk
    ours, floor, lease, applies = [], [], [], []
    for i in range(a.runs):           # interleaved: drift hits both sides alike
        p = product(disk, a.leases)
        ours.append(p["ready_after"])
        applies.append(p["apply"])
        lease.append(p["lease"])
        floor.append(bare(disk))
        print(f"  run {i + 1}: consolidator {p['ready_after']:.1f} s (apply {p['apply']:.1f} s),"
              f" bare {floor[-1]:.1f} s, lease {p['lease'] * 1000:.0f} ms", flush=True)
    m = statistics.median
    print("\nDebian 12 (UEFI, q35, 1 vCPU, 512 MiB, TCG here) start -> guest agent answers")
    print(f"  consolidator (start to ready, median)     : {m(ours):6.1f} s")
    print(f"  `apply` wall clock, cold supervisor        : {m(applies):6.1f} s")
    print(f"  bare argv, same placement (floor)          : {m(floor):6.1f} s   ratio "
          f"{m(ours) / m(floor):.3f} (target <= 1.05)")
    print(f"\nDHCP request -> lease (udhcpc, median)    : {m(lease) * 1000:6.0f} ms")
    print("\nimage build (debootstrap, .debs cached)")
    for k, v in builds.items():
        print(f"  {k:16s}                         : {v:6.0f} s")


if __name__ == "__main__":
    main()
