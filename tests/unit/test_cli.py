"""The CLI's contract: exit codes, JSON shapes, no tracebacks without -v."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from consolidator.cli.main import cli
from consolidator.errors import ExitCode
from consolidator.model import load_fleet
from consolidator.state import StateDir

ROOT = Path(__file__).resolve().parent.parent.parent
SHIPPED = ROOT / "inventory.yaml"


def run(*args: str, state: Path) -> "CliRunner.invoke":
    return CliRunner().invoke(cli, ["--state-dir", str(state), *args], catch_exceptions=False)


def test_shipped_inventory_is_valid(tmp_path):
    res = run("validate", "-f", str(SHIPPED), state=tmp_path)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ok: ")
    assert "3 guests, 2 networks" in res.output


def test_shipped_fleet_shape():
    fleet = load_fleet(SHIPPED)
    assert set(fleet.guests) == {"web", "app", "db"}
    assert fleet.networks["front"].gateway and not fleet.networks["back"].gateway
    assert all(g.image == "tiny" for g in fleet.guests.values())


def test_schema_is_json_schema(tmp_path):
    res = run("schema", state=tmp_path)
    schema = json.loads(res.output)
    assert schema["title"] == "consolidator inventory"
    assert {"instance", "host", "images", "networks", "guests"} <= set(schema["properties"])
    assert schema["properties"]["guests"]["propertyNames"]["pattern"]


def test_plan_on_empty_state_creates_in_dependency_order(tmp_path):
    res = run("plan", "-f", str(SHIPPED), "--json", state=tmp_path / "none")
    plan = json.loads(res.output)
    kinds = [(a["action"], a["name"]) for a in plan["actions"]]
    assert kinds == [("create-network", "back"), ("create-network", "front"),
                     ("create-guest", "app"), ("create-guest", "db"), ("create-guest", "web"),
                     ("start-guest", "app"), ("start-guest", "db"), ("start-guest", "web")]
    assert plan["counts"]["create"] == 5 and plan["counts"]["start"] == 3


def test_plan_detailed_exitcode(tmp_path):
    res = run("plan", "-f", str(SHIPPED), "--detailed-exitcode", state=tmp_path)
    assert res.exit_code == 2
    assert "+" in res.output and "network front" in res.output
    # record the fleet as applied and running: nothing left to do
    fleet = load_fleet(SHIPPED)
    st = StateDir(tmp_path).ensure()
    st.write_applied(fleet, SHIPPED.read_text(), complete=True, index=1)
    for name, spec in fleet.networks.items():
        st.write_network_record(name, {"spec": spec.model_dump(mode="json")})
    for name, g in fleet.guests.items():
        st.write_guest_record(name, {"intent": g.model_dump(mode="json"), "state": "running",
                                     "instance": fleet.instance})
    res = run("plan", "-f", str(SHIPPED), "--detailed-exitcode", state=tmp_path)
    assert res.exit_code == 0, res.output
    assert "No changes" in res.output


def test_plan_detailed_exitcode_error_is_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("guests: {web: {vcpus: x}}\n")
    res = run("plan", "-f", str(bad), "--detailed-exitcode", state=tmp_path)
    assert res.exit_code == 1


def test_errors_have_no_traceback_unless_verbose(tmp_path):
    (tmp_path / "FORMAT").write_text("consolidator-state 99\n")
    res = run("plan", "-f", str(SHIPPED), state=tmp_path)
    assert res.exit_code == ExitCode.FAILURE
    assert "error:" in res.output and "Traceback" not in res.output
    res = run("plan", "-f", str(SHIPPED), "-v", state=tmp_path)
    assert "Traceback" in res.output


def test_missing_file(tmp_path):
    res = run("validate", "-f", str(tmp_path / "nope.yaml"), state=tmp_path)
    assert res.exit_code == 2
    assert "nope.yaml:1:1: (file): no such file" in res.output


@pytest.mark.parametrize("cmd", ["validate", "schema", "plan", "apply", "status", "console",
                                 "logs", "stop", "start", "destroy", "report", "doctor",
                                 "supervise"])
def test_every_command_has_help(cmd, tmp_path):
    res = run(cmd, "--help", state=tmp_path)
    assert res.exit_code == 0
    assert "Usage:" in res.output and len(res.output.splitlines()) > 4


def test_global_options_after_command(tmp_path):
    res = CliRunner().invoke(cli, ["validate", "--state-dir", str(tmp_path), "-f", str(SHIPPED)])
    assert res.exit_code == 0, res.output


def test_relative_image_paths_are_absolute_in_the_fleet(tmp_path):
    (tmp_path / "k").write_text("kernel")
    inv = tmp_path / "inv.yaml"
    inv.write_text("images:\n  direct: {kernel: ./k}\nguests:\n  web: {image: direct}\n")
    fleet = load_fleet(inv)
    assert fleet.guests["web"].image_spec.kernel == str(tmp_path / "k")
    assert fleet.images["direct"].kernel == str(tmp_path / "k")


def status_doc(n: int = 3) -> dict:
    guests = [{"name": f"guest-with-a-long-name-{i}", "state": "running", "uptime_s": u,
               "vcpus": 2, "cpu_percent": 12.5, "balloon_bytes": 200 << 20,
               "memory_max_bytes": 256 << 20, "ips": ["10.77.0.10", "10.78.0.20"],
               "restarts": 0, "last_event": "reattached", "errors": []}
              for i, u in zip(range(n), (0.1, 0.0, 4000.0))]
    return {"instance": "cns", "index": 7, "guests": guests}


def test_without_a_terminal_status_prints_every_value_whole():
    """Regression: with no TTY, rich laid tables out in 80 columns and cut 'running' to
    'runni…' and 'restarts' to 'restar…'."""
    import io

    from rich.console import Console

    from consolidator.cli.main import show
    from consolidator.cli.render import status_table
    buf = io.StringIO()
    con = Console(file=buf, highlight=False)          # a pipe: not a terminal, 80 columns
    assert not con.is_terminal and con.width == 80
    show(con, status_table(status_doc()))
    text = buf.getvalue()
    assert "…" not in text
    for word in ("running", "restarts", "guest-with-a-long-name-2", "10.77.0.10, 10.78.0.20",
                 "reattached", "200 MiB / 256 MiB"):
        assert word in text, word
    # uptimes read the same way in every row: whole seconds, never "100ms" beside "0s"
    assert "ms" not in text and " 0s " in text and "1h06m" in text


def test_status_shows_failing_readings():
    from consolidator.cli.render import status_table
    doc = status_doc(1)
    doc["guests"][0]["errors"] = ["cgroup usage: CgroupError: cannot read"]
    t = status_table(doc)
    assert "guest-with-a-long-name-0: cgroup usage: CgroupError: cannot read" in str(t.caption)


def test_an_error_holding_a_bracket_is_printed_as_text(tmp_path):
    """Regression: --state-dir '/tmp/m[/x]' gave a rich MarkupError traceback."""
    state = tmp_path / "m[/x]"
    state.mkdir(parents=True)
    (state / "FORMAT").write_text("consolidator-state 99\n")
    res = CliRunner().invoke(cli, ["--state-dir", str(state), "plan", "-f", str(SHIPPED)])
    assert res.exit_code == ExitCode.FAILURE, res.output
    assert f"error: {state}: state format" in res.output
    assert "Traceback" not in res.output and "MarkupError" not in res.output
