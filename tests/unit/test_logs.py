"""`logs` never hands a guest's escape sequences to the operator's terminal."""

from __future__ import annotations

import io
import json

from rich.console import Console

from consolidator.cli.console import print_logs, shown


def test_control_characters_are_shown_not_obeyed():
    assert shown("a\x1b]52;c;aGk=\x07b\x1b[2Jc\x9b\x7f\tz") == "a^[]52;c;aGk=^Gb^[[2Jc<9b>^?\tz"


def test_a_guest_cannot_clear_the_screen_or_write_the_clipboard(tmp_path):
    log = tmp_path / "log.jsonl"
    evil = "\x1b]52;c;cm0gLXJmIC8=\x07\x1b[2J\x1b[H"
    log.write_text(json.dumps({"t": 1, "kind": "serial", "line": f"boot {evil}"}) + "\n" +
                   json.dumps({"t": 2, "kind": "event", "event": "crashed",
                               "serial_tail": f"x\n{evil}"}) + "\n")
    buf = io.StringIO()
    print_logs(log, Console(file=buf, force_terminal=True, color_system=None), follow=False,
               lines=10)
    out = buf.getvalue()
    assert "\x1b]" not in out and "\x1b[2J" not in out and "\x07" not in out
    assert out.count("^[]52;c;cm0gLXJmIC8=^G^[[2J^[[H") == 2
