#!/usr/bin/env python3
"""I/O benchmark: what throttling and I/O accounting cost, each against a baseline
measured in the same run.

  - disk: qemu-io writes through the very filter chain a guest's disk has (two
    throttle filters, no limits set, over a qcow2), against the same qcow2 with no
    filters (target: >= 0.95);
  - NIC: an unthrottled NIC gets no qdisc at all, so it costs nothing by construction;
    what is measured is a *declared* rate that does not bind: TCP through a veth pair
    between two netns with the tbf a rate installs (at tbf's highest ceiling, 32 Gbit/s),
    against no qdisc;
  - the rebalancer's loop CPU per guest per tick for N guests with a data disk and a NIC,
    busy writing (disk counters asked every tick, NIC counters read), against the same
    guests without disks and NICs (target: < 1 ms per guest).
Run as root: python tools/bench/io.py [--guests 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rebalance import Fleet, tick_cpu_ms  # noqa: E402

CACHE = os.environ.get("CONSOLIDATOR_IMAGE_CACHE", "/var/tmp/consolidator-test-images")
MiB = 1 << 20


# ------------------------------------------------------------------------ disk
def img_bench(path: Path, throttled: bool, count: int) -> float:
    """MiB/s of ``count`` asynchronous 1 MiB direct writes (then a flush) by qemu-io
    through ``path``: the guest's filter chain (two throttle groups, no limits) or none."""
    if throttled:
        opts = ("driver=throttle,throttle-group=tg1,file.driver=throttle,"
                f"file.throttle-group=tg0,file.file.driver=qcow2,"
                f"file.file.file.driver=file,file.file.file.filename={path}")
        args = ["--object", "throttle-group,id=tg0", "--object", "throttle-group,id=tg1",
                "--image-opts", opts]
    else:
        args = ["-f", "qcow2", str(path)]
    span = 1024
    cmds = "".join(f"aio_write -q {(i % span) * MiB} 1M\n" for i in range(count))
    t = time.monotonic()
    subprocess.run(["qemu-io", "-n", *args], input=cmds + "aio_flush\nquit\n", text=True,
                   check=True, capture_output=True)
    return count / (time.monotonic() - t)


def disk(runs: int) -> tuple[float, float]:
    d = Path(tempfile.mkdtemp(prefix="bench-io-"))
    try:
        path = d / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "2G"],
                       check=True)
        img_bench(path, False, 1024)                     # allocate, warm
        bare, thr = [], []
        for _ in range(runs):                            # interleaved: drift hits both
            bare.append(img_bench(path, False, 2048))
            thr.append(img_bench(path, True, 2048))
        return statistics.median(bare), statistics.median(thr)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------- NIC
def nic(runs: int, seconds: float = 2.0) -> tuple[float, float]:
    from consolidator.net import netns as ns
    from consolidator.net.fabric import QUEUE_LATENCY, bucket
    tag = uuid.uuid4().hex[:6]
    a, b = f"bio{tag}a", f"bio{tag}b"
    ns.create(a)
    ns.create(b)
    try:
        with ns.iproute(a) as ipr:
            ipr.link("add", ifname="va", kind="veth", peer={"ifname": "vb", "net_ns_fd": b})
            ia = ipr.link_lookup(ifname="va")[0]
            ipr.addr("add", index=ia, address="10.201.0.1", prefixlen=24)
            ipr.link("set", index=ia, state="up")
        with ns.iproute(b) as ipr:
            ib = ipr.link_lookup(ifname="vb")[0]
            ipr.addr("add", index=ib, address="10.201.0.2", prefixlen=24)
            ipr.link("set", index=ib, state="up")

        def run() -> float:
            with ns.entered(b):
                srv = socket.socket()
            srv.bind(("10.201.0.2", 0))
            srv.listen(1)
            port = srv.getsockname()[1]
            got = [0]

            def sink() -> None:
                c, _ = srv.accept()
                while True:
                    n = len(c.recv(1 << 20))
                    if not n:
                        break
                    got[0] += n
                c.close()
            th = threading.Thread(target=sink)
            th.start()
            with ns.entered(a):
                cli = socket.create_connection(("10.201.0.2", port))
            buf = b"\0" * (256 << 10)
            t = time.monotonic()
            while time.monotonic() - t < seconds:
                cli.sendall(buf)
            cli.close()
            th.join()
            took = time.monotonic() - t
            srv.close()
            return got[0] * 8 / took / 1e9

        rate = 4_000_000_000                             # bytes/s: tbf's most, far above
        bare, shaped = [], []
        for _ in range(runs):
            bare.append(run())
            with ns.iproute(a) as ipr:
                ipr.tc("replace", "tbf", index=ia, handle="1:", rate=rate,
                       burst=bucket(rate, None), latency=QUEUE_LATENCY)
            shaped.append(run())
            with ns.iproute(a) as ipr:
                ipr.tc("del", index=ia, root=True)
        return statistics.median(bare), statistics.median(shaped)
    finally:
        ns.remove(a)
        ns.remove(b)


# ------------------------------------------------------------------------ loop
def loop_cost(n: int, io: bool, seconds: float = 15) -> float:
    lines = ["instance: {inst}", "host:", "  fabric_netns: {inst}-fab",
             "  overcommit: {cpus: 32, memory: 4}", "  io: {bps: 64MiB/s}"]
    if io:
        lines += ["networks:", "  lan: {subnet: 10.202.0.0/24}"]
    lines.append("guests:")
    for i in range(n):
        extra = (f", disks: [{{size: 64MiB, name: d}}], nics: [{{network: lan, "
                 f"ip: 10.202.0.{10 + i}}}]") if io else ""
        lines.append(f"  g{i:02d}: {{memory: {{max: 128MiB}}{extra}}}")

    def load(c: object) -> None:
        for i in range(n):
            if io:              # every guest writing: its disk counters are asked each tick
                c.call("agent", name=f"g{i:02d}", command="sh", timeout=30,  # type: ignore
                       arg="(while true; do dd if=/dev/zero of=/dev/vda bs=64k count=64 "
                           "oflag=direct; sleep 0.2; done) >/dev/null 2>&1 </dev/null &")
            else:               # as busy, without disks: the loop asks it as often
                c.call("agent", name=f"g{i:02d}", command="cpu", arg="20",  # type: ignore
                       timeout=30)
    return tick_cpu_ms(Fleet("\n".join(lines) + "\n"), seconds, load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    from consolidator.vm.image import build_tiny
    build_tiny(Path(CACHE))
    d_bare, d_thr = disk(a.runs)
    n_bare, n_thr = nic(a.runs)
    with_io = loop_cost(a.guests, True)
    without = loop_cost(a.guests, False)
    print(f"\n# I/O benchmark (medians of {a.runs})")
    print(f"disk, 1 MiB writes qd 8, two throttle filters : {d_thr:.0f} MiB/s")
    print(f"  baseline: the same qcow2, no filters        : {d_bare:.0f} MiB/s; ratio "
          f"{d_thr / d_bare:.3f} (target >= 0.95)")
    print("NIC without a rate                            : no qdisc installed: ratio 1 by "
          "construction")
    print(f"NIC with a rate far above its traffic (tbf)   : {n_thr:.2f} Gbit/s")
    print(f"  baseline: no qdisc                          : {n_bare:.2f} Gbit/s; ratio "
          f"{n_thr / n_bare:.3f}")
    print(f"loop CPU per tick, {a.guests} guests writing, NIC  : {with_io:.2f} ms "
          f"({with_io / a.guests:.3f} ms/guest; target < 1)")
    print(f"  baseline: {a.guests} busy guests, no disk or NIC  : {without:.2f} ms; ratio "
          f"{with_io / without:.2f}; the counters add "
          f"{(with_io - without) / a.guests:.3f} ms/guest (target < 1)")


if __name__ == "__main__":
    main()
