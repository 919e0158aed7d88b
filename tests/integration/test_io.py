"""Disk and network I/O of real guests: limits that hold and change live, shares of a
host budget under contention, and the figures status, the metrics and the report show."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from datetime import datetime

import pytest

from consolidator.units import MiB

from .env import CliFleet, cli_fleet, leftovers

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.quiet]

FLEET = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  io: {{bps: @BUDGET@}}
  metrics: {{enabled: true, listen: "127.0.0.1:@PORT@"}}
networks:
  lan: {{subnet: 10.83.0.0/24}}
guests:
  a:
    memory: {{max: 160MiB}}
    disks: [{{size: 256MiB, name: data@A_IO@}}]
    nics: [{{network: lan, ip: 10.83.0.10@A_RATE@}}]
  b:
    memory: {{max: 160MiB}}
    io: {{shares: @B_SHARES@}}
    disks: [{{size: 256MiB, name: data}}]
    nics: [{{network: lan, ip: 10.83.0.20}}]
"""
BUDGET = "24MiB/s"


def inventory(a_io: str = "", a_rate: str = "", b_shares: int = 3000,
              budget: str = BUDGET) -> str:
    """The fleet's text (still to be formatted with the instance)."""
    return (FLEET.replace("@A_IO@", a_io and f", io: {{{{{a_io}}}}}")
            .replace("@A_RATE@", a_rate and f", rate: {a_rate}")
            .replace("@B_SHARES@", str(b_shares)).replace("@BUDGET@", budget)
            .replace("@PORT@", str(PORT)))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> CliFleet:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with cli_fleet(tmp_path_factory.mktemp("io"), inventory(a_io="write_bps: 10MiB/s")) as f:
        f.cli("apply")
        yield f
    assert leftovers(f.instance) == []


def sh(f: CliFleet, guest: str, command: str, timeout: float = 90) -> str:
    from consolidator.daemon import protocol
    with protocol.Client(protocol.socket_path(f.state)) as c:
        reply = c.call("agent", name=guest, command="sh", arg=command,
                       timeout=timeout)["reply"]
    fields = dict(p.split("=", 1) for p in reply.split() if "=" in p)
    out = base64.b64decode(fields.get("out", "")).decode()
    assert fields.get("rc") == "0", f"{command}: {reply} {out}"
    return out


def timed(f: CliFleet, guest: str, command: str) -> float:
    """Seconds ``command`` took in the guest (its own clock)."""
    out = sh(f, guest, "s=$(cut -d' ' -f1 /proc/uptime); " + command +
             " >/dev/null 2>&1; e=$(cut -d' ' -f1 /proc/uptime); echo $s $e")
    s, e = (float(x) for x in out.split())
    return e - s


def write_rate(f: CliFleet, guest: str, mib: int, bs: str = "1M") -> float:
    """MiB/s of direct writes of ``mib`` MiB to the guest's data disk."""
    count = mib if bs == "1M" else mib * 256
    return mib / timed(f, guest, f"dd if=/dev/zero of=/dev/vda bs={bs} count={count} "
                                 "oflag=direct")


def apply(f: CliFleet, text: str) -> str:
    f.write(text.format(inst=f.instance))
    return f.cli("apply").stdout


def test_a_write_limit_holds_and_changes_live(fleet):
    pid = fleet.guests()["a"]["pid"]
    got = write_rate(fleet, "a", 40)
    assert 9.0 <= got <= 11.0, f"{got:.2f} MiB/s under write_bps 10MiB/s"
    apply(fleet, inventory(a_io="write_bps: 20MiB/s"))
    got = write_rate(fleet, "a", 40)
    assert 18.0 <= got <= 22.0, f"{got:.2f} MiB/s under write_bps 20MiB/s"
    apply(fleet, inventory(a_io="write_bps: 5MiB/s"))
    got = write_rate(fleet, "a", 20)
    assert 4.5 <= got <= 5.5, f"{got:.2f} MiB/s under write_bps 5MiB/s"
    assert fleet.guests()["a"]["pid"] == pid            # live: the same QEMU


def test_an_iops_limit_holds_with_small_blocks(fleet):
    apply(fleet, inventory(a_io="iops: 200"))
    secs = timed(fleet, "a", "dd if=/dev/zero of=/dev/vda bs=4k count=600 oflag=direct")
    iops = 600 / secs
    assert 180 <= iops <= 220, f"{iops:.0f} IOPS under iops: 200"


def test_a_nic_rate_holds_both_ways_and_changes_live(fleet):
    pid = fleet.guests()["a"]["pid"]
    def mbit(src: str, dst_ip: str, dst: str) -> float:
        """Mbit/s from ``src`` to ``dst``, timed where it arrives (the sender's clock
        would stop while its socket buffer still holds megabytes)."""
        sh(fleet, dst, "rm -f /tmp/rx; (sleep 120 | nc -l -p 5001 | (head -c 1 >/dev/null;"
                       " s=$(cut -d' ' -f1 /proc/uptime); cat >/dev/null;"
                       " e=$(cut -d' ' -f1 /proc/uptime); echo $s $e >/tmp/rx))"
                       " >/dev/null 2>&1 </dev/null &")
        mib = 4
        sh(fleet, src, f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | "
                       f"nc {dst_ip} 5001")
        s, e = (float(x) for x in sh(fleet, dst, "for i in $(seq 100); do [ -s /tmp/rx ] "
                                                 "&& break; sleep 0.1; done; killall sleep;"
                                                 " cat /tmp/rx").split())
        return mib * MiB * 8 / (e - s) / 1e6

    # Under TCG two tiny guests move 15-25 Mbit/s with busybox nc (measured here), so the
    # rates tested are below that: a ceiling above what a guest can send proves nothing.
    # tc counts whole frames; nc sees the payload, 1448 of every 1514 bytes (TCP with
    # timestamps over Ethernet), so 8 Mbit on the wire is 7.65 Mbit of data.
    payload = 1448 / 1514
    apply(fleet, inventory(a_rate="8Mbit"))
    out = mbit("a", "10.83.0.20", "b")                 # from a
    into = mbit("b", "10.83.0.10", "a")                # to a
    for got in (out, into):
        assert got == pytest.approx(8 * payload, rel=0.10), (out, into)
    apply(fleet, inventory(a_rate="4Mbit"))
    out = mbit("a", "10.83.0.20", "b")
    assert out == pytest.approx(4 * payload, rel=0.10), out
    assert fleet.guests()["a"]["pid"] == pid
    apply(fleet, inventory())                          # lifted: no qdisc of ours is left
    for dev in ("tap0", "vnic0"):
        shown = subprocess.run(["ip", "netns", "exec", f"{fleet.instance}-a", "tc", "qdisc",
                                "show", "dev", dev], capture_output=True, text=True).stdout
        assert "tbf" not in shown, shown


def io_rows(f: CliFleet, explain: bool = False) -> dict[str, dict]:
    from consolidator.daemon import protocol
    with protocol.Client(protocol.socket_path(f.state)) as c:
        doc = c.call("status", explain=explain)
    return {g["name"]: {**(g["io"] or {}), "explain": g.get("explain")}
            for g in doc["guests"]}


def test_shares_divide_the_host_budget_while_both_write_and_one_takes_all_alone(fleet):
    import time
    apply(fleet, inventory())                    # a: shares 1000, b: 3000, budget 24MiB/s
    budget = 24 * MiB
    writer = ("rm -f /tmp/stop; (while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/dev/vda "
              "bs=1M count=128 oflag=direct; done) >/dev/null 2>&1 </dev/null &")
    stop = "touch /tmp/stop; killall dd; true"
    sh(fleet, "a", writer)
    sh(fleet, "b", writer)
    try:
        time.sleep(3.0)                          # two ticks to see both busy, one to settle
        a = b = 0.0
        for _ in range(4):
            time.sleep(1.0)
            rows = io_rows(fleet)
            a += rows["a"]["disk_write_bps"] / 4
            b += rows["b"]["disk_write_bps"] / 4
        assert a / (a + b) == pytest.approx(0.25, rel=0.10), (a / MiB, b / MiB)
        assert a + b == pytest.approx(budget, rel=0.10), (a / MiB, b / MiB)
        why = io_rows(fleet, explain=True)["b"]["explain"]["io"]["reason"]
        assert "shares 3000 of 4000 busy" in why
        sh(fleet, "a", stop)            # its dd is gone when the agent answers
        t_stop = time.time()
        t0 = time.monotonic()
        while True:
            time.sleep(0.5)
            rows = io_rows(fleet)
            if rows["b"]["share_bps"] is not None and rows["b"]["share_bps"] >= budget * 0.95 \
                    and rows["b"]["disk_write_bps"] >= budget * 0.9:
                break
            assert time.monotonic() - t0 < 5, rows["b"]
        # when the supervisor gave b the whole budget, by its log (status is polled)
        given = [e for e in map(json.loads, (fleet.state / "supervisor" / "log.jsonl")
                                .read_text().splitlines())
                 if e.get("event") == "io.share" and e.get("guest") == "b"
                 and (e.get("bps") or 0) >= budget * 0.95]
        at = datetime.fromisoformat(given[-1]["timestamp"].replace("Z", "+00:00"))
        # two ticks at most: the one whose interval holds the writer's end still sees it
        # busy, the next sees it idle; plus the loop's lateness, as the two writing TCG
        # guests keep both cores busy (2.1 s seen once in CI)
        assert at.timestamp() - t_stop <= 2.5, at.timestamp() - t_stop
        assert rows["a"]["share_bps"] is None      # idle: keeps nothing back
    finally:
        sh(fleet, "a", stop)
        sh(fleet, "b", stop)


def test_status_and_the_metrics_count_the_bytes_written(fleet):
    import re
    import time

    def prom(name: str) -> float:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf'^{name}(?:_total)?{{fleet="{fleet.instance}",guest="a"}} (\S+)$',
                      text, re.M)
        assert m, name
        return float(m[1])
    time.sleep(1.5)
    before = io_rows(fleet)["a"]["disk_written_bytes"]
    before_prom = prom("consolidator_guest_disk_written_bytes")
    sh(fleet, "a", "dd if=/dev/zero of=/dev/vda bs=1M count=32 oflag=direct 2>/dev/null")
    time.sleep(2.5)                              # a tick or two to read the counters
    assert io_rows(fleet)["a"]["disk_written_bytes"] - before == 32 * MiB
    assert prom("consolidator_guest_disk_written_bytes") - before_prom == 32 * MiB
    now = io_rows(fleet)
    assert now["a"]["net_rx_bytes"] is not None and now["a"]["net_tx_bytes"] > 0
    # the report adds up the history's rates: every byte a's disk moved since it booted
    doc = json.loads(fleet.cli("report", "--format", "json").stdout)["io"]
    moved = now["a"]["disk_read_bytes"] + now["a"]["disk_written_bytes"]
    assert doc["guests"]["a"]["disk_bytes"] == pytest.approx(moved, rel=0.05)
    assert doc["guests"]["a"]["disk_bps"]["max"] > 5 * MiB
    assert doc["budget_bps"] == 24 * MiB
    assert {g["guest"] for g in doc["top_disk"]} == {"a", "b"}
    assert "I/O: p50 / p95 / max" in fleet.cli("report").stdout
    page = fleet.root / "report.html"
    fleet.cli("report", "--format", "html", "-o", str(page))
    assert "<table id='io'>" in page.read_text() and "<td>a</td>" in page.read_text()


def test_a_disk_under_its_filters_still_grows_live(fleet):
    """block_resize acts on the qcow2 under the throttle filters; the guest sees it."""
    pid = fleet.guests()["b"]["pid"]
    apply(fleet, inventory().replace("disks: [{{size: 256MiB, name: data}}]",
                                     "disks: [{{size: 320MiB, name: data}}]"))
    sectors = int(sh(fleet, "b", "cat /sys/block/vda/size").strip())
    assert sectors * 512 == 320 * MiB
    assert fleet.guests()["b"]["pid"] == pid
