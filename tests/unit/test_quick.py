"""The CLI's quick path takes only plain queries; everything else goes to the full CLI."""

from __future__ import annotations

import pytest

from consolidator import DEFAULT_STATE_DIR
from consolidator.cli.quick import parse


@pytest.mark.parametrize("argv, want", [
    (["status"], ("status", DEFAULT_STATE_DIR, {"json": False, "explain": False})),
    (["status", "--json"], ("status", DEFAULT_STATE_DIR, {"json": True, "explain": False})),
    (["--state-dir", "/s", "status", "--explain", "--json"],
     ("status", "/s", {"json": True, "explain": True})),
    (["status", "--state-dir=/s"], ("status", "/s", {"json": False, "explain": False})),
    (["logs", "web"], ("logs", DEFAULT_STATE_DIR, {"name": "web", "lines": 200})),
    (["logs", "-n", "5", "web"], ("logs", DEFAULT_STATE_DIR, {"name": "web", "lines": 5})),
    (["logs", "web", "--lines", "7"], ("logs", DEFAULT_STATE_DIR, {"name": "web", "lines": 7})),
])
def test_plain_queries_are_taken(argv, want, monkeypatch):
    monkeypatch.delenv("CONSOLIDATOR_STATE_DIR", raising=False)
    assert parse(argv) == want


@pytest.mark.parametrize("argv", [
    [], ["status", "--watch"], ["status", "--help"], ["status", "-v"], ["status", "x"],
    ["status", "--json", "--json"], ["-v", "status"], ["apply"], ["plan"],
    ["logs"], ["logs", "-f", "web"], ["logs", "web", "db"], ["logs", "-n", "x", "web"],
    ["logs", "-n"], ["logs", "../web"], ["logs", "Web"], ["--state-dir"],
    ["--state-dir", "", "status"], ["logs", "--follow", "web"],
])
def test_anything_else_is_left_to_the_full_cli(argv):
    assert parse(argv) is None


def test_the_state_dir_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONSOLIDATOR_STATE_DIR", "/env/state")
    assert parse(["status"])[1] == "/env/state"
    assert parse(["--state-dir", "/flag", "status"])[1] == "/flag"
