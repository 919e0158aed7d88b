"""doctor on this very machine: its verdicts must match what the host shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def host_kvm() -> tuple[str, str]:
    """What this host is, read here independently of the code under test: (kind, accel)."""
    flags = set(next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                      if ln.startswith("flags")), []))
    mods = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")}
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "absent", "tcg"
    if "kvm_pvm" in mods and not mods & {"kvm_intel", "kvm_amd"}:
        return "pvm", "tcg"
    if mods & {"kvm_intel", "kvm_amd"} and flags & {"vmx", "svm"}:
        return "hardware", "kvm"
    return ("pvm", "tcg") if "kvm_pvm" in mods else ("unknown", "tcg")


def mounts() -> list[tuple[str, str]]:
    return [(ln.split()[1], ln.split()[2]) for ln in open("/proc/mounts")]


def doctor() -> tuple[int, dict]:
    res = subprocess.run([sys.executable, "-m", "consolidator", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60)
    return res.returncode, json.loads(res.stdout)


# what the accelerator's reason must say, by the kind of host
REASON = {"hardware": ("KVM: hardware KVM",), "pvm": ("PVM", "hang"),
          "absent": ("TCG: no usable /dev/kvm",), "unknown": ("flavour is unknown",)}


def test_doctor_reports_kvm_kind_and_accel(need_root, need_qemu):
    code, rep = doctor()
    assert code == 0, rep["missing"]
    kind, accel = host_kvm()
    assert rep["kvm"]["kind"] == kind
    assert rep["accel"]["name"] == accel
    assert all(w in rep["accel"]["reason"] for w in REASON[kind]), rep["accel"]["reason"]
    assert rep["kvm"]["opens"] is (kind != "absent")
    assert rep["kvm"]["api_version"] == (None if kind == "absent" else 12)  # stable since 2.6.22


def test_doctor_reports_cgroup_mode(need_root, need_qemu):
    code, rep = doctor()
    assert code == 0, rep["missing"]
    kinds = {fs for _, fs in mounts()}
    v1 = {p.rsplit("/", 1)[-1] for p, fs in mounts() if fs == "cgroup"}
    mode = {frozenset({"cgroup", "cgroup2"}): "hybrid", frozenset({"cgroup"}): "v1",
            frozenset({"cgroup2"}): "v2"}[frozenset(kinds & {"cgroup", "cgroup2"})]
    assert rep["cgroup"]["mode"] == mode
    if {"cpu", "memory"} <= v1:
        assert rep["cgroup"]["backend"] == "v1"
        own_mem = [ln.split(":", 2)[2].strip() for ln in open("/proc/self/cgroup")
                   if ln.split(":")[1] == "memory"][0]
        sub = rep["cgroup"]["subtree"]["memory"]
        assert sub == os.path.join("/sys/fs/cgroup/memory", own_mem.lstrip("/"), "cns")
    else:                            # pure v2: one tree, below our own cgroup
        own = [ln.split(":", 2)[2].strip() for ln in open("/proc/self/cgroup")
               if ln.startswith("0::")][0]
        assert rep["cgroup"]["backend"] == "v2"
        assert rep["cgroup"]["subtree"]["unified"] == os.path.join("/sys/fs/cgroup",
                                                                   own.lstrip("/"), "cns")


def test_doctor_table_and_exit_code(need_root, need_qemu):
    res = subprocess.run([sys.executable, "-m", "consolidator", "doctor"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "qemu-system-x86_64" in res.stdout
    assert "Guests will run under" in res.stdout
    code, rep = doctor()
    assert code == 0 and rep["ok"] and rep["missing"] == []


def test_doctor_exits_4_when_qemu_is_missing(need_root, tmp_path):
    # An empty PATH: qemu, qemu-img, busybox, modinfo and nft are all absent.
    res = subprocess.run([sys.executable, "-m", "consolidator", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": str(tmp_path), "HOME": "/root"})
    assert res.returncode == 4, res.stderr
    rep = json.loads(res.stdout)
    assert {"qemu-system-x86_64", "qemu-img", "nft"} <= set(rep["missing"])
    fixes = {f["name"]: f["fix"] for f in rep["facts"]}
    assert fixes["qemu-system-x86_64"] == "apt-get install qemu-system-x86"


def test_doctor_measures_the_state_dir_s_disk_for_host_io_auto(need_root, need_qemu, tmp_path):
    from consolidator.inventory.schema import HostIo
    from consolidator.state import io_budget
    state = tmp_path / "state"
    res = subprocess.run([sys.executable, "-m", "consolidator", "--state-dir", str(state),
                          "doctor", "--measure-io", "--json"], capture_output=True, text=True,
                         timeout=120)
    io = json.loads(res.stdout)["io"]
    assert io["bps"] > 1 << 20 and io["iops"] > 10, io
    assert [p.name for p in state.iterdir() if p.name.startswith(".io-probe")] == []
    assert io_budget(HostIo(), state) == (io["bps"], io["iops"])
    assert io_budget(HostIo(bps="8MiB/s", iops=None), state) == (8 << 20, None)
