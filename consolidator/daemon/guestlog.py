"""Each guest's event log, ``guests/<name>/log.jsonl``: serial lines and supervisor events.

``logs`` reads it without a daemon. Serial lines come from QEMU's ``serial.log`` by
:func:`tail_serial`; each entry of them carries ``o``, the offset in ``serial.log`` up
to which it has read, written in the same append as the lines. A supervisor that starts
again takes the last ``o`` (:func:`last_serial_offset`) and goes on from there, so no
line is logged twice and none is lost. Both files are capped and rotated once (``.1``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..files import open_private, rotate_log

GUEST_LOG_CAP = 4 << 20
READ_CHUNK = 1 << 20


def append(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append entries (one write). A full disk is logged, never raised: it must not
    take the supervisor down."""
    if not entries:
        return
    now = time.time()
    text = "".join(json.dumps({"t": now, **e}, default=str) + "\n" for e in entries)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        rotate_log(path, GUEST_LOG_CAP)
        with os.fdopen(open_private(path), "a") as f:
            f.write(text)
    except OSError as e:
        import structlog          # only here: the CLI's log readers never pay for it
        structlog.get_logger("guestlog").warning("guest.log_failed", path=str(path),
                                                 error=str(e))


def tail_serial(serial: Path, glog: Path, offset: int, seen: int = -1) -> tuple[int, int]:
    """Copy the whole lines ``serial`` gained since ``offset`` into ``glog``; return the
    new offset and the file's size now. A shrunken file (rotated or truncated) is read
    from its start. A file still ``seen`` bytes long is not opened: a console that ends
    in a prompt without a newline would otherwise be read again every interval."""
    try:
        size = os.stat(serial).st_size
    except FileNotFoundError:
        return offset, -1
    if size == seen and size >= offset:
        return offset, size
    if size < offset:
        offset = 0
    if size == offset:
        return offset, size
    with open(serial, "rb") as f:
        f.seek(offset)
        data = f.read(READ_CHUNK)
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) < READ_CHUNK:
        return offset, size              # wait for a whole line
    used = data[:cut] if cut else data
    end = offset + len(used)
    entries: list[dict[str, Any]] = []
    for line in used.decode("utf-8", "replace").splitlines():
        line = line.replace("\r", "").rstrip()
        if line:
            entries.append({"kind": "serial", "line": line})
    if rotate_log(serial):
        end = 0
        entries.append({"kind": "event", "event": "serial_log_rotated"})
    if not entries:
        entries.append({"kind": "serial-offset"})
    entries[-1]["o"] = end
    append(glog, entries)
    # all of the file was looked at, unless it was rotated or there was more than a chunk
    return end, (size if end > 0 and len(data) < READ_CHUNK else -1)


def read_entries(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The serial lines and events written from ``offset`` on, and where they end."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], 0
    cut = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:cut].splitlines():
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("kind") in ("serial", "event"):
            entries.append(e)
    return entries, offset + cut


def last_entries(glog: Path, lines: int) -> tuple[list[dict[str, Any]], int]:
    """The last ``lines`` entries (from the rotated log too), and the offset to follow from."""
    old, _ = read_entries(glog.with_name(glog.name + ".1"))
    cur, offset = read_entries(glog)
    return (old + cur)[-lines:] if lines > 0 else [], offset


def last_serial_offset(glog: Path, window: int = 256 << 10) -> int:
    """The ``o`` of the last entry that has one, from the newest log (or its ``.1``)."""
    for path in (glog, glog.with_name(glog.name + ".1")):
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - window))
                lines = f.read().splitlines()
        except OSError:
            continue
        for raw in reversed(lines):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("o"), int):
                return entry["o"]
    return 0
