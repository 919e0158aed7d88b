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

from consolidator.sched.cgroup import CgroupSettings, detect, parse_flat

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


# ------------------------------------------------- on a pure cgroup v2 kernel
#
# The tests below are collected only where cpu and memory are on cgroup2 (tests/conftest.py).
# CI runs them inside a Debian 12 guest, in a systemd service with Delegate=yes like
# consolidator.service (test_the_v2_tests_pass_inside_a_debian12_guest, tools/v2guest.py).
# On a v2 host: systemd-run -p Delegate=yes --pipe --wait pytest -m v2host


@pytest.fixture(scope="module")
def v2_layout():
    """The layout as found before any driver moved this process into its supervisor leaf
    (after that, /proc/self/cgroup names the leaf)."""
    layout = detect()
    assert layout.backend == "v2", "collected only on pure cgroup v2 hosts (tests/conftest.py)"
    return layout


@contextlib.contextmanager
def v2_driver(layout):
    from consolidator.sched.cgroup import CgroupDriver
    d = CgroupDriver(layout, unique_instance())
    try:
        yield d
    finally:
        for g in d.guests_present():
            d.kill(g)
        d.remove_instance()


def spawn(d, guest: str, argv: list[str]) -> subprocess.Popen:
    """``argv`` started inside ``guest``'s cgroup (placed before exec), on CPU 0."""
    from consolidator.vm.placement import GuestPlacement
    with GuestPlacement(d.procs_files(guest), None) as pl:
        p = subprocess.Popen(argv, preexec_fn=pl.preexec, stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(p.pid, {0})
    return p


def p_stdout_line(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    assert line, f"exited {p.wait()} without a word"
    return line


BURN = ["sh", "-c", "while :; do :; done"]


def cpu_s(d, guest: str) -> float:
    return d.usage(guest).cpu_usage_ns / 1e9


@pytest.mark.v2host
def test_v2_knobs_on_a_pure_v2_host(need_root, v2_layout):
    with v2_driver(v2_layout) as d:
        d.create_guest("g1")
        settings = CgroupSettings(cpu_shares=2048, cpu_quota_cores=0.5, memory_limit=1 << 30,
                                  memory_low=256 << 20, pids_max=300)
        d.apply("g1", settings)
        assert set(d.controllers) >= {"cpu", "memory", "pids"}
        assert d.read("g1", "cpu", "cpu.weight") == "200"
        assert d.read("g1", "cpu", "cpu.max") == "50000 100000"
        assert d.read("g1", "memory", "memory.max") == str(1 << 30)
        assert d.read("g1", "memory", "memory.low") == str(256 << 20)
        assert d.read("g1", "pids", "pids.max") == "300"
        assert d.apply("g1", settings) == []          # the kernel's form: nothing rewritten


@pytest.mark.v2host
def test_v2_cpu_weight_divides_one_cpu_between_two_burners(need_root, v2_layout):
    with v2_driver(v2_layout) as d:
        for g, shares in (("heavy", 2048), ("light", 1024)):      # weights 200 and 100
            d.create_guest(g)
            d.apply(g, CgroupSettings(cpu_shares=shares))
        procs = [spawn(d, g, BURN) for g in ("heavy", "light")]
        time.sleep(1.0)                        # both running and settled
        before = {g: cpu_s(d, g) for g in ("heavy", "light")}
        time.sleep(4.0)
        got = {g: cpu_s(d, g) - before[g] for g in ("heavy", "light")}
        for p in procs:
            p.kill()
            p.wait()
    ratio = got["heavy"] / got["light"]
    assert 1.6 <= ratio <= 2.5, got
    assert got["heavy"] + got["light"] >= 4.0 * 0.8, got     # between them, the whole CPU


@pytest.mark.v2host
def test_v2_cpu_max_caps_a_burner(need_root, v2_layout):
    with v2_driver(v2_layout) as d:
        d.create_guest("capped")
        d.apply("capped", CgroupSettings(cpu_quota_cores=0.3))
        p = spawn(d, "capped", BURN)
        time.sleep(1.0)
        c0, t0 = cpu_s(d, "capped"), time.monotonic()
        time.sleep(4.0)
        rate = (cpu_s(d, "capped") - c0) / (time.monotonic() - t0)
        stat = parse_flat(d.read("capped", "cpu", "cpu.stat"))
        p.kill()
        p.wait()
    assert 0.2 <= rate <= 0.36, rate
    assert stat["nr_throttled"] > 0, stat


@pytest.mark.v2host
def test_v2_memory_max_kills_inside_the_cgroup_and_low_is_kept(need_root, v2_layout):
    with v2_driver(v2_layout) as d:
        d.create_guest("small")
        d.apply("small", CgroupSettings(memory_limit=48 << 20, memory_low=16 << 20))
        # 160 MiB, every page touched: more than memory.max, and there is no swap to use
        p = spawn(d, "small", [sys.executable, "-c",
                               "b = b'x' * (160 << 20); print(len(b))"])
        out, _ = p.communicate(timeout=120)
        events = parse_flat(d.read("small", "memory", "memory.events"))
        low = d.read("small", "memory", "memory.low")
    assert p.returncode == -signal.SIGKILL, (p.returncode, out)
    assert events["oom_kill"] >= 1 and events["max"] >= 1, events
    assert low == str(16 << 20)


@pytest.mark.v2host
def test_v2_pids_max_stops_a_fork_burst(need_root, v2_layout):
    with v2_driver(v2_layout) as d:
        d.create_guest("forky")
        d.apply("forky", CgroupSettings(pids_max=8))
        forker = textwrap.dedent("""
            import json, subprocess, sys, time
            kids, refused = [], 0
            for _ in range(20):
                try:
                    kids.append(subprocess.Popen(["sleep", "30"]))
                except OSError:
                    refused += 1
            print(json.dumps({"started": len(kids), "refused": refused}), flush=True)
            time.sleep(30)
        """)
        p = spawn(d, "forky", [sys.executable, "-c", forker])
        p_out = json.loads(p_stdout_line(p))
        current = int(d.read("forky", "pids", "pids.current"))
        events = parse_flat(d.read("forky", "pids", "pids.events"))
        d.kill("forky")
        p.wait()
    assert p_out == {"started": 7, "refused": 13}, p_out   # 8 with the forker itself
    assert current == 8, current
    assert events["max"] >= 13, events


@pytest.mark.v2host
def test_v2_everything_lives_in_the_delegated_subtree(need_root, v2_layout):
    """As under systemd's Delegate=yes: the supervisor's own cgroup holds only its leaf and
    the instance; nothing above it is written; removal leaves only the leaf."""
    unified = Path(v2_layout.v2.point)
    own = v2_layout.v2.path_of(v2_layout.own_v2)
    above = {p: (p / "cgroup.subtree_control").read_text()
             for p in [own.parent, *own.parent.parents] if unified in [p, *p.parents]}
    with v2_driver(v2_layout) as d:
        d.create_guest("g1")
        p = spawn(d, "g1", ["sleep", "30"])
        mine = Path(f"/proc/{os.getpid()}/cgroup").read_text().strip()
        theirs = Path(f"/proc/{p.pid}/cgroup").read_text().strip()
        kids = sorted(c.name for c in own.iterdir() if c.is_dir())
        enabled = set((own / "cgroup.subtree_control").read_text().split())
        d.kill("g1")
        p.wait()
    rel = v2_layout.own_v2.rstrip("/")
    assert mine == f"0::{rel}/supervisor"
    assert theirs == f"0::{rel}/{d.instance}/guests/g1"
    assert kids == sorted(["supervisor", d.instance])
    assert {"cpu", "memory", "pids"} <= enabled
    assert sorted(c.name for c in own.iterdir() if c.is_dir()) == ["supervisor"]
    assert {p: (p / "cgroup.subtree_control").read_text() for p in above} == above


# ------------------------------------------------- in CI: inside a Debian 12 guest

V2HOST_TESTS = sorted(n for n, f in list(globals().items()) if n.startswith("test_")
                      and any(m.name == "v2host" for m in getattr(f, "pytestmark", [])))


@pytest.mark.long
@pytest.mark.timeout(1000)
def test_the_v2_tests_pass_inside_a_debian12_guest(need_root, need_qemu, tmp_path):
    """Every v2host test above, run on a real pure-v2 kernel: the project's Debian 12
    image under QEMU, with this checkout shared into it (tools/v2guest.py)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import v2guest
    o = v2guest.run(tmp_path, timeout=900)
    why = f"{o.output}\n--- console ---\n{o.console}"
    assert o.rc == 0, why
    mounts = [line.split(" - ")[1].split()[0] for line in o.cgroup_mounts.splitlines()]
    assert mounts == ["cgroup2"], o.cgroup_mounts          # pure v2: no v1 hierarchy at all
    assert len(V2HOST_TESTS) >= 6
    assert o.results == {f"tests.integration.test_cgroup_v2::{n}": "passed"
                         for n in V2HOST_TESTS}, why
