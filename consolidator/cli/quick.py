"""The queries operators run in loops, answered without the full CLI.

``status``, ``status --json``, ``status --explain`` and ``logs [-n N] NAME`` against a
running supervisor or a readable state dir. Importing click and every command's module
took 80 ms of a 0.16 s ``status --json``; this path imports only the socket client and,
for tables, rich.

It takes only those plain forms: any other argument (``--help``, ``-v``, ``--watch``,
``logs -f``), no supervisor to answer, or an error from it, and it declines *before
printing anything*, so the full CLI runs the same command and gives its usual output,
errors and exit codes. It never starts a supervisor: the full CLI does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import DEFAULT_STATE_DIR
from ..units import DNS_LABEL_RE


def parse(argv: list[str]) -> tuple[str, str, dict[str, Any]] | None:
    """Pure: ``(command, state dir, options)`` for a form this path takes, else None."""
    state_dir = os.environ.get("CONSOLIDATOR_STATE_DIR", DEFAULT_STATE_DIR)
    words: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--state-dir":
            state_dir = next(it, "")
            if not state_dir:
                return None
        elif a.startswith("--state-dir="):
            state_dir = a.split("=", 1)[1]
        else:
            words.append(a)
    if not words or not state_dir:
        return None
    cmd, rest = words[0], words[1:]
    if cmd == "status":
        flags = set(rest)
        if len(flags) != len(rest) or not flags <= {"--json", "--explain"}:
            return None
        return cmd, state_dir, {"json": "--json" in flags, "explain": "--explain" in flags}
    if cmd == "logs":
        lines, names = 200, []
        it = iter(rest)
        for a in it:
            if a in ("-n", "--lines"):
                value = next(it, "")
                if not value.isdigit():
                    return None
                lines = int(value)
            elif a.startswith("-"):
                return None
            else:
                names.append(a)
        if len(names) != 1 or not DNS_LABEL_RE.match(names[0]):
            return None
        return cmd, state_dir, {"name": names[0], "lines": lines}
    return None


def run(argv: list[str]) -> bool:
    """Answer ``argv`` if it is a form this path takes; whether it did."""
    parsed = parse(argv)
    if parsed is None:
        return False
    cmd, state_dir, opts = parsed
    if cmd == "status":
        return _status(Path(state_dir), opts["json"], opts["explain"])
    return _logs(Path(state_dir), opts["name"], opts["lines"])


def _status(state_dir: Path, as_json: bool, explain: bool) -> bool:
    from ..daemon import protocol
    from ..errors import ConsolidatorError
    try:
        with protocol.connect(state_dir, start=False) as client:
            doc = client.call("status", explain=explain)
    except (ConsolidatorError, OSError):
        return False                       # the full CLI starts one, or says why not
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return True
    from .output import out, show
    from .render import explain_table, status_table
    show(out, status_table(doc))
    if explain:
        show(out, explain_table(doc))
    return True


def _logs(state_dir: Path, name: str, lines: int) -> bool:
    gdir = state_dir / "guests" / name
    if not os.access(state_dir, os.X_OK) or not gdir.is_dir():
        return False                       # through the supervisor, or "no guest": full CLI
    from .console import print_logs
    from .output import out
    print_logs(gdir / "log.jsonl", out, follow=False, lines=lines)
    return True
