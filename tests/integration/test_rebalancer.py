"""The rebalancer with real guests: load from the builtin image's agent, effects measured
on the host (cgroup CPU time, QMP balloon sizes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from consolidator.daemon import protocol
from consolidator.units import MiB

from .env import CliFleet, cli_fleet
from .test_supervisor import wait_for

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.quiet]


def cpu_ns(f: CliFleet, guest: str) -> int:
    return int(Path(f"/sys/fs/cgroup/cpuacct/{f.instance}/guests/{guest}/cpuacct.usage")
               .read_text())


def cores_over(f: CliFleet, guests: list[str], seconds: float) -> dict[str, float]:
    u0 = {g: cpu_ns(f, g) for g in guests}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {g: (cpu_ns(f, g) - u0[g]) / 1e9 / dt for g in guests}


def burn(f: CliFleet, *guests: str, percent: int = 100) -> None:
    for g in guests:
        f.cli("agent", g, "cpu", str(percent))


# three burners share CPU 0 by weight; a fourth, alone on CPU 1, is capped by its limit.
# One fleet and one 20 s measurement serve both tests.
SHARES = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, rebalance: {{interval: 1s}}}}
guests:
  one: {{cpu: {{shares: 1024, pin: "0"}}}}
  two: {{cpu: {{shares: 2048, pin: "0"}}}}
  four: {{cpu: {{shares: 4096, pin: "0"}}}}
  capped: {{cpu: {{limit: 0.25, pin: "1"}}}}
"""


@pytest.fixture(scope="module")
def burning(tmp_path_factory) -> dict[str, float]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with cli_fleet(tmp_path_factory.mktemp("shares"), SHARES) as f:
        f.cli("apply")
        burn(f, "one", "two", "four", "capped")
        time.sleep(3)
        return cores_over(f, ["one", "two", "four", "capped"], 20)


def test_cpu_shares_1_2_4_on_one_core(burning):
    total = sum(burning[g] for g in ("one", "two", "four"))
    for g, want in (("one", 1 / 7), ("two", 2 / 7), ("four", 4 / 7)):
        share = burning[g] / total
        assert abs(share - want) <= 0.1 * want, (g, share, want)


def test_cpu_limit_caps_a_burner(burning):
    assert 0.2 <= burning["capped"] <= 0.27, burning


RESERVE = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, rebalance: {{interval: 1s}}}}
guests:
  small: {{cpu: {{shares: 256, reserve: 0.5, pin: "0"}}}}
  big1: {{cpu: {{shares: 8192, pin: "0"}}}}
  big2: {{cpu: {{shares: 8192, pin: "0"}}}}
"""


def shares_file(f: CliFleet, guest: str) -> int:
    return int(Path(f"/sys/fs/cgroup/cpu/{f.instance}/guests/{guest}/cpu.shares").read_text())


def explained_weight(f: CliFleet, guest: str) -> int:
    st = json.loads(f.cli("status", "--json", "--explain").stdout)
    g = next(g for g in st["guests"] if g["name"] == guest)
    return g["explain"]["cpu"]["weight"]


def test_cpu_reserve_is_guaranteed_and_without_it_far_less(tmp_path):
    with cli_fleet(tmp_path, RESERVE) as f:
        f.cli("apply")
        pid = f.guests()["small"]["pid"]
        burn(f, "small", "big1", "big2")
        time.sleep(5)                                   # a few ticks to raise the weight
        got = cores_over(f, ["small", "big1", "big2"], 10)
        assert got["small"] >= 0.45, got
        st = json.loads(f.cli("status", "--json", "--explain").stdout)
        small = next(g for g in st["guests"] if g["name"] == "small")
        assert "reserve 0.5" in small["explain"]["cpu"]["reason"]
        raised = shares_file(f, "small")
        assert raised > 256 and raised == small["explain"]["cpu"]["weight"]

        # a live apply of something else never puts back the inventory's 256 (regression:
        # it did, and the loop, thinking its weight unchanged, never wrote it again)
        f.write(RESERVE.replace("small: {{cpu: {{shares: 256, reserve: 0.5, pin: \"0\"}}}}",
                                "small: {{cpu: {{shares: 256, reserve: 0.5, pin: \"0\"}}, "
                                "labels: {{tier: edge}}}}").format(inst=f.instance))
        assert "labels" in f.cli("apply").stdout
        assert shares_file(f, "small") > 256
        time.sleep(3)
        assert shares_file(f, "small") == explained_weight(f, "small") > 256
        assert f.guests()["small"]["pid"] == pid

        f.write(RESERVE.replace("shares: 256, reserve: 0.5", "shares: 256")
                .format(inst=f.instance))
        f.cli("apply")                                  # a live change: no restart
        assert shares_file(f, "small") == 256           # decided at once, not next tick
        time.sleep(4)
        got = cores_over(f, ["small", "big1", "big2"], 10)
        assert got["small"] <= 0.15, got
        assert f.guests()["small"]["pid"] == pid


BUDGET = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: 640MiB
  overcommit: {{memory: 3}}
  rebalance: {{interval: 1s}}
  ksm: off    # the balloons against the declared budget; merging's credit: test_ksm
guests:
  a: {{memory: {{max: 512MiB, min: 96MiB}}}}
  b: {{memory: {{max: 512MiB, min: 96MiB}}}}
  c: {{memory: {{max: 512MiB, min: 96MiB}}}}
"""


def test_memory_budget_idle_shrink_then_a_burst_is_fed_without_oom(tmp_path):
    with cli_fleet(tmp_path, BUDGET) as f:
        f.cli("apply")
        budget = 640 * MiB
        # idle guests shrink towards their min, and the budget holds
        wait_for(lambda: all(b is not None and b <= 200 * MiB for b in f.balloons().values()),
                 10, "idle guests to shrink")
        shrunk = f.balloons()
        assert sum(shrunk.values()) <= budget, shrunk
        assert all(b >= 96 * MiB for b in shrunk.values()), shrunk
        # the baseline is a's settled idle size, not a size on its way down: the burst's
        # threshold (150 MiB above it) must not depend on when the shrink was sampled
        last: dict[str, dict[str, int]] = {}

        def settled() -> bool:                 # no balloon moved by 8 MiB in a second
            now, prev = f.balloons(), last.get("b")
            last["b"] = now
            return prev is not None and all(abs(now[n] - prev[n]) < 8 * MiB for n in now)
        wait_for(lambda: (time.sleep(1.0), settled())[1], 15, "idle balloons to settle")
        before = f.balloons()
        seen_min = dict(before)
        # a allocates 150 MiB: its balloon deflates before the allocation fails
        t1 = time.monotonic()
        held = f.cli("agent", "a", "mem", "150", "--timeout", "60").stdout
        assert "mem_mib=150" in held
        reached = None
        trace = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            b = f.balloons()
            trace.append(b["a"] // MiB)
            for n, v in b.items():
                seen_min[n] = min(seen_min[n], v)
            assert sum(b.values()) <= budget + 8 * MiB
            if reached is None and b["a"] >= 150 * MiB + before["a"]:
                reached = time.monotonic() - t1
            time.sleep(0.25)
        status = dict(x.split("=") for x in f.cli("agent", "a", "status").stdout.split())
        assert status["oom_kill"] == "0"
        path = f"a from {before['a'] // MiB} MiB, every 0.25 s: " \
               f"{sorted(set(trace), key=trace.index)}"
        assert reached is not None and reached <= 5.0, path   # from the allocation's start
        assert all(v >= 96 * MiB for v in seen_min.values()), seen_min
        # every decision says why: a follows its (now larger) working set
        ex = json.loads(f.cli("status", "--json", "--explain").stdout)
        mem = {g["name"]: g["explain"]["memory"] for g in ex["guests"]}
        assert mem["a"]["ws"] >= 150 * MiB, mem["a"]
        assert any(w in mem["a"]["reason"] for w in ("working set", "pressure")), mem["a"]
        assert all(m["reason"] for m in mem.values())


def test_a_stopped_loop_lets_balloons_drift_to_deflated(tmp_path):
    with cli_fleet(tmp_path, BUDGET.replace("memory: 640MiB", "memory: 1200MiB")) as f:
        f.cli("apply")
        wait_for(lambda: all(b is not None and b <= 256 * MiB for b in f.balloons().values()),
                 25, "idle guests to shrink")
        low = f.balloons()
        with protocol.connect(f.state, start=False) as client:
            client.call("rebalancer", action="stop-loop")
        time.sleep(1)
        with protocol.connect(f.state, start=False) as client:
            assert client.call("rebalancer")["loop_alive"] is False
        # one watchdog step (32 MiB) a tick, towards max, for every guest
        wait_for(lambda: all(f.balloons()[n] > low[n] + 32 * MiB for n in low), 30,
                 "the watchdog to deflate the balloons")
        log = (f.state / "supervisor" / "log.jsonl").read_text()
        assert "rebalancer.stalled" in log
