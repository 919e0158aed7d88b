"""cgroup knob maths and the writes each backend makes (v2 is tested here: hosts like the
development machines have cpu and memory on v1)."""

from __future__ import annotations

import pytest

from consolidator.sched.cgroup import (CgroupSettings, memory_limit, memory_protection,
                                       parse_psi, shares_to_weight, v1_writes, v2_writes)

MiB = 1 << 20


@pytest.mark.parametrize("shares,weight", [
    (1024, 100), (2048, 200), (512, 50), (2, 1), (10, 1), (11, 1), (20, 1), (21, 2),
    (102400, 10000), (262144, 10000), (100, 9),
])
def test_shares_to_weight_is_the_systemd_conversion(shares, weight):
    assert shares_to_weight(shares) == weight


def test_weight_is_never_the_oci_linear_39():
    assert shares_to_weight(1024) != 39


@pytest.mark.parametrize("guest_max,tb,limit", [
    # guest RAM + 96 MiB of QEMU (measured: 90-101 MiB) + the translation cache + 2 % of
    # guest RAM (page tables, dirty bitmaps), rounded down to whole 4 KiB pages:
    # 256 + 96 + 64 MiB + 5368709 bytes = 441576325 -> 441573376
    (256 * MiB, 64, 441573376),
    # 1024 + 96 + 32 MiB + 21474836 bytes (2 % of 1 GiB) = 1229434388 -> 1229430784
    (1024 * MiB, 32, 1229430784),
])
def test_memory_limit_is_the_documented_allowance(guest_max, tb, limit):
    assert memory_limit(guest_max, tb) == limit


def test_memory_protection_is_the_floor_plus_qemu():
    assert memory_protection(128 * MiB) == 224 * MiB


SETTINGS = CgroupSettings(cpu_shares=3072, cpu_quota_cores=0.25, cpus=(0, 1, 3),
                          memory_limit=500 * MiB + 123, memory_low=300 * MiB, pids_max=512)


def test_v2_writes():
    assert v2_writes(SETTINGS, "") == [
        ("cpu", "cpu.weight", "300"),
        ("cpu", "cpu.max", "25000 100000"),
        ("cpuset", "cpuset.cpus", "0-1,3"),
        ("memory", "memory.max", str(500 * MiB)),
        ("memory", "memory.low", str(300 * MiB)),
        ("pids", "pids.max", "512"),
    ]


def test_v2_writes_without_caps():
    w = dict(((c, f), v) for c, f, v in v2_writes(CgroupSettings(), ""))
    assert w[("cpu", "cpu.max")] == "max 100000"
    assert w[("memory", "memory.max")] == "max"
    assert w[("cpuset", "cpuset.cpus")] == ""          # empty: inherit the parent's
    assert w[("cpu", "cpu.weight")] == "100"


def test_v1_writes():
    w = dict(((c, f), v) for c, f, v in v1_writes(SETTINGS, "0-1"))
    assert w[("cpu", "cpu.shares")] == "3072"
    assert w[("cpu", "cpu.cfs_quota_us")] == "25000"
    assert w[("cpuset", "cpuset.cpus")] == "0-1,3"
    assert w[("memory", "memory.limit_in_bytes")] == str(500 * MiB)
    assert w[("memory", "memory.soft_limit_in_bytes")] == str(300 * MiB)
    free = dict(((c, f), v) for c, f, v in v1_writes(CgroupSettings(), "0-1"))
    assert free[("cpu", "cpu.cfs_quota_us")] == "-1"
    assert free[("cpuset", "cpuset.cpus")] == "0-1"    # v1 has no inheritance: copy it


def test_tiny_quota_is_floored_at_the_kernel_minimum():
    w = dict(((c, f), v) for c, f, v in v1_writes(CgroupSettings(cpu_quota_cores=0.001), ""))
    assert w[("cpu", "cpu.cfs_quota_us")] == "1000"


def test_parse_psi():
    text = ("some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n"
            "full avg10=0.10 avg60=0.00 avg300=0.00 total=99\n")
    p = parse_psi(text)
    assert p["some_avg10"] == 1.5 and p["full_total"] == 99
