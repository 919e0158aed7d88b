"""QEMU confined: a uid of its own per guest, a jail, descriptors instead of paths."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from consolidator.vm.identity import REGISTRY

from .env import CliFleet, cli_fleet, leftovers
from .test_supervisor import _disk_image

pytestmark = pytest.mark.usefixtures("need_root", "tiny_image")

FLEET = """
instance: {inst}
host: {{fabric_netns: {inst}-fab}}
networks:
  lan: {{subnet: 10.93.0.0/24, gateway: 10.93.0.1}}
images:
  rooted: {{builtin: tiny, disk: ./root.raw}}
guests:
  one: {{image: rooted, memory: {{max: 128MiB}}, nics: [{{network: lan, ip: 10.93.0.11}}]}}
  two: {{image: rooted, memory: {{max: 128MiB}}, nics: [{{network: lan, ip: 10.93.0.12}}]}}
  three: {{image: rooted, memory: {{max: 128MiB}}}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> CliFleet:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with cli_fleet(tmp_path_factory.mktemp("confined"), FLEET) as f:
        _disk_image(f.root)
        f.cli("apply")
        yield f
    assert leftovers(f.instance) == []


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (x.partition(":") for x in lines)}


def as_uid(uid: int, gid: int, fn) -> str:
    """Run ``fn()`` in a child that has become ``uid``/``gid`` (no groups, no caps): its
    result, or the name of the exception it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            out = str(fn())
        except BaseException as e:  # noqa: BLE001
            out = type(e).__name__
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_every_qemu_runs_as_a_uid_of_its_own_never_root(fleet):
    guests = fleet.guests()
    assert sorted(guests) == ["one", "three", "two"]
    uids = {}
    for name, g in guests.items():
        st = proc_status(g["pid"])
        uid_fields, gid_fields = st["Uid"].split(), st["Gid"].split()
        assert len(set(uid_fields)) == 1 and len(set(gid_fields)) == 1, st["Uid"]
        uid = int(uid_fields[0])
        assert uid != 0 and int(gid_fields[0]) == uid
        assert st["Groups"] == "" and int(st["CapEff"], 16) == 0 and \
            int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        rec = json.loads((fleet.state / "guests" / name / "record.json").read_text())
        assert rec["facts"]["identity"] == {"uid": uid, "gid": uid} and g["uid"] == uid
        claim = json.loads((REGISTRY / str(uid)).read_text())
        assert claim["guest"] == name and claim["state"] == str(fleet.state.resolve())
        uids[name] = uid
    assert len(set(uids.values())) == 3, uids


def test_a_guest_cannot_read_another_guests_overlay(fleet):
    guests = fleet.guests()
    overlays = {n: fleet.state / "guests" / n / "disk.qcow2" for n in guests}
    ids = {n: int(proc_status(g["pid"])["Uid"].split()[0]) for n, g in guests.items()}
    for name, path in overlays.items():
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (ids[name], ids[name])
        assert stat.S_IMODE(st.st_mode) == 0o600
    base = fleet.root / "root.raw"
    assert base.stat().st_uid == 0, "the base image is not handed to any guest"

    def read(path: Path):
        return lambda: len(path.open("rb").read(512))

    # one's uid reads none of the others' overlays: not by their path, and not even its
    # own by path (the state dir is root's): QEMU has its overlay as a descriptor
    for other in ("two", "three"):
        assert as_uid(ids["one"], ids["one"], read(overlays[other])) == "PermissionError"
    assert as_uid(ids["one"], ids["one"], read(base)) == "PermissionError"
    # and were the directories open to it, the file's own mode would still refuse it
    two_uid = ids["two"]
    fd = os.open(overlays["two"], os.O_RDONLY)
    try:
        assert as_uid(ids["one"], ids["one"], lambda: os.read(
            os.open(f"/proc/self/fd/{fd}", os.O_RDONLY), 16)) == "PermissionError"
    finally:
        os.close(fd)
    assert two_uid != ids["one"]


def test_qemu_sees_a_jail_without_the_hosts_files(fleet):
    g = fleet.guests()["one"]
    root = Path(f"/proc/{g['pid']}/root")
    top = {p.name for p in root.iterdir()}
    assert {"usr", "dev", "proc", "tmp"} <= top
    assert top <= {"usr", "dev", "proc", "tmp", "etc", "bin", "sbin", "lib", "lib32",
                   "lib64", "libx32"}, top
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["ld.so.cache"]
    assert {p.name for p in (root / "dev").iterdir()} <= {"null", "zero", "random",
                                                          "urandom", "kvm"}
    assert not (root / str(fleet.state).lstrip("/")).exists()
    assert not (root / "root").exists() and not (root / "var").exists()
    # its /proc shows QEMU itself only (hidepid), and its root is read-only
    mounts = Path(f"/proc/{g['pid']}/mounts").read_text().splitlines()
    top_mount = [m for m in mounts if m.split()[1] == "/"]
    assert top_mount and "ro" in top_mount[-1].split()[3].split(",")
    # every descriptor QEMU holds is the guest's own: no file of another guest
    others = [str(fleet.state / "guests" / n) for n in ("two", "three")]
    for fd in Path(f"/proc/{g['pid']}/fd").iterdir():
        target = os.readlink(fd)
        assert not any(target.startswith(o) for o in others), target


def test_a_guest_keeps_its_uid_across_a_restart_and_frees_it_when_gone(fleet):
    before = fleet.guests()["three"]
    uid = int(proc_status(before["pid"])["Uid"].split()[0])
    fleet.cli("restart", "three")
    g = fleet.guests()["three"]
    assert g["state"] == "running" and g["pid"] != before["pid"]
    assert int(proc_status(g["pid"])["Uid"].split()[0]) == uid
    text = FLEET.format(inst=fleet.instance).replace(
        "  three: {image: rooted, memory: {max: 128MiB}}\n", "")
    fleet.write(text)
    fleet.cli("apply", "--prune")
    assert not (REGISTRY / str(uid)).exists(), "a removed guest's uid is released"
    kept = fleet.state / "guests" / "three" / "disk.qcow2"
    assert kept.exists() and kept.stat().st_uid == 0, \
        "a kept disk of a removed guest is no longer its uid's"
    fleet.write(FLEET.format(inst=fleet.instance))
    fleet.cli("apply")
    g = fleet.guests()["three"]
    new = int(proc_status(g["pid"])["Uid"].split()[0])
    assert kept.stat().st_uid == new


def test_runas_root_is_warned_about(fleet):
    inv = fleet.root / "runas-root.yaml"            # beside root.raw
    inv.write_text(FLEET.format(inst=fleet.instance).replace(
        "host: {", "host: {runas: root, "))
    res = fleet.cli("apply", "--dry-run", inventory=inv)
    assert "host.runas: root" in res.stderr and "owns the host" in res.stderr
    doc = json.loads(fleet.cli("doctor", "--json", inventory=inv, check=False).stdout)
    fact = next(f for f in doc["facts"] if f["name"] == "QEMU user")
    assert fact["value"].startswith("root") and not fact["ok"]
    doc = json.loads(fleet.cli("doctor", "--json", check=False).stdout)
    fact = next(f for f in doc["facts"] if f["name"] == "QEMU user")
    assert "a uid of its own per guest" in fact["value"] and fact["ok"]


def test_destroy_frees_every_uid_of_the_fleet(fleet):
    """Last in this module: destroy ends the fleet, and its uids are free again."""
    uids = [g["uid"] for g in fleet.guests().values()]
    assert uids and all(REGISTRY.joinpath(str(u)).exists() for u in uids)
    fleet.cli("destroy", "--yes")
    assert not [u for u in uids if REGISTRY.joinpath(str(u)).exists()]
    assert not [p for p in REGISTRY.glob("[0-9]*")
                if json.loads(p.read_text())["state"] == str(fleet.state.resolve())]
