"""Capacity maths against hand-computed fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from consolidator.report.capacity import (INF, Capacity, Committed, Observed, Shape,
                                         by_guarantees, by_observed, recommend_cpu,
                                         recommend_memory, tiered)

MiB, GiB = 1 << 20, 1 << 30
# 2 CPUs - 0.5 reserve = 1.5 usable cores; 8 GiB budget; overcommit 4 vCPUs/core, 1.5x memory
CAP = Capacity(usable_cpus=1.5, budget=8 * GiB, overcommit_cpus=4.0, overcommit_memory=1.5)
NONE = Committed(0, 0.0, 0, 0)


def test_empty_host_memory_min_binds():
    # shape 1 vCPU, 1 GiB max, 1 GiB min: min -> 8 GiB / 1 GiB = 8; max -> 12 GiB / 1 = 12;
    # vCPUs -> 6 / 1 = 6 -> vCPUs bind at 6
    f = by_guarantees(Shape(1, GiB, GiB), CAP, NONE)
    assert (f.count, f.binding) == (6, "FAILVCPU")
    assert f.limits == {"cpu_reserve": INF, "vcpu_overcommit": 6, "memory_min": 8,
                        "memory_overcommit": 12}


def test_reserve_binds():
    # 0.5 cores each: 1.5 / 0.5 = 3
    f = by_guarantees(Shape(1, 256 * MiB, 128 * MiB, reserve=0.5), CAP, NONE)
    assert (f.count, f.binding) == (3, "FAILCPU")


def test_memory_binds_with_a_fleet():
    used = Committed(vcpus=2, reserve=0.25, memory_max=10 * GiB, memory_min=6 * GiB)
    # min room 8-6 = 2 GiB -> 2 of 1 GiB; max room 12-10 = 2 GiB -> 1 of 2 GiB max
    f = by_guarantees(Shape(1, 2 * GiB, GiB), CAP, used)
    assert (f.count, f.binding) == (1, "FAILMEM")
    assert f.limits["memory_min"] == 2 and f.limits["memory_overcommit"] == 1


def test_full_host_fits_nothing():
    full = Committed(vcpus=6, reserve=1.5, memory_max=12 * GiB, memory_min=8 * GiB)
    f = by_guarantees(Shape(1, 256 * MiB, 128 * MiB), CAP, full)
    assert f.count == 0


def test_shape_larger_than_the_host():
    f = by_guarantees(Shape(8, 64 * GiB, 64 * GiB, reserve=4), CAP, NONE)
    assert f.count == 0 and f.binding in ("FAILCPU", "FAILMEM", "FAILVCPU")


def test_observed_counts_with_headroom():
    # p95 use: 0.5 cores, 2 GiB. 15% headroom: cpu room 1.5*0.85-0.5 = 0.775 -> /0.2 = 3;
    # memory room 8 GiB*0.85 - 2 GiB = 4.8 GiB -> /512 MiB = 9; vCPUs 6 -> 6
    f = by_observed(Shape(1, GiB, 512 * MiB), CAP, NONE, Observed(0.5, 2 * GiB),
                    per_guest_cpu=0.2, per_guest_memory=512 * MiB)
    assert (f.count, f.binding) == (3, "FAILCPU")
    assert f.limits == {"cpu_used": 3, "memory_used": 9, "vcpu_overcommit": 6}


def test_disk_binds_when_thin_disks_may_still_grow():
    # 100 GiB free; the fleet's disks may grow by 80 - 30 = 50 GiB: 50 GiB left, 20 each
    cap = Capacity(1.5, 8 * GiB, 4.0, 1.5, disk_free=100 * GiB)
    used = Committed(1, 0.0, GiB, GiB, disk_virtual=80 * GiB, disk_allocated=30 * GiB)
    f = by_guarantees(Shape(1, 256 * MiB, 256 * MiB, disk=20 * GiB), cap, used)
    assert (f.count, f.binding) == (2, "FAILDISK")
    assert "free once the fleet's disks are full" in f.detail
    # observed: 100 GiB x 0.85 / 30 GiB held each = 2
    o = by_observed(Shape(1, 256 * MiB, 256 * MiB, disk=20 * GiB), cap, used,
                    Observed(0.1, GiB), per_guest_cpu=0.01, per_guest_memory=64 * MiB,
                    per_guest_disk=30 * GiB)
    assert (o.count, o.binding) == (2, "FAILDISK")


def test_a_shape_without_disk_ignores_disk():
    cap = Capacity(1.5, 8 * GiB, 4.0, 1.5, disk_free=0)
    f = by_guarantees(Shape(1, GiB, GiB), cap, NONE)
    assert "disk_guaranteed" not in f.limits and f.binding != "FAILDISK"


def test_tiers_shrink_along_the_binding_resource():
    # 0.5-core reserve: 3 fit (FAILCPU). Then reserve 0.25, 0.125, 0.062, 0.031 fit none
    # (no cores left unreserved); reserve 0: vCPUs bind: 6 - 3 = 3 more; then vcpus cannot
    # shrink below 1.
    tiers = tiered(Shape(1, 512 * MiB, 256 * MiB, reserve=0.5), CAP, NONE)
    assert [(t.count, t.shape.reserve, t.binding) for t in tiers] == [
        (3, 0.5, "FAILCPU"), (3, 0.0, "FAILVCPU")]


def test_tiers_halve_memory():
    cap = Capacity(usable_cpus=16, budget=4 * GiB, overcommit_cpus=4, overcommit_memory=1.0)
    tiers = tiered(Shape(1, 3 * GiB, 3 * GiB), cap, NONE)
    # 1 x 3 GiB (1 GiB left) -> 1.5 GiB shape: 0 -> 768 MiB: 1 -> 384 MiB: 0 ...
    assert tiers[0].count == 1 and tiers[0].binding == "FAILMEM"
    assert sum(t.count * t.shape.min for t in tiers) <= 4 * GiB
    assert tiers[1].shape.memory < 3 * GiB


@pytest.mark.parametrize("max_,min_,ws,rmax,rmin,word", [
    (1 * GiB, 512 * MiB, 180 * MiB, 512 * MiB, 256 * MiB, "set max 512 MiB, min 256 MiB"),
    (512 * MiB, 256 * MiB, 180 * MiB, 512 * MiB, 256 * MiB, "sized about right"),
    (256 * MiB, 128 * MiB, 240 * MiB, 640 * MiB, 320 * MiB, "runs near max"),
    (256 * MiB, 128 * MiB, None, None, None, "no history yet"),
])
def test_memory_recommendation(max_, min_, ws, rmax, rmin, word):
    got_max, got_min, reason = recommend_memory(max_, min_, ws)
    assert (got_max, got_min) == (rmax, rmin)
    assert word in reason


@pytest.mark.parametrize("vcpus,reserve,p95,word", [
    (4, 0.0, 0.3, "1 vCPUs would do"),
    (1, 0.5, 0.1, "lower the reserve"),
    (2, 0.0, 1.95, "consider more"),
    (1, 0.0, 0.5, "about right"),
    (1, 0.0, None, "no history"),
])
def test_cpu_recommendation(vcpus, reserve, p95, word):
    assert word in recommend_cpu(vcpus, reserve, p95)


def test_report_with_no_history_still_gives_allocations_and_fits(tmp_path):
    from consolidator.hostfacts import HostFacts
    from consolidator.model import load_fleet
    from consolidator.report.document import build
    from consolidator.state import StateDir
    root = Path(__file__).resolve().parents[2]
    facts = HostFacts(cpus=(0, 1), memory_total=8 << 30)
    fleet = load_fleet(root / "inventory.yaml", facts)
    st = StateDir(tmp_path / "state").ensure()
    st.write_applied(fleet, "", complete=True, index=1)
    doc = build(st.root, "1h", facts=facts)
    assert doc["window"]["note"].startswith("no history recorded yet")
    assert doc["host"]["committed"]["vcpus"] == 3
    # by hand: 2 CPUs - 0.5 reserved = 1.5 usable; 3 x 0.25 reserved leaves 0.75, so 3
    # more guests of reserve 0.25 (the vCPU ratio, 4 x 1.5 - 3 = 3, ties; memory allows
    # 39 by overcommit and 52 by minimums): CPU binds first
    assert [(f["shape"], f["by_guarantees"]["count"], f["by_guarantees"]["binding"])
            for f in doc["fits"]] == [("vcpus=1,memory=256MiB,min=128MiB,reserve=0.25", 3,
                                       "FAILCPU"),
                                      ("vcpus=1,memory=256MiB,min=160MiB,reserve=0.25", 3,
                                       "FAILCPU")]
    assert doc["fits"][0]["by_guarantees"]["limits"] == {
        "cpu_reserve": 3, "vcpu_overcommit": 3, "memory_min": 52, "memory_overcommit": 39}
    assert doc["fits"][0]["by_observed"] is None and doc["charts"] is None
    assert all(g["recommendation"]["memory"] == "no history yet" for g in doc["guests"])
    # every rendering works without history
    import io

    from rich.console import Console

    from consolidator.report.document import to_json
    from consolidator.report.text import tables, to_prom
    buf = io.StringIO()
    con = Console(file=buf, width=120, highlight=False)
    for r in tables(doc):
        con.print(r)
    text = buf.getvalue()
    assert "how many more fit" in text and "no history" in text and "FAIL" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    assert '"format": 1' in to_json(doc)
    assert "consolidator_fits_guests{" in to_prom(doc)
