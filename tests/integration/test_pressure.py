"""Host memory pressure from outside the fleet: a process that is no guest takes the host's
memory until MemAvailable falls under 10 % of it. The host's state turns soft, the budget
in force tightens, the idle guests' balloons give memory back, and the host's OOM killer
kills nothing; when the process lets go, the state relaxes, the budget is whole again
and a guest that needs memory is given it.

It takes nearly all of the host's memory for a while, so it runs in the quiet phase, with
nothing beside it; the hog asks the OOM killer to take it first (oom_score_adj 1000)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from consolidator.units import MiB

from .env import CliFleet, cli_fleet, wait_for

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.quiet]

FLEET = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: 1536MiB
  rebalance: {{interval: 1s}}
  ksm: off        # the balloons alone: merging's part is test_ksm's
  metrics: {{enabled: false}}
guests:
  a: {{memory: {{max: 512MiB, min: 96MiB}}}}
  b: {{memory: {{max: 512MiB, min: 96MiB}}}}
  c: {{memory: {{max: 512MiB, min: 96MiB}}}}
"""

#: takes memory in 256 MiB steps, every page populated (MAP_POPULATE: 0.35 s a GiB here,
#: against 1.1 s touching each page from Python), until MemAvailable is under the given
#: share of MemTotal; says how much it holds, then holds it until stdin closes
HOG = textwrap.dedent("""
    import json, mmap, sys
    open("/proc/self/oom_score_adj", "w").write("1000")
    def meminfo():
        m = dict(line.split(":") for line in open("/proc/meminfo"))
        return int(m["MemAvailable"].split()[0]) << 10, int(m["MemTotal"].split()[0]) << 10
    share, step, held = float(sys.argv[1]), 256 << 20, []
    avail, total = meminfo()
    while avail > share * total:
        held.append(mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS |
                               mmap.MAP_POPULATE))
        avail, total = meminfo()
    print(json.dumps({"held": len(held) * step, "avail": avail, "total": total}), flush=True)
    sys.stdin.read()
""")


def vmstat(key: str) -> int:
    for line in open("/proc/vmstat"):
        k, v = line.split()
        if k == key:
            return int(v)
    raise KeyError(key)


def rebalancer(f: CliFleet) -> dict:
    return f.status()["rebalancer"]


def test_a_process_outside_the_fleet_takes_memory_and_the_balloons_give_way(tmp_path):
    with cli_fleet(tmp_path, FLEET) as f:
        f.cli("apply")
        budget = 1536 * MiB
        wait_for(lambda: rebalancer(f)["budget_now_bytes"] == budget, 15,
                 "the first ticks, in the normal state")
        pids = {n: g["pid"] for n, g in f.guests().items()}
        before = f.balloons()
        kills = vmstat("oom_kill")
        hog = subprocess.Popen([sys.executable, "-c", HOG, "0.07"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        try:
            took = json.loads(hog.stdout.readline())
            assert took["avail"] < 0.10 * took["total"], took
            # soft: the budget in force is 95 % of the declared one, and the guests'
            # balloons add up to no more than that
            wait_for(lambda: rebalancer(f)["host_state"] in ("soft", "hard"), 10,
                     "the host's state to leave normal")
            rb = rebalancer(f)
            tight = rb["budget_now_bytes"]
            assert tight <= int(budget * 0.95), rb
            wait_for(lambda: sum(f.balloons().values()) <= tight + 8 * MiB, 20,
                     f"the balloons to fit {tight // MiB} MiB (from {before})")
            shrunk = f.balloons()
            assert all(shrunk[n] < before[n] for n in ("a", "b", "c")), (before, shrunk)
            assert all(b >= 96 * MiB for b in shrunk.values()), shrunk    # floors kept
            ex = json.loads(f.cli("status", "--json", "--explain").stdout)
            reasons = {g["name"]: g["explain"]["memory"]["reason"] for g in ex["guests"]}
            assert all(reasons.values()), reasons
            assert hog.poll() is None, "the hog itself was killed"
        finally:
            hog.stdin.close()
            hog.wait(timeout=60)
        # the hog gone: the state relaxes at once (MemAvailable is far above 15 % again),
        # the budget is whole again, and a guest that needs memory gets it back
        wait_for(lambda: rebalancer(f)["host_state"] == "normal", 30,
                 "the host's state to relax")
        wait_for(lambda: rebalancer(f)["budget_now_bytes"] == budget, 10,
                 "the budget to be whole again")
        assert "mem_mib=200" in f.cli("agent", "a", "mem", "200", "--timeout", "60").stdout
        wait_for(lambda: f.balloons()["a"] >= shrunk["a"] + 150 * MiB, 20,
                 f"a's balloon to give it the 200 MiB it holds (from {shrunk['a'] // MiB} MiB)")
        status = dict(x.split("=") for x in f.cli("agent", "a", "status").stdout.split())
        assert status["oom_kill"] == "0", status                    # nor in the guest
        assert vmstat("oom_kill") == kills, "the host's OOM killer killed something"
        after = f.guests()
        assert {n: g["pid"] for n, g in after.items()} == pids
        assert all(g["state"] == "running" and g["restarts"] == 0 for g in after.values())
        for n in pids:
            assert "crashed" not in f.events(n)
