"""Disaster recovery end to end: snapshots, backups and restores of real guests' disks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from consolidator.daemon.recovery import _check_offline
from consolidator.errors import ConflictError
from consolidator.vm.storage import DiskNode

from .env import CliFleet, cli_fleet, leftovers

pytestmark = pytest.mark.usefixtures("need_root", "tiny_image")

FLEET = """
instance: {inst}
host: {{fabric_netns: {inst}-fab}}
guests:
  app:
    memory: {{max: 192MiB}}
    disks: [{{size: 64MiB, name: data}}]
  db:
    memory: {{max: 192MiB}}
    disks: [{{size: 64MiB, name: data}}]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> CliFleet:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with cli_fleet(tmp_path_factory.mktemp("dr"), FLEET) as f:
        f.cli("apply")
        yield f
    assert leftovers(f.instance) == []


def sh(f: CliFleet, guest: str, command: str) -> str:
    """Run ``command`` in the guest through its agent; its output (rc 0 asserted)."""
    res = f.cli("agent", guest, "sh", command)
    reply = res.stdout.strip()
    fields = dict(p.split("=", 1) for p in reply.split() if "=" in p)
    out = base64.b64decode(fields.get("out", "")).decode()
    assert fields.get("rc") == "0", f"{command}: {reply} {out}"
    return out


def write(f: CliFleet, guest: str, text: str) -> None:
    sh(f, guest, f"printf '%s' '{text}' | dd of=/dev/vda bs=512 conv=fsync,notrunc 2>/dev/null")


def read(f: CliFleet, guest: str, n: int) -> str:
    return sh(f, guest, f"dd if=/dev/vda bs=1 count={n} 2>/dev/null")


def snapshots(f: CliFleet, guest: str) -> dict[str, dict]:
    res = json.loads(f.cli("snapshot", "list", guest, "--json").stdout)
    return {s["tag"]: s for s in res}


def test_revert_brings_a_disk_back(fleet):
    write(fleet, "app", "PATTERN-ONE")
    res = json.loads(fleet.cli("snapshot", "create", "app", "--tag", "one", "--json").stdout)
    assert res["guests"][0]["kind"] == "frozen"         # the tiny image's agent froze it
    write(fleet, "app", "OVERWRITE-2")
    assert read(fleet, "app", 11) == "OVERWRITE-2"
    pid = fleet.guests()["app"]["pid"]
    out = fleet.cli("snapshot", "revert", "app", "one").stdout
    assert "applied to its disks" in out
    g = fleet.guests()["app"]
    assert g["state"] == "running" and g["pid"] != pid   # a disk-only revert restarts it
    assert read(fleet, "app", 11) == "PATTERN-ONE"
    snaps = snapshots(fleet, "app")
    assert snaps["one"]["kind"] == "frozen" and snaps["one"]["disks"] == ["data-data"]
    assert snaps["one"]["missing_on"] == []
    fleet.cli("snapshot", "rm", "app", "one")
    assert "one" not in snapshots(fleet, "app")


def test_a_memory_revert_resumes_a_process_that_was_running(fleet):
    sh(fleet, "db", "sleep 7777 >/dev/null 2>&1 </dev/null & echo $! > /run/sleeper")
    res = json.loads(fleet.cli("snapshot", "create", "db", "--memory", "--tag", "mem",
                               "--json").stdout)
    assert res["guests"][0]["kind"] == "memory" and res["window_ms"] > 0
    sh(fleet, "db", "kill $(cat /run/sleeper)")
    assert "sleep 7777" not in sh(fleet, "db", "ps")
    pid = fleet.guests()["db"]["pid"]
    out = fleet.cli("snapshot", "revert", "db", "mem").stdout
    assert "loaded in place" in out
    assert fleet.guests()["db"]["pid"] == pid            # the same QEMU, resumed
    assert "sleep 7777" in sh(fleet, "db", "ps")
    snap = snapshots(fleet, "db")["mem"]
    assert snap["memory"] and snap["vm_state_size"] > 1 << 20
    fleet.cli("snapshot", "rm", "db", "mem")


def test_the_fleet_is_frozen_snapshotted_and_thawed_at_one_instant(fleet):
    for g in ("app", "db"):
        sh(fleet, g, "rm -f /run/agent/freeze.log")
    res = json.loads(fleet.cli("snapshot", "create", "--all", "--tag", "tier",
                               "--json").stdout)
    assert {g["name"]: g["kind"] for g in res["guests"]} == {"app": "frozen", "db": "frozen"}
    assert all(g["group"] for g in res["guests"])
    assert 0 < res["window_ms"] < 5000
    for g in ("app", "db"):
        log = [line.split()[1] for line in sh(fleet, g, "cat /run/agent/freeze.log").split("\n")
               if line]
        assert log == ["freeze", "thaw"]
        assert snapshots(fleet, g)["tier"]["group"]
    # a tag is unique per guest
    res = fleet.cli("snapshot", "create", "app", "--tag", "tier", check=False)
    assert res.returncode == 5 and "already has a snapshot 'tier'" in res.stderr
    for g in ("app", "db"):
        fleet.cli("snapshot", "rm", g, "tier")


def test_a_stopped_guest_is_snapshotted_and_reverted_offline(fleet):
    write(fleet, "app", "OFFLINE-AAA")
    fleet.cli("stop", "app")
    fleet.cli("snapshot", "create", "app", "--tag", "cold")
    assert snapshots(fleet, "app")["cold"]["kind"] == "offline"
    fleet.cli("start", "app")
    write(fleet, "app", "CHANGED-BBB")
    fleet.cli("stop", "app")
    fleet.cli("snapshot", "revert", "app", "cold")
    assert fleet.guests()["app"]["state"] == "stopped"    # it stays as it was
    fleet.cli("start", "app")
    assert read(fleet, "app", 11) == "OFFLINE-AAA"
    fleet.cli("snapshot", "rm", "app", "cold")


def test_bad_tags_and_raw_disks_are_refused(fleet, tmp_path):
    res = fleet.cli("snapshot", "create", "app", "--tag", "../x", check=False)
    assert res.returncode == 2 and "snapshot tag" in res.stderr
    res = fleet.cli("snapshot", "revert", "app", "nosuch", check=False)
    assert res.returncode == 2 and "no snapshot 'nosuch'" in res.stderr
    raw = tmp_path / "data-raw.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    with pytest.raises(ConflictError, match="is raw: internal snapshots need qcow2"):
        _check_offline("g", DiskNode("data-raw", Path(raw), "data-raw"))
