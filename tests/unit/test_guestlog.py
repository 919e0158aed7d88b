"""Serial lines into a guest's event log: each line once, across supervisor restarts."""

from __future__ import annotations

import json
from pathlib import Path

from consolidator.daemon import guestlog


def lines(glog: Path) -> list[str]:
    return [e["line"] for e in map(json.loads, glog.read_text().splitlines())
            if e.get("kind") == "serial"]


def test_a_restarted_tailer_goes_on_where_the_last_one_stopped(tmp_path):
    serial, glog = tmp_path / "serial.log", tmp_path / "log.jsonl"
    serial.write_bytes(b"one\r\ntwo\n")
    off, _ = guestlog.tail_serial(serial, glog, 0)
    assert off == serial.stat().st_size and lines(glog) == ["one", "two"]
    with open(serial, "ab") as f:
        f.write(b"three\npart")
    # a new supervisor: its offset comes from the log, not from memory
    off2, _ = guestlog.tail_serial(serial, glog, guestlog.last_serial_offset(glog))
    assert lines(glog) == ["one", "two", "three"]           # "part" waits for its newline
    assert off2 == serial.stat().st_size - len(b"part")
    assert guestlog.last_serial_offset(glog) == off2


def test_nothing_new_writes_nothing(tmp_path):
    serial, glog = tmp_path / "serial.log", tmp_path / "log.jsonl"
    serial.write_bytes(b"a\n")
    off, _ = guestlog.tail_serial(serial, glog, 0)
    size = glog.stat().st_size
    assert guestlog.tail_serial(serial, glog, off)[0] == off and glog.stat().st_size == size


def test_a_truncated_serial_log_is_read_from_its_start(tmp_path):
    serial, glog = tmp_path / "serial.log", tmp_path / "log.jsonl"
    serial.write_bytes(b"old line one\nold line two\n")
    off, seen = guestlog.tail_serial(serial, glog, 0)
    serial.write_bytes(b"new\n")                          # rotated under us
    assert guestlog.tail_serial(serial, glog, off, seen)[0] == 4
    assert lines(glog)[-1] == "new"


def test_a_prompt_without_newline_is_not_read_again_until_the_file_grows(tmp_path):
    serial, glog = tmp_path / "serial.log", tmp_path / "log.jsonl"
    serial.write_bytes(b"booted\n~ # ")
    off, seen = guestlog.tail_serial(serial, glog, 0)
    assert (off, seen) == (7, 11) and lines(glog) == ["booted"]
    # the same size again is answered from a stat: the file is not opened (a serial log
    # only grows, so the same size means the same bytes; these differ only to show it)
    serial.write_bytes(b"booted\nabc\n")
    assert guestlog.tail_serial(serial, glog, off, seen) == (7, 11)
    assert lines(glog) == ["booted"]
    with open(serial, "ab") as f:
        f.write(b"more\n")
    assert guestlog.tail_serial(serial, glog, off, seen) == (16, 16)
    assert lines(glog) == ["booted", "abc", "more"]


def test_a_log_without_offsets_starts_at_zero(tmp_path):
    glog = tmp_path / "log.jsonl"
    assert guestlog.last_serial_offset(glog) == 0
    glog.write_text('{"t": 1, "kind": "event", "event": "ready"}\nnot json\n')
    assert guestlog.last_serial_offset(glog) == 0
