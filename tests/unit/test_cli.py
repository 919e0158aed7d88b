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
