"""doctor on this very machine: its verdicts must match what the host shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def host_has_pvm() -> bool:
    flags = open("/proc/cpuinfo").read()
    return os.path.isdir("/sys/module/kvm_pvm") and " vmx" not in flags and " svm" not in flags


def mounts() -> list[tuple[str, str]]:
    return [(ln.split()[1], ln.split()[2]) for ln in open("/proc/mounts")]


def doctor() -> tuple[int, dict]:
    res = subprocess.run([sys.executable, "-m", "consolidator", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60)
    return res.returncode, json.loads(res.stdout)


def test_doctor_reports_kvm_kind_and_accel(need_root):
    code, rep = doctor()
    assert rep["kvm"]["opens"] is os.path.exists("/dev/kvm")
    if host_has_pvm():
        assert rep["kvm"]["kind"] == "pvm"
        assert rep["accel"]["name"] == "tcg"
        assert "PVM" in rep["accel"]["reason"] and "hang" in rep["accel"]["reason"]
    if os.path.exists("/dev/kvm"):
        assert rep["kvm"]["api_version"] == 12      # the stable KVM API since 2.6.22


def test_doctor_reports_cgroup_mode(need_root):
    _, rep = doctor()
    kinds = {fs for _, fs in mounts()}
    v1 = {p.rsplit("/", 1)[-1] for p, fs in mounts() if fs == "cgroup"}
    if "cgroup" in kinds and "cgroup2" in kinds:
        assert rep["cgroup"]["mode"] == "hybrid"
    if {"cpu", "memory"} <= v1:
        assert rep["cgroup"]["backend"] == "v1"
        own_mem = [ln.split(":", 2)[2].strip() for ln in open("/proc/self/cgroup")
                   if ln.split(":")[1] == "memory"][0]
        sub = rep["cgroup"]["subtree"]["memory"]
        assert sub == os.path.join("/sys/fs/cgroup/memory", own_mem.lstrip("/"), "cns")


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
