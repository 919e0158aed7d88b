"""Which process may be adopted as a guest's QEMU after a supervisor restart (pure)."""

from __future__ import annotations

import pytest

from consolidator.daemon.lifecycle import is_guest_qemu

UUID = "2f1d7f4e-0000-5000-8000-000000000001"
QMP = "/s/guests/web/run/qmp.sock"
ARGV = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-uuid", UUID,
        "-chardev", "socket,id=qmp,fd=3,server=on,wait=off"]
# how QEMUs were started before they got their sockets as descriptors
LEGACY = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-chardev",
          f"socket,id=qmp,path={QMP},server=on,wait=off"]


def ok(**kw) -> bool:
    args = dict(name="web", uuid=UUID, argv=ARGV, started=1000.0, pid=42,
                recorded_pid=42, recorded_start=1000.2, in_cgroup={42, 43}, uid=1879048200,
                recorded_uid=1879048200, qmp_path=QMP)
    args.update(kw)
    return is_guest_qemu(**args)


def test_the_guests_own_qemu_is_adopted():
    assert ok()


@pytest.mark.parametrize("change", [
    {"argv": ["/usr/bin/sleep", "300"]},                       # another program
    {"argv": ARGV[:2] + ["guest=db,debug-threads=on"] + ARGV[3:]},  # another guest's QEMU
    {"uuid": "2f1d7f4e-0000-5000-8000-000000000002"},          # another state dir's
    {"argv": LEGACY, "qmp_path": "/other/state/guests/web/run/qmp.sock"},  # the same, older
    {"uid": 1879048201},                                       # another guest's uid
    {"uid": 0},                                                # root: not what was recorded
    {"in_cgroup": {43}},                                       # not in the guest's cgroup
    {"in_cgroup": set()},                                      # an empty cgroup: no QEMU of ours
    {"started": 5000.0},                                       # the recorded PID, reused
    {"argv": []},                                              # a zombie, or unreadable
])
def test_anything_else_is_not(change):
    assert not ok(**change)


def test_a_qemu_started_before_names_were_keyed_is_still_ours():
    assert ok(argv=ARGV[:2] + ["web,debug-threads=on"] + ARGV[3:])


def test_a_qemu_started_by_the_previous_version_is_still_ours():
    """Upgrading the supervisor under running guests: they named their QMP socket, had
    no UUID, and ran as root with no uid recorded."""
    assert ok(argv=LEGACY, uid=0, recorded_uid=None)


def test_the_pidfile_pid_needs_no_recorded_start():
    assert ok(pid=43, recorded_pid=42, started=5000.0)
