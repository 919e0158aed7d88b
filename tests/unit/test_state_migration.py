"""State dir formats: a dir written by the previous format (tests/data/state-format-1, the
JSON files of a real format-1 state dir: two running guests, one with a data disk and a
snapshot, one network) is migrated once, atomically, keeping its originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from consolidator import state as state_mod
from consolidator.daemon.runtime import Runtime
from consolidator.errors import StateError
from consolidator.state import FORMAT, RECORD_KEYS, StateDir, record_facts

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "state-format-1"
FILES = sorted(str(p.relative_to(FIXTURE)) for p in FIXTURE.rglob("*") if p.is_file())


@pytest.fixture
def old(tmp_path) -> StateDir:
    root = tmp_path / "state"
    shutil.copytree(FIXTURE, root)
    root.chmod(0o700)
    return StateDir(root)


def test_the_fixture_is_format_1_with_facts_beside_the_record_fields(old):
    assert FORMAT == 2 and old.check_format() == 1
    rec = old.read_guest_record("web")
    assert "facts" not in rec and rec["format"] == 1 and rec["pid"] > 0


def test_format_1_is_migrated_once_and_its_originals_are_kept(old):
    originals = {f: (old.root / f).read_bytes() for f in FILES}
    assert old.migrate() == [(1, 2, len(FILES) - 1)]          # every JSON file, not FORMAT
    assert (old.root / "FORMAT").read_text() == "consolidator-state 2\n"
    for name in ("web", "db"):
        before = json.loads(originals[f"guests/{name}/record.json"])
        after = old.read_guest_record(name)
        assert set(after) <= set(RECORD_KEYS) | {"facts"} and after["format"] == 2
        assert {k: after[k] for k in RECORD_KEYS if k != "format"} == \
            {k: before[k] for k in RECORD_KEYS if k != "format"}
        assert after["facts"] == {k: v for k, v in before.items() if k not in RECORD_KEYS}
        assert after["facts"]["pid"] == before["pid"] and "identity" in after["facts"]
    for f in ("applied.json", "networks/lan.json", "guests/db/snapshots.json"):
        assert json.loads((old.root / f).read_text()) == \
            {**json.loads(originals[f]), "format": 2}
    kept = old.root / "migrated" / "format-1"
    assert {f: (kept / f).read_bytes() for f in FILES if f != "FORMAT"} == \
        {f: b for f, b in originals.items() if f != "FORMAT"}
    # once: a second run finds nothing to do and changes nothing
    now = {f: (old.root / f).read_bytes() for f in FILES}
    assert old.migrate() == []
    assert {f: (old.root / f).read_bytes() for f in FILES} == now


def test_the_supervisor_s_runtime_reads_the_migrated_records(old):
    old.migrate()
    rt = Runtime(old)
    active = rt.load()
    assert sorted(g.name for g in active) == ["db", "web"]
    web = rt.guests["web"]
    assert web.facts["pid"] == json.loads((old.root / "migrated/format-1/guests/web/"
                                           "record.json").read_text())["pid"]
    assert web.intent.name == "web" and rt.fleet is not None and rt.fleet.instance == "fmtone"


def test_a_migration_killed_halfway_is_finished_by_the_next_run(old, monkeypatch):
    originals = {f: (old.root / f).read_bytes() for f in FILES}
    real = state_mod.write_json
    calls = []

    def dies_on_the_second(path, obj, mode=0o600):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, obj, mode)

    monkeypatch.setattr(state_mod, "write_json", dies_on_the_second)
    with pytest.raises(OSError):
        old.migrate()
    monkeypatch.setattr(state_mod, "write_json", real)
    # the tag was not advanced; one record is format 2 already, the other still 1
    assert old.check_format() == 1
    assert sorted(old.read_guest_record(n)["format"] for n in ("db", "web")) == [1, 2]
    assert old.observe().guests.keys() == {"db", "web"}      # clients read it meanwhile
    assert old.migrate() == [(1, 2, len(FILES) - 2)]          # the rest, not the done one
    assert all("facts" in old.read_guest_record(n) for n in ("db", "web"))
    kept = old.root / "migrated" / "format-1"
    assert {f: (kept / f).read_bytes() for f in FILES if f != "FORMAT"} == \
        {f: b for f, b in originals.items() if f != "FORMAT"}


@pytest.mark.parametrize("tag", ["consolidator-state 3\n", "consolidator-state 0\n",
                                 "something else\n"])
def test_a_format_this_version_cannot_read_is_refused(old, tag):
    (old.root / "FORMAT").write_text(tag)
    with pytest.raises(StateError, match="state format") as e:
        old.migrate()
    assert "newer consolidator" in (e.value.hint or "")
    assert old.read_guest_record("web")["format"] == 1                 # untouched


def test_facts_are_read_from_either_format_and_records_carry_no_stray_field(old, tmp_path):
    flat = old.read_guest_record("web")
    old.migrate()
    nested = old.read_guest_record("web")
    assert record_facts(flat) == record_facts(nested) == nested["facts"]
    with pytest.raises(StateError, match="belong in facts"):
        old.write_guest_record("web", {**nested, "pid": 1})
