"""Disaster recovery end to end: snapshots, backups and restores of real guests' disks."""

from __future__ import annotations

import base64
import json
import re
import os
import shutil
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
networks:
  back: {{subnet: 10.81.0.0/24}}
guests:
  app:
    memory: {{max: 192MiB}}
    disks: [{{size: 1GiB, name: data}}]
    nics: [{{network: back, ip: 10.81.0.10}}]
  db:
    memory: {{max: 192MiB}}
    disks: [{{size: 64MiB, name: data}}]
    backup: {{keep: {{last: 1, daily: 0, weekly: 0}}}}
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
    """Run ``command`` in the guest through its agent (the supervisor's API, as the
    ``agent`` command does, without a process per call); its output (rc 0 asserted)."""
    from consolidator.daemon import protocol
    with protocol.Client(protocol.socket_path(f.state)) as c:
        reply = c.call("agent", name=guest, command="sh", arg=command, timeout=60)["reply"]
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
    # without --tag: the default tag, snap-DATE-TIME (it was refused as a null tag)
    res = json.loads(fleet.cli("snapshot", "create", "app", "--json").stdout)
    assert re.fullmatch(r"snap-\d{8}-\d{6}", res["tag"]), res
    fleet.cli("snapshot", "rm", "app", res["tag"])


def test_a_stopped_guest_is_snapshotted_and_reverted_offline(fleet):
    write(fleet, "app", "OFFLINE-AAA")
    fleet.cli("stop", "app")
    fleet.cli("snapshot", "create", "app", "--tag", "cold")
    assert snapshots(fleet, "app")["cold"]["kind"] == "offline"
    disk = fleet.state / "guests" / "app" / "data-data.qcow2"      # changed while stopped
    subprocess.run(["qemu-io", "-c", "write -P 0x42 0 512", str(disk)], check=True,
                   capture_output=True)
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


def backup(f: CliFleet, *args: str) -> dict:
    return json.loads(f.cli("backup", *args, "--json").stdout)


def disk_sum(f: CliFleet, guest: str, mib: int) -> str:
    return sh(f, guest, f"dd if=/dev/vda bs=1M count={mib} 2>/dev/null | sha256sum").split()[0]


def restored_sum(backup_dir: Path, ref: str, label: str, mib: int, tmp: Path) -> str:
    """The disk as the backup holds it (through its parents), first ``mib`` MiB."""
    from consolidator.backup.repo import Repo
    repo = Repo(backup_dir)
    out = tmp / f"{label}.qcow2"
    repo.materialize(repo.find(ref), label, out, None)
    raw = tmp / f"{label}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(raw)], check=True)
    import hashlib
    with open(raw, "rb") as fh:
        return hashlib.sha256(fh.read(mib << 20)).hexdigest()


def test_incremental_backups_copy_what_changed(fleet, tmp_path):
    sh(fleet, "app", "dd if=/dev/urandom of=/dev/vda bs=1M count=24 conv=fsync 2>/dev/null")
    first = backup(fleet, "app")["backups"][0]
    assert first["kind"] == "full" and first["reason"] == "the first backup of this guest"
    assert first["consistency"] == "frozen"
    sh(fleet, "app", "dd if=/dev/urandom of=/dev/vda bs=1M count=8 seek=40 conv=fsync "
                     "2>/dev/null")
    want = disk_sum(fleet, "app", 48)
    second = backup(fleet, "app")["backups"][0]
    assert second["kind"] == "incremental", second
    data = second["disks"]["data-data"]
    assert data["parent"] == first["stamp"]
    assert 8 << 20 <= data["bytes"] < 10 << 20, data      # the 8 MiB changed, no more
    assert data["virtual_size"] == 1 << 30
    assert restored_sum(fleet.state / "backups", second["id"], "data-data", 48,
                        tmp_path) == want
    res = json.loads(fleet.cli("backup", "verify", "app", "--json").stdout)
    assert res["ok"] and len(res["results"]) == 2
    listed = json.loads(fleet.cli("backup", "list", "app", "--json").stdout)
    assert [b["id"] for b in listed["backups"]] == [first["id"], second["id"]]
    assert listed["usage"]["fs_free"] > 0


def test_a_corrupt_byte_fails_verify_naming_the_backup_and_file(fleet):
    last = backup(fleet, "app")["backups"][0]
    path = fleet.state / "backups" / "app" / last["stamp"] / "data-data.qcow2"
    with open(path, "r+b") as fh:
        fh.seek(-4096, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-4096, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))
    res = fleet.cli("backup", "verify", last["id"], check=False)
    assert res.returncode == 1
    assert f"{last['id']}: data-data.qcow2: checksum mismatch" in res.stderr
    with open(path, "r+b") as fh:                      # put it back
        fh.seek(-4096, os.SEEK_END)
        fh.write(b)
    assert fleet.cli("backup", "verify", last["id"]).returncode == 0


def test_a_revert_makes_the_next_backup_full_and_says_why(fleet):
    backup(fleet, "app")
    fleet.cli("snapshot", "create", "app", "--tag", "before")
    fleet.cli("snapshot", "revert", "app", "before")
    after = backup(fleet, "app")["backups"][0]
    assert after["kind"] == "full"
    assert after["reason"].startswith("reverted to snapshot before")
    assert backup(fleet, "app")["backups"][0]["kind"] == "incremental"
    fleet.cli("snapshot", "rm", "app", "before")


def test_pruning_merges_a_removed_backup_into_the_one_kept(fleet, tmp_path):
    sh(fleet, "db", "dd if=/dev/urandom of=/dev/vda bs=1M count=4 conv=fsync 2>/dev/null")
    backup(fleet, "db")
    sh(fleet, "db", "dd if=/dev/urandom of=/dev/vda bs=1M count=2 seek=8 conv=fsync "
                    "2>/dev/null")
    want = disk_sum(fleet, "db", 16)
    last = backup(fleet, "db")["backups"][0]         # keep: last 1: the first one goes
    assert last["kind"] == "incremental"
    listed = json.loads(fleet.cli("backup", "list", "db", "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == [last["id"]]
    assert listed[0]["disks"]["data-data"]["parent"] is None    # it holds it all now
    assert restored_sum(fleet.state / "backups", last["id"], "data-data", 16,
                        tmp_path) == want
    assert json.loads(fleet.cli("backup", "verify", "db", "--json").stdout)["ok"]


def test_restore_in_place_puts_the_replaced_disk_aside(fleet):
    write(fleet, "app", "RESTORE-ME1")
    b = backup(fleet, "app")["backups"][0]
    write(fleet, "app", "SCRIBBLED-2")
    res = fleet.cli("restore", "app", check=False)            # no terminal: -y is needed
    assert res.returncode == 5 and "confirm with -y" in res.stderr
    res = json.loads(fleet.cli("restore", "app", "-y", "--json").stdout)
    r = res["restored"][0]
    assert r["backup"] == b["id"] and r["state"] == "running"
    assert [Path(p).name for p in r["aside"]][0].startswith("data-data.replaced-")
    assert read(fleet, "app", 11) == "RESTORE-ME1"
    aside = Path(r["aside"][0])
    assert aside.exists()
    subprocess.run(["qemu-img", "info", "-U", str(aside)], check=True, capture_output=True)
    aside.unlink()
    # restored disks have no bitmap: the next backup is full, and says why
    nxt = backup(fleet, "app")["backups"][0]
    assert nxt["kind"] == "full" and nxt["reason"].startswith("restored from backup")


def test_restore_as_a_new_guest_gets_its_own_identity(fleet):
    write(fleet, "app", "CLONE-DATA3")
    backup(fleet, "app")
    res = json.loads(fleet.cli("restore", "app", "--as", "app2", "--json").stdout)
    assert res["applied"]["ok"], res
    g = fleet.guests()
    assert g["app2"]["state"] == "running"
    assert read(fleet, "app2", 11) == "CLONE-DATA3"
    applied = json.loads((fleet.state / "applied.json").read_text())["fleet"]["guests"]
    assert applied["app2"]["nics"][0]["mac"] != applied["app"]["nics"][0]["mac"]
    nic = applied["app2"]["nics"][0]        # a DHCP network: an address allocated anew
    assert nic["allocated"] and nic["ip"].startswith("10.81.0.") and nic["ip"] != "10.81.0.10"
    assert "app2:" in Path(res["inventory"]).read_text()
    # it is outside the operator's inventory: an apply with --prune removes it
    fleet.cli("apply", "--prune", "--purge")
    assert "app2" not in fleet.guests()


DRILL = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, backup: {{dir: BACKUPS}}}}
guests:
  web:
    disks: [{{size: 32MiB, name: www}}]
  db:
    disks: [{{size: 32MiB, name: rows}}]
"""


@pytest.mark.long          # beside the real-OS boots: it evens the two parallel phases
def test_the_disaster_drill_brings_the_fleet_back_on_an_empty_state_dir(tmp_path, fleet):
    backups = tmp_path / "offsite"
    with cli_fleet(tmp_path, DRILL.replace("BACKUPS", str(backups))) as f:
        f.cli("apply")
        for g in ("web", "db"):
            write(f, g, f"DATA-OF-{g:>3}")
        res = backup(f, "--all")
        assert len(res["backups"]) == 2 and not res["failures"]
        f.cli("destroy", "--yes", "--purge")
        assert not (f.state / "guests" / "web").exists()
        # the box is lost: a new state dir, only the backup directory
        f.root = tmp_path / "newhost"
        f.root.mkdir()
        res = json.loads(f.cli("restore", "--all", "--from", str(backups), "--json").stdout)
        assert res["applied"]["ok"], res
        assert sorted(r["name"] for r in res["restored"]) == ["db", "web"]
        guests = f.guests()
        assert {n: g["state"] for n, g in guests.items()} == {"web": "running",
                                                              "db": "running"}
        for g in ("web", "db"):
            assert read(f, g, 11) == f"DATA-OF-{g:>3}"
        # a second restore --all into the same instance asks first
        res = f.cli("restore", "--all", "--from", str(backups), check=False)
        assert res.returncode == 5 and "confirm with -y" in res.stderr
        # nor into a state dir that runs another instance; one guest may join it
        res = fleet.cli("restore", "--all", "--from", str(backups), check=False)
        assert res.returncode == 5 and f"the backups are of instance {f.instance}" in \
            res.stderr
        res = json.loads(fleet.cli("restore", "web", "--from", str(backups), "--json").stdout)
        assert res["applied"]["ok"], res
        assert any(f"from instance {f.instance} into {fleet.instance}" in n
                   for n in res["notes"])
        assert read(fleet, "web", 11) == "DATA-OF-web"
        fleet.cli("apply", "--prune", "--purge")          # it is not in that inventory
        assert "web" not in fleet.guests()
    assert leftovers(f.instance) == []


def test_a_corrupt_backup_is_refused_unless_another_is_named(fleet):
    write(fleet, "app", "GOOD-OLDER4")
    older = backup(fleet, "app")["backups"][0]
    write(fleet, "app", "BAD-NEWER-5")
    newer = backup(fleet, "app")["backups"][0]
    path = fleet.state / "backups" / "app" / newer["stamp"] / "data-data.qcow2"
    with open(path, "r+b") as fh:
        fh.seek(-512, os.SEEK_END)
        fh.write(b"\xde\xad")
    res = fleet.cli("restore", "app", "-y", check=False)
    assert res.returncode == 5
    assert f"backup {newer['id']} does not verify" in res.stderr and "--backup" in res.stderr
    fleet.cli("restore", "app", "-y", "--backup", older["stamp"])
    assert read(fleet, "app", 11) == "GOOD-OLDER4"
    shutil.rmtree(path.parent)                       # the broken one goes
    for p in (fleet.state / "guests" / "app").glob("*.replaced-*"):
        p.unlink()


def test_a_full_backup_dir_fails_cleanly_and_keeps_what_it_had(fleet, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)],
                   check=True)
    inventory = fleet.inventory.read_text()
    backup(fleet, "app")                          # in the usual dir: the chain to keep
    try:
        fleet.write(inventory.replace("host: {", f"host: {{backup: {{dir: {small}}}, ", 1))
        fleet.cli("apply")
        ok = backup(fleet, "db")["backups"][0]                   # a few MiB: it fits
        sh(fleet, "app", "dd if=/dev/urandom of=/dev/vda bs=1M count=16 seek=64 "
                         "conv=fsync 2>/dev/null")
        res = fleet.cli("backup", "app", check=False)
        assert res.returncode == 1 and "backup failed" in res.stderr
        assert "No space left" in res.stderr or "ENOSPC" in res.stderr or \
            "space" in res.stderr, res.stderr
        assert not list((small / "app").glob(".partial-*"))
        assert not [b for b in (small / "app").iterdir()] if (small / "app").exists() \
            else True
        assert fleet.guests()["app"]["state"] == "running"
        res = json.loads(fleet.cli("backup", "verify", "--dir", str(small),
                                   "--json").stdout)
        assert res["ok"] and [r["id"] for r in res["results"]] == [ok["id"]]
    finally:
        fleet.write(inventory)
        fleet.cli("apply")
        subprocess.run(["umount", str(small)], check=True)
    # the failed attempt took nothing away: the usual dir's chain goes on
    assert backup(fleet, "app")["backups"][0]["kind"] == "incremental"


def test_a_supervisor_killed_mid_backup_leaves_the_chain_whole(fleet):
    import signal
    import threading
    import time
    sh(fleet, "app", "dd if=/dev/urandom of=/dev/vda bs=1M count=64 seek=128 conv=fsync "
                     "2>/dev/null")
    before = {n: g["pid"] for n, g in fleet.guests().items()}
    sup = fleet.supervisor_pid()
    t = threading.Thread(target=lambda: fleet.cli("backup", "app", "--full", check=False))
    t.start()
    part = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list((fleet.state / "backups" / "app").glob(".partial-*/data-data.qcow2"))
        if parts and parts[0].stat().st_size > 1 << 20:
            part = parts[0]
            os.kill(sup, signal.SIGKILL)
            break
        time.sleep(0.002)
    t.join()
    assert part is not None, "the backup was never seen under way"
    assert {n: g["pid"] for n, g in fleet.guests().items()} == before   # guests run on
    assert json.loads(fleet.cli("backup", "verify", "app", "--json").stdout)["ok"]
    nxt = backup(fleet, "app")["backups"][0]
    assert nxt["kind"] == "incremental", nxt          # the last kept bitmap survived
    assert not list((fleet.state / "backups" / "app").glob(".partial-*"))
    assert json.loads(fleet.cli("backup", "verify", nxt["id"], "--json").stdout)["ok"]


CLONES = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, overcommit: {{cpus: 8}}}}
images:
  base: {{builtin: tiny, disk: base.qcow2}}
networks:
  lan: {{subnet: 10.82.0.0/24}}
guests:
  web:
    image: base
    memory: {{max: 96MiB}}
    nics: [{{network: lan, ip: 10.82.0.10}}]
"""


@pytest.mark.long
def test_eight_linked_clones_cost_one_template_and_small_overlays(tmp_path):
    with cli_fleet(tmp_path, CLONES) as f:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(f.root / "base.qcow2"),
                        "64M"], check=True)
        f.cli("apply")
        sh(f, "web", "dd if=/dev/urandom of=/dev/vda bs=1M count=4 seek=8 conv=fsync "
                     "2>/dev/null; printf GOLDEN-IMG | dd of=/dev/vda conv=fsync,notrunc "
                     "2>/dev/null")
        f.cli("snapshot", "create", "web", "--tag", "gold")
        want = disk_sum(f, "web", 16)
        sh(f, "web", "printf CHANGED-AF | dd of=/dev/vda conv=fsync,notrunc 2>/dev/null")
        clones = "".join(f"  c{i}:\n    image: golden\n    memory: {{max: 96MiB}}\n"
                         f"    nics: [{{network: lan, ip: 10.82.0.{20 + i}}}]\n"
                         for i in range(1, 9))
        f.write(f.inventory.read_text().replace(
            "networks:", "  golden: {from: web@gold}\nnetworks:") + clones)
        res = f.cli("apply")
        assert "8 to create" in res.stdout, res.stdout
        guests = f.guests()
        assert all(guests[f"c{i}"]["state"] == "running" for i in range(1, 9))
        for i in (1, 8):
            assert read(f, f"c{i}", 10) == "GOLDEN-IMG"
            assert disk_sum(f, f"c{i}", 16) == want
        template = f.state / "images" / "templates" / "web@gold.qcow2"
        assert template.stat().st_size < 6 << 20            # the snapshot's delta
        overlays = [f.state / "guests" / f"c{i}" / "disk.qcow2" for i in range(1, 9)]
        assert all(o.stat().st_size < 1 << 20 for o in overlays)
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                          "--backing-chain", str(overlays[0])],
                                         capture_output=True, text=True, check=True).stdout)
        assert [Path(i["filename"]).name for i in info] == ["disk.qcow2", "web@gold.qcow2",
                                                             "base.qcow2"]
        applied = json.loads((f.state / "applied.json").read_text())["fleet"]["guests"]
        assert len({applied[f"c{i}"]["nics"][0]["mac"] for i in range(1, 9)}) == 8
        ids = {(f.state / "guests" / f"c{i}" / "instance-id").read_text()
               for i in range(1, 9) if (f.state / "guests" / f"c{i}" / "instance-id").exists()}
        assert len(ids) in (0, 8)           # the tiny image has no cloud-init seed
    assert leftovers(f.instance) == []


def test_the_report_status_and_metrics_show_storage_and_backup_age(fleet):
    b = backup(fleet, "db")["backups"][0]
    doc = json.loads(fleet.cli("report", "--format", "json").stdout)
    sto = doc["storage"]
    db = sto["guests"]["db"]
    assert db["disks"][0]["file"] == "data-data.qcow2"
    assert db["disks"][0]["virtual_size"] == 64 << 20
    assert db["allocated"] > 0      # (may pass the virtual size: snapshots live inside)
    assert db["backups"]["last"] == b["id"] and db["backups"]["count"] >= 1
    assert 0 <= db["backups"]["age_s"] < 120
    assert sto["state_fs"]["free"] > 0 and sto["backup_dir"]["free"] > 0
    assert any(f["shape"].endswith("disk=64MiB") for f in doc["fits"])
    row = fleet.guests()["db"]["backup"]
    assert row["last"] == b["id"] and row["age_s"] < 120 and row["failure"] is None
    prom = fleet.cli("report", "--format", "prom").stdout
    assert f'consolidator_guest_backup_age_seconds{{fleet="{fleet.instance}",guest="db"}}' \
        in prom
    assert "consolidator_host_backup_fs_free_bytes" in prom
    text = fleet.cli("report").stdout
    assert "storage: disks" in text and b["id"] in text


def test_the_supervisor_backs_up_on_schedule_and_prunes(fleet):
    import time
    inventory = fleet.inventory.read_text()
    assert "backup: {keep: {last: 1, daily: 0, weekly: 0}}" in inventory
    try:
        fleet.write(inventory.replace("backup: {keep: {last: 1, daily: 0, weekly: 0}}",
                                      "backup: {every: 1s, keep: {last: 2, daily: 0, "
                                      "weekly: 0}}"))
        before = len([e for e in fleet.log("db") if e.get("event") == "backup_done"])
        fleet.cli("apply")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [e for e in fleet.log("db") if e.get("event") == "backup_done"][before:]
            if len(done) >= 3:
                break
            time.sleep(0.25)
        assert len(done) >= 3, done
        listed = json.loads(fleet.cli("backup", "list", "db", "--json").stdout)["backups"]
        assert len(listed) == 2                              # keep: last 2
        assert listed[-1]["kind"] == "incremental"
    finally:
        fleet.write(inventory)
        fleet.cli("apply")
