#!/usr/bin/env python3
"""How a guest's tap is joined to its network: tc mirred redirect vs a bridge in the
guest netns. Both measured in this run, on the same topology:

    client netns ──veth── guest netns [mirred | bridge] ──veth── fabric bridge ──veth── server

The client end stands in for QEMU's tap (a tap needs a reader to carry traffic).
Prints, as medians of --runs: wiring time (netlink calls to join one NIC), TCP
throughput client->server, and TCP_RR-style round trips per second.
Run as root: python tools/bench/net.py [--runs 3] [--mb 512]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyroute2 import IPRoute  # noqa: E402

from consolidator import linux  # noqa: E402
from consolidator.net import netns as ns  # noqa: E402
ETH_P_ALL = 0x0003


def redirect(ipr: IPRoute, src: int, dst: int) -> None:
    """Everything arriving on ``src`` leaves by ``dst`` (ingress qdisc, u32 match-all)."""
    ipr.tc("add", "ingress", index=src, handle="ffff:")
    ipr.tc("add-filter", "u32", index=src, parent="ffff:", protocol=ETH_P_ALL, prio=1,
           keys=["0x0/0x0+0"], target=0x10001,
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def build(mode: str, tag: str) -> tuple[list[str], float]:
    c, g, f, s = (f"b{tag}{x}" for x in "cgfs")
    for n in (c, g, f, s):
        ns.create(n)
    t0 = time.perf_counter()
    with IPRoute(netns=f) as fab:
        fab.link("add", ifname="br0", kind="bridge")
        br = fab.link_lookup(ifname="br0")[0]
        fab.link("set", index=br, state="up")
        fab.link("add", ifname="port0", kind="veth", peer={"ifname": "vnic0", "net_ns_fd": g})
        fab.link("add", ifname="port1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": s})
        for p in ("port0", "port1"):
            fab.link("set", index=fab.link_lookup(ifname=p)[0], master=br, state="up")
    with IPRoute(netns=g) as gns:
        gns.link("add", ifname="tap0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": c})
        t, v = gns.link_lookup(ifname="tap0")[0], gns.link_lookup(ifname="vnic0")[0]
        if mode == "mirred":
            redirect(gns, t, v)
            redirect(gns, v, t)
        else:
            gns.link("add", ifname="gbr", kind="bridge")
            b = gns.link_lookup(ifname="gbr")[0]
            gns.link("set", index=t, master=b)
            gns.link("set", index=v, master=b)
            gns.link("set", index=b, state="up")
        gns.link("set", index=t, state="up")
        gns.link("set", index=v, state="up")
    wiring = time.perf_counter() - t0
    for n, ip in ((c, "10.9.0.1"), (s, "10.9.0.2")):
        with IPRoute(netns=n) as r:
            i = r.link_lookup(ifname="eth0")[0]
            r.addr("add", index=i, address=ip, prefixlen=24)
            r.link("set", index=i, state="up")
            r.link("set", index=r.link_lookup(ifname="lo")[0], state="up")
    return [c, g, f, s], wiring


def in_ns(name: str):
    fd = ns.open_fd(name)
    try:
        linux.setns(fd, linux.CLONE_NEWNET)
    finally:
        os.close(fd)


def measure(c: str, s: str, mb: int, rr: int) -> tuple[float, float]:
    pid = os.fork()
    if pid == 0:                                     # server
        in_ns(s)
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("10.9.0.2", 5001))
        srv.listen()
        for _ in range(2):
            conn, _ = srv.accept()
            first = conn.recv(1)
            if first == b"T":
                while conn.recv(1 << 20):
                    pass
            else:
                conn.sendall(first)
                while True:
                    b = conn.recv(1)
                    if not b:
                        break
                    conn.sendall(b)
            conn.close()
        os._exit(0)
    r, w = os.pipe()
    cpid = os.fork()
    if cpid == 0:                                    # client
        in_ns(c)
        time.sleep(0.3)
        buf = b"x" * (1 << 20)
        k = socket.create_connection(("10.9.0.2", 5001))
        t0 = time.perf_counter()
        k.sendall(b"T")
        for _ in range(mb):
            k.sendall(buf)
        k.shutdown(socket.SHUT_WR)
        k.recv(1)
        tput = mb / (time.perf_counter() - t0)
        k.close()
        k = socket.create_connection(("10.9.0.2", 5001))
        k.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(rr):
            k.sendall(b"p")
            k.recv(1)
        rate = rr / (time.perf_counter() - t0)
        k.close()
        os.write(w, f"{tput} {rate}".encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 100).decode().split()
    os.waitpid(cpid, 0)
    os.waitpid(pid, 0)
    return float(data[0]), float(data[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--rr", type=int, default=20000)
    a = ap.parse_args()
    res: dict[str, list[tuple[float, float, float]]] = {"mirred": [], "bridge": []}
    for _ in range(a.runs):
        for mode in res:
            tag = uuid.uuid4().hex[:5]
            names_, wiring = build(mode, tag)
            try:
                tput, rate = measure(names_[0], names_[3], a.mb, a.rr)
            finally:
                for n in names_:
                    ns.remove(n)
            res[mode].append((wiring, tput, rate))
    base = {k: statistics.median(x[k] for x in res["bridge"]) for k in range(3)}
    print(f"# tap-to-bridge join, medians of {a.runs} (ratio vs in-netns bridge, same run)")
    print(f"{'join':8} {'wiring':>10} {'TCP MB/s':>10} {'RR/s':>9}   ratios (wiring, MB/s, RR/s)")
    for mode, rows in res.items():
        m = [statistics.median(r[k] for r in rows) for k in range(3)]
        print(f"{mode:8} {m[0] * 1000:>7.1f} ms {m[1]:>10.0f} {m[2]:>9.0f}   "
              f"{m[0] / base[0]:.2f}, {m[1] / base[1]:.2f}, {m[2] / base[2]:.2f}")


if __name__ == "__main__":
    main()
