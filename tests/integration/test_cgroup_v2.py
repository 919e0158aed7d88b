"""The v2 backend against a real cgroup2 mount.

On hybrid hosts like the development machines, cgroup2 is mounted (at
/sys/fs/cgroup/unified) but cpu and memory are bound to v1, and the kernel will not
let a second cgroup2 mount take them. So here every controller-independent v2
operation runs for real: the supervisor leaf (no-internal-processes rule), the tree
below the delegated cgroup, placement of a process through cgroup.procs, per-cgroup
usage counters, kill and removal. The knobs themselves (cpu.weight, cpu.max, memory.max,
memory.low, pids.max) are checked by tests/unit/test_cgroup_settings.py, and for real
by the v2host test below, which must run on pure v2 hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from consolidator.sched.cgroup import CgroupSettings, detect

from .env import unique_instance

ROOT = Path(__file__).resolve().parents[2]


def child(script: str) -> dict:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_v2_operations_on_the_real_cgroup2_mount(need_root):
    layout = detect()
    if layout.v2 is None:
        pytest.skip("no cgroup2 mounted")
    unified = Path(layout.v2.point)
    inst = unique_instance()
    deleg = unified / f"{inst}-deleg"
    deleg.mkdir()
    try:
        out = child(f"""
            import json, os, subprocess, time
            from pathlib import Path
            # act as a service with Delegate=yes: our own cgroup is {deleg}
            Path({str(deleg)!r}, "cgroup.procs").write_text(str(os.getpid()))
            from consolidator.sched.cgroup import CgroupDriver, CgroupSettings, detect
            from consolidator.vm.placement import GuestPlacement
            d = CgroupDriver(detect(), {inst!r}, backend="v2")
            d.create_guest("g1")
            v2line = lambda t: [l for l in t.splitlines() if l.startswith("0::")][0]
            own = v2line(Path("/proc/self/cgroup").read_text())
            with GuestPlacement(d.procs_files("g1"), None) as pl:
                # some CPU (a counted loop), then idle until killed
                p = subprocess.Popen(["sh", "-c", "i=0; while [ $i -lt 30000 ]; do "
                                      "i=$((i+1)); done; exec sleep 30"], preexec_fn=pl.preexec)
            placed = v2line(Path(f"/proc/{{p.pid}}/cgroup").read_text())
            time.sleep(1.0)
            st = d.usage("g1")
            writes = d.writes(CgroupSettings(cpu_shares=2048, memory_limit=1 << 30), "g1")
            present = d.guests_present()
            d.kill("g1")
            p.wait()
            d.remove_instance()
            left = [str(x) for x in d.leftovers()]
            Path({str(unified)!r}, "cgroup.procs").write_text(str(os.getpid()))
            (Path({str(deleg)!r}) / "supervisor").rmdir()
            print(json.dumps({{"own": own, "placed": placed, "present": present,
                               "cpu_ns": st.cpu_usage_ns,
                               "controllers": d.controllers, "writes": writes,
                               "left": left, "killed_rc": p.returncode}}))
        """)
    finally:
        for sub in sorted(deleg.rglob("*"), key=lambda p: -len(p.parts)) + [deleg]:
            if sub.is_dir():
                for pid in (sub / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                for _ in range(100):          # the killed are reaped asynchronously
                    try:
                        sub.rmdir()
                        break
                    except OSError:
                        time.sleep(0.05)
    rel = f"/{inst}-deleg"
    assert out["own"] == f"0::{rel}/supervisor"          # moved itself into the leaf
    assert out["placed"] == f"0::{rel}/{inst}/guests/g1"   # placed before exec
    assert out["present"] == ["g1"]
    # the loop above takes tens of ms of CPU: counted in the guest's cgroup (cpu.stat)
    assert out["cpu_ns"] > 5_000_000, out["cpu_ns"]
    assert out["killed_rc"] == -9
    assert out["left"] == []
    # only knobs of controllers this cgroup2 has are written (none of cpu/memory here)
    assert all(w[0] in out["controllers"] for w in out["writes"])


@pytest.mark.v2host
def test_v2_knobs_on_a_pure_v2_host(need_root):
    layout = detect()
    assert layout.backend == "v2", "collected only on pure cgroup v2 hosts (tests/conftest.py)"
    from consolidator.sched.cgroup import CgroupDriver
    inst = unique_instance()
    d = CgroupDriver(layout, inst)
    try:
        d.create_guest("g1")
        d.apply("g1", CgroupSettings(cpu_shares=2048, cpu_quota_cores=0.5, memory_limit=1 << 30,
                                     memory_low=256 << 20, pids_max=300))
        assert d.read("g1", "cpu", "cpu.weight") == "200"
        assert d.read("g1", "cpu", "cpu.max") == "50000 100000"
        assert d.read("g1", "memory", "memory.max") == str(1 << 30)
        assert d.read("g1", "memory", "memory.low") == str(256 << 20)
        assert d.read("g1", "pids", "pids.max") == "300"
        assert d.apply("g1", CgroupSettings(cpu_shares=2048, cpu_quota_cores=0.5,
                                            memory_limit=1 << 30, memory_low=256 << 20,
                                            pids_max=300)) == []
    finally:
        d.remove_instance()
