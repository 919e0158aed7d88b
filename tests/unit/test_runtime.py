"""The runtime: the one owner of guest state. Transitions are checked against the table,
and each one bumps the index, logs the event and persists the record, together."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from consolidator.errors import StateError
from consolidator.hostfacts import HostFacts
from consolidator.model import TRANSITIONS, GuestState, parse_fleet
from consolidator.daemon.runtime import Runtime
from consolidator.state import StateDir

S = GuestState
FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)
FLEET = parse_fleet("instance: rt\nguests:\n  web: {}\n", "t.yaml", FACTS)
PACKAGE = Path(__file__).resolve().parents[2] / "consolidator"


@pytest.fixture
def rt(tmp_path) -> Runtime:
    r = Runtime(StateDir(tmp_path).ensure())
    r.set_fleet(FLEET, "", complete=True)
    return r


def test_a_transition_moves_indexes_logs_and_records_together(rt, tmp_path):
    g = rt.define("web", FLEET.guests["web"], "defined")
    i0 = rt.index
    rt.transition(g, S.STARTING, "starting", facts={"pid": None}, why="test")
    assert g.state is S.STARTING and rt.index == i0 + 1 and g.last_event == "starting"
    rec = json.loads((tmp_path / "guests" / "web" / "record.json").read_text())
    assert rec["state"] == "starting" and rec["last_event"] == "starting"
    assert rec["instance"] == "rt" and rec["intent"]["name"] == "web"
    log = [json.loads(x) for x in (tmp_path / "guests" / "web" / "log.jsonl").read_text()
           .splitlines()]
    assert log[-1]["event"] == "starting" and log[-1]["why"] == "test"


def test_a_move_the_table_forbids_is_refused_and_changes_nothing(rt, tmp_path):
    g = rt.define("web", FLEET.guests["web"], "defined")
    i0 = rt.index
    with pytest.raises(StateError, match="no transition from defined to running"):
        rt.transition(g, S.RUNNING, "ready")
    assert g.state is S.DEFINED and rt.index == i0
    rec = json.loads((tmp_path / "guests" / "web" / "record.json").read_text())
    assert rec["state"] == "defined"


def test_state_has_no_setter(rt):
    g = rt.define("web", FLEET.guests["web"], "defined")
    with pytest.raises(AttributeError):
        g.state = S.RUNNING  # type: ignore[misc]


@pytest.mark.parametrize("start,path", [
    (S.DEFINED, [S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING, S.CRASHED,
                 S.STARTING, S.RUNNING, S.CRASHED, S.FAILED, S.STARTING, S.RUNNING]),
    (S.RUNNING, [S.RUNNING, S.ORPHANED, S.ORPHANED, S.STOPPED, S.DEFINED]),   # reattach
    (S.STOPPING, [S.RUNNING]),                       # a stop the last supervisor began
    (S.STARTING, [S.STOPPED]),                       # a cancelled start is no crash
])
def test_every_path_the_supervisor_takes_is_in_the_table(start, path):
    s = start
    for nxt in path:
        assert s.may_become(nxt), (s, nxt)
        s = nxt


@pytest.mark.parametrize("frm,to", [
    (S.DEFINED, S.RUNNING), (S.STOPPED, S.RUNNING), (S.FAILED, S.RUNNING),
    (S.STARTING, S.FAILED), (S.STOPPING, S.STARTING), (S.CRASHED, S.RUNNING),
    (S.ORPHANED, S.STARTING), (S.STOPPED, S.STOPPED),
])
def test_moves_that_skip_a_step_are_not_in_the_table(frm, to):
    assert not frm.may_become(to)


def test_every_state_has_a_row():
    assert set(TRANSITIONS) == set(GuestState)


def test_load_restores_what_was_recorded_and_returns_the_active(rt, tmp_path):
    web = rt.define("web", FLEET.guests["web"], "defined")
    rt.transition(web, S.STARTING, "starting")
    rt.transition(web, S.RUNNING, "ready", facts={"pid": 4242, "started_at": 12.0})
    other = Runtime(StateDir(tmp_path))
    active = other.load()
    assert [g.name for g in active] == ["web"]
    g = other.guests["web"]
    assert g.state is S.RUNNING and g.facts["pid"] == 4242 and g.started_at == 12.0
    assert other.fleet == FLEET
    assert other.index > rt.index          # a plan made before the restart is stale


def _assignments(tree: ast.AST) -> list[int]:
    """Lines that set some object's ``state``/``_state`` (``g.state = ...``), or set an
    own attribute of that name to a GuestState (``self.state = GuestState.X``)."""
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        value = node.value if targets else None
        names = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)} if value else set()
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in ("state", "_state"):
                on_self = isinstance(t.value, ast.Name) and t.value.id == "self"
                if not on_self or names & {"GuestState", "S", "_S"}:
                    out.append(t.lineno)
    return out


def test_no_code_outside_the_runtime_assigns_a_guest_state():
    """``vm/guest.py`` has a state of its own (QEMU's Runstate); any other code that set a
    guest's state would be a second writer beside Runtime.transition."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ("daemon/runtime.py", "vm/guest.py"):
            continue
        for line in _assignments(ast.parse(path.read_text())):
            offenders.append(f"{rel}:{line}")
    assert offenders == []


def test_the_check_finds_a_second_writer():
    assert _assignments(ast.parse("rt.state = GuestState.CRASHED\n")) == [1]
    assert _assignments(ast.parse("self._state = S.RUNNING\n")) == [1]
    assert _assignments(ast.parse("self.state = StateDir(root)\n")) == []
