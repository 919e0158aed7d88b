"""Same-page merging with real guests: KSM tuned by memory pressure, a guest that must not
merge, the accounting in status and the report, and the host's settings left or put back.

KSM is one per host, so these tests run in the quiet phase (nothing beside them), and
each puts back the settings it found, whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import time
from pathlib import Path

import pytest

from consolidator.sched.ksm import KsmParams
from consolidator.sched.ksmfs import KSM_DIR, RUN_DIR, ksmd_pid

from .env import CliFleet, cli_fleet, wait_for

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.quiet]
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
# what the test sets before the supervisor starts: values nobody else would choose
MARKED = {"run": 0, "pages_to_scan": 123, "sleep_millisecs": 77}
# 4 guests of one image have at least this many merged pages in all within 60 s
# (measured here: about 16,000 pages sharing on the host 6 s after apply; the floor
# leaves room for a slower, loaded host)
FLOOR = 8000

# five guests' maxima (1280 MiB) over a 1000 MiB budget: overcommitted, memory is short
FLEET = """
instance: {inst}
host:
  fabric_netns: {inst}-fab
  memory: 1000MiB
  ksm: @MODE@
  rebalance: {{interval: 1s}}
guests:
  a: {{memory: {{max: 256MiB, min: 96MiB}}}}
  b: {{memory: {{max: 256MiB, min: 96MiB}}}}
  c: {{memory: {{max: 256MiB, min: 96MiB}}}}
  d: {{memory: {{max: 256MiB, min: 96MiB}}}}
  v: {{memory: {{max: 256MiB, min: 96MiB, merge: false}}}}
"""


def knobs() -> dict[str, int]:
    return {k: int((KSM_DIR / k).read_text()) for k in KNOBS}


def counter(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def set_knobs(v: dict[str, int]) -> None:
    for k in ("pages_to_scan", "sleep_millisecs", "run"):
        (KSM_DIR / k).write_text(str(v[k]))


@pytest.fixture
def host_ksm():
    """The host's KSM as found, marked with distinctive values for the test, and put back
    afterwards (merged pages unmerged: the next test starts from none)."""
    if not (KSM_DIR / "run").exists():
        pytest.fail("KSM is not in this kernel: the KSM tests cannot run here")
    before = knobs()
    had = {p: (RUN_DIR / p).exists() for p in ("ksm-found.json", "ksm.owner")}
    set_knobs(MARKED)
    try:
        yield
    finally:
        (KSM_DIR / "run").write_text("2")        # unmerge everything this test merged
        set_knobs(before)
        for p, existed in had.items():
            if not existed:
                with contextlib.suppress(FileNotFoundError):
                    (RUN_DIR / p).unlink()


def ksmd_cpu() -> float:
    return int(Path(f"/proc/{ksmd_pid()}/schedstat").read_text().split()[0]) / 1e9


def qemu_pid(f: CliFleet, name: str) -> int:
    return f.guests()[name]["pid"]


def merging(pid: int) -> int:
    return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())


def stop_supervisor(f: CliFleet) -> None:
    pid = f.supervisor_pid()
    assert pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while f.supervisor_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f.supervisor_pid() is None


def test_auto_merges_settles_and_restores(tmp_path, host_ksm):
    with cli_fleet(tmp_path, FLEET.replace("@MODE@", "auto")) as f:
        f.cli("apply")
        t0 = time.monotonic()
        pids = {n: qemu_pid(f, n) for n in ("a", "b", "c", "d", "v")}

        def ours() -> dict[str, int]:
            return {n: merging(p) for n, p in pids.items()}
        # 1. merging, within 60 s of the guests being up, past the floor: counted on this
        # fleet's QEMUs (other QEMUs on the host may merge too)
        while (sum(ours().values()) < FLOOR or not all(ours()[n] for n in "abcd")) and \
                time.monotonic() - t0 < 60:
            time.sleep(1)
        merged = ours()
        took = time.monotonic() - t0
        sharing = sum(merged[n] for n in "abcd")
        assert sharing >= FLOOR, f"{merged} after {took:.0f}s"
        ex = f.status(explain=True)["rebalancer"]["ksm"]
        assert ex["mode"] == "auto" and ex["explain"]["phase"] in ("merge", "steady"), ex
        assert "over the budget" in json.dumps(ex["explain"]) or \
            ex["explain"]["phase"] == "steady", ex

        # 2. the guest that must not merge has no merged page; the others have
        assert merged["v"] == 0 and all(merged[n] > 0 for n in "abcd"), merged
        st = f.guests()
        assert st["v"]["memory_merge"] is False and not st["v"]["ksm_saved_bytes"]
        assert all(st[n]["ksm_saved_bytes"] > 0 for n in "abcd")

        # 3. once savings stop growing, ksmd falls under its (steady) budget
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ex = f.status(explain=True)["rebalancer"]["ksm"]["explain"]
            if ex["phase"] == "steady":
                break
            time.sleep(2)
        assert ex["phase"] == "steady", ex
        assert "stopped growing" in ex["reason"] or "steady" in ex["reason"], ex
        # ksmd's CPU over 9 full scans: with smart_scan, 8 cheap ones and one that looks
        # at every page again (several times the cost), so a shorter window reads a part
        # of that cycle (a 10 s window read 0.0208 where the cycle's average was 0.007)
        scans = KsmParams().cost_scans
        first = counter("full_scans")
        while counter("full_scans") == first:             # from a scan's end
            time.sleep(0.05)
        s0, c0, w0 = counter("full_scans"), ksmd_cpu(), time.monotonic()
        while counter("full_scans") < s0 + scans and time.monotonic() - w0 < 120:
            time.sleep(0.05)
        used = (ksmd_cpu() - c0) / (time.monotonic() - w0)
        window = (time.monotonic() - w0, counter("full_scans") - s0)
        budget = KsmParams().cpu_steady
        assert used < budget, \
            f"ksmd used {used:.4f} cores at steady state over {window}, budget {budget}"
        merge_cpu = ex.get("cpu")

        # 4. the report's "saved by merging" agrees with the kernel's counters, read
        # just before and just after it (other QEMUs on the host merge and unmerge too)
        time.sleep(2)
        k0 = counter("pages_sharing") * 4096
        doc = json.loads(f.cli("report", "--format", "json").stdout)
        k1 = counter("pages_sharing") * 4096
        kernel = k1
        mg = doc["merging"]
        assert min(k0, k1) * 0.95 <= mg["host_saved"]["now"] <= max(k0, k1) * 1.05, \
            (mg, k0, k1)
        assert min(k0, k1) <= mg["kernel_now"]["saved_bytes"] <= max(k0, k1), (mg, k0, k1)
        assert 0 < mg["fleet_saved"]["now"] <= mg["host_saved"]["now"] * 1.05
        assert mg["guests"]["v"]["max"] in (0, None)
        fit = doc["fits"][0]
        assert fit["by_observed_merged"] is not None, fit
        assert fit["by_observed_merged"]["assumed_per_guest"]["memory"] < \
            fit["by_observed"]["assumed_per_guest"]["memory"]
        assert "memory saved by merging" in f.cli("report").stdout
        page = f.root / "r.html"
        f.cli("report", "--format", "html", "-o", str(page))
        assert "Memory saved by merging" in page.read_text()
        found = json.loads((RUN_DIR / "ksm-found.json").read_text())
        assert found == MARKED

        # 5. the supervisor stops: the settings it found are back, its records gone
        stop_supervisor(f)
        assert knobs() == MARKED
        assert not (RUN_DIR / "ksm-found.json").exists()
        print(f"KSM: {sharing} merged pages in the fleet after {took:.0f}s; steady ksmd {used:.4f} "
              f"cores over {window[0]:.0f}s and {window[1]} scans (last tick's reading "
              f"{merge_cpu}); report {mg['host_saved']['now']} "
              f"vs kernel {kernel}")


IN_MODIFY, IN_CLOSE_WRITE = 0x2, 0x8


@contextlib.contextmanager
def writes_to(directory: Path):
    """Every write to a file of ``directory`` (inotify: sysfs reports them too)."""
    from cffi import FFI
    ffi = FFI()
    ffi.cdef("int inotify_init1(int flags); "
             "int inotify_add_watch(int fd, const char *path, uint32_t mask);")
    libc = ffi.dlopen(None)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    names = {}
    for p in sorted(directory.iterdir()):
        wd = libc.inotify_add_watch(fd, str(p).encode(), IN_MODIFY | IN_CLOSE_WRITE)
        assert wd >= 0, p
        names[wd] = p.name
    seen: list[str] = []

    def drain() -> list[str]:
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            i = 0
            while i < len(data):
                wd, _mask, _cookie, ln = struct.unpack_from("iIII", data, i)
                seen.append(names.get(wd, "?"))
                i += 16 + ln
        return seen
    try:
        yield drain
    finally:
        os.close(fd)


def test_off_writes_nothing_under_sys_kernel_mm_ksm(tmp_path, host_ksm):
    with writes_to(KSM_DIR) as written, \
            cli_fleet(tmp_path, FLEET.replace("@MODE@", "off")) as f:
        f.cli("apply")
        time.sleep(8)                      # several ticks, overcommitted all along
        ex = f.status(explain=True)["rebalancer"]["ksm"]
        assert ex["mode"] == "off" and "left alone" in ex["explain"]["reason"], ex
        assert ex["pages_to_scan"] == MARKED["pages_to_scan"]
        stop_supervisor(f)
        assert written() == [], written()
        assert knobs() == MARKED
        assert not (RUN_DIR / "ksm-found.json").exists()


def test_auto_keeps_the_scanning_a_host_had_before_it(tmp_path, host_ksm):
    # the host ran ksmd before the supervisor (for its own processes too): auto, with
    # memory far from short, would stop it, and keeps it at the host's rate instead
    ran = {**MARKED, "run": 1}
    set_knobs(ran)
    fleet = FLEET.replace("@MODE@", "auto").replace("memory: 1000MiB", "memory: 4GiB")
    with writes_to(KSM_DIR) as written, cli_fleet(tmp_path, fleet) as f:
        f.cli("apply")

        def explained() -> dict | None:
            ex = (f.status(explain=True).get("rebalancer") or {}).get("ksm") or {}
            return ex if (ex.get("explain") or {}).get("phase") else None
        ex = wait_for(explained, 30, "the KSM policy's first decision")
        time.sleep(3)                      # more ticks, memory not short all along
        ex = explained()
        assert ex["mode"] == "auto" and ex["explain"]["run"] is True, ex
        assert "the host ran KSM before this supervisor" in ex["explain"]["reason"], ex
        assert "memory is not short" in ex["explain"]["reason"], ex
        stop_supervisor(f)
        assert written() == [], written()
        assert knobs() == ran
