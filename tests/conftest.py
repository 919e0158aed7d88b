"""Test-suite wiring: markers by directory, and no silently skipped integration tests.

Tests under tests/integration/ get the ``integration`` marker, tests under
tests/unit/ the ``unit`` marker. When CONSOLIDATOR_REQUIRE_INTEGRATION=1 (CI
sets it), a skipped integration test fails the run instead of passing quietly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_INTEGRATION = os.environ.get("CONSOLIDATOR_REQUIRE_INTEGRATION") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "unit" in parts:
            item.add_marker(pytest.mark.unit)


def _v2_host() -> bool:
    from consolidator.sched.cgroup import detect
    return detect().backend == "v2"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("v2host") and not _v2_host():
        return   # documented: needs a pure cgroup v2 host; it must run (and pass) there
    if REQUIRE_INTEGRATION and report.skipped and item.get_closest_marker("integration") \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"integration test skipped while CONSOLIDATOR_REQUIRE_INTEGRATION=1: "
                           f"{reason}")
