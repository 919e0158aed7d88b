"""Errors keep their class, fields and exit code from the daemon to the CLI."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

from consolidator import errors as E
from consolidator.daemon.protocol import error_message

SAMPLES: list[E.ConsolidatorError] = [
    E.ConsolidatorError("plain", hint="h"),
    E.InventoryError([E.Problem("f.yaml", 3, 5, "guests.web.vcpus", "bad", "fix it", "S003")]),
    E.UsageError("no guest 'x'", hint="known: a"),
    E.NotYetImplemented("snapshot", "a disk"),
    E.HostError("no tun", fact="/dev/net/tun", fix="modprobe tun"),
    E.ConflictError("stale plan", hint="plan again"),
    E.StateError("corrupt"),
    E.HistoryUnavailable("disk full", hint="room"),
    E.PlanError("no rule"),
    E.ImageError("no kernel", tried=[("host", "absent"), ("debian", "offline")]),
    E.LaunchError("qemu died", exitcode=1, argv=["qemu", "-m", "64"], stderr_tail="oops",
                  serial_tail="boot"),
    E.ReadyTimeout("not ready", serial_tail="...", hint="pvm"),
    E.QMPError("failed", error_class="GenericError", command="balloon"),
    E.AgentError("no answer in 30s", timeout=True),
    E.RunstateError("web", "stopped", ("running", "starting"), "shut down"),
    E.CgroupError("cannot write"),
    E.NetError("no bridge"),
    E.AccessDenied("status: not for uid 1000"),
    E.SupervisorError("went away"),
    E.SupervisorUnreachable("none runs"),
]


def test_every_class_of_the_tree_has_a_sample():
    """... and the tree is all in errors.py: every module is imported first, so a class
    defined anywhere else would show here."""
    import consolidator
    for m in pkgutil.walk_packages(consolidator.__path__, "consolidator."):
        if m.name != "consolidator.__main__":
            importlib.import_module(m.name)
    classes = E.error_classes()
    assert {type(e).__name__ for e in SAMPLES} == set(classes)
    assert {c.__module__ for c in classes.values()} == {"consolidator.errors"}


@pytest.mark.parametrize("e", SAMPLES, ids=lambda e: type(e).__name__)
def test_an_error_crosses_the_socket_whole(e: E.ConsolidatorError):
    wire = json.loads(json.dumps(error_message(7, e)))["error"]     # what the socket carries
    back = E.from_wire(wire)
    assert type(back) is type(e)
    assert back.exit_code == e.exit_code
    assert back.message == e.message and back.hint == e.hint
    for f in type(e).FIELDS:
        assert getattr(back, f) == getattr(e, f), f


def test_exit_codes_are_the_documented_ones():
    assert {n: int(c.exit_code) for n, c in E.error_classes().items()} == {
        "ConsolidatorError": 1, "InventoryError": 2, "UsageError": 2, "NotYetImplemented": 3,
        "HostError": 4, "ConflictError": 5, "StateError": 1, "HistoryUnavailable": 1, "PlanError": 1, "ImageError": 1,
        "LaunchError": 1, "ReadyTimeout": 1, "QMPError": 1, "AgentError": 1, "RunstateError": 1,
        "CgroupError": 1, "NetError": 1, "AccessDenied": 1, "SupervisorError": 6,
        "SupervisorUnreachable": 6}


def test_an_unknown_class_from_a_newer_daemon_keeps_its_exit_code():
    back = E.from_wire({"type": "QuotaError", "message": "over quota", "exit_code": 5})
    assert type(back) is E.ConsolidatorError and back.exit_code == E.ExitCode.CONFLICT


def test_a_non_consolidator_error_is_an_internal_error_with_exit_1():
    wire = error_message(1, KeyError("x"))["error"]
    back = E.from_wire(wire)
    assert back.exit_code == 1 and "KeyError" in back.message
