"""Test-suite wiring: markers by directory, and no silently skipped integration tests.

Tests under tests/integration/ get the ``integration`` marker, tests under
tests/unit/ the ``unit`` marker. When CONSOLIDATOR_REQUIRE_INTEGRATION=1 (CI
sets it), a skipped integration test fails the run instead of passing quietly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import settings

# Properties here run in 0-30 ms an example on an idle 2-core host (see
# --hypothesis-show-statistics); a busy CI host can stretch one past hypothesis' 200 ms
# default and fail a correct property. Every property gets a second; the heavy ones
# (planner, history, memory policy) set deadline=None themselves.
settings.register_profile("consolidator", deadline=timedelta(seconds=1))
settings.load_profile("consolidator")

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_INTEGRATION = os.environ.get("CONSOLIDATOR_REQUIRE_INTEGRATION") == "1"


_NOT_HERE: list[str] = []
#: CONSOLIDATOR_TEST_PHASE splits the suite for tools/bootstrap.sh, which runs "os" (the
#: real-OS boots: minutes of one TCG core each, and the tests marked long, to even the two
#: processes out) beside "shared" (everything else that does not measure the host's CPU),
#: then "quiet" (the tests marked quiet: they measure CPU shares, rates or usage and want
#: the host to themselves). Unset: every test.
PHASE = os.environ.get("CONSOLIDATOR_TEST_PHASE", "")


def _phase(item: pytest.Item) -> str:
    if "integration/test_realos.py" in item.nodeid or item.get_closest_marker("long"):
        return "os"
    return "quiet" if item.get_closest_marker("quiet") else "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "unit" in parts:
            item.add_marker(pytest.mark.unit)
    if PHASE:
        other = [i for i in items if _phase(i) != PHASE]
        items[:] = [i for i in items if _phase(i) == PHASE]
        config.hook.pytest_deselected(items=other)
    # Tests that can only mean something on a pure cgroup v2 host are not collected
    # elsewhere (rather than skipped, which would read as passing); the summary says so.
    if any(i.get_closest_marker("v2host") for i in items) and not _v2_host():
        gone = [i for i in items if i.get_closest_marker("v2host")]
        _NOT_HERE.extend(i.nodeid for i in gone)
        items[:] = [i for i in items if not i.get_closest_marker("v2host")]
        config.hook.pytest_deselected(items=gone)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    for nodeid in _NOT_HERE:
        terminalreporter.write_line(
            f"NOT RUN {nodeid}: needs a pure cgroup v2 host (this one is hybrid v1); "
            f"CI runs it inside a Debian 12 guest (tools/v2guest.py)")


def _v2_host() -> bool:
    from consolidator.sched.cgroup import detect
    return detect().backend == "v2"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_INTEGRATION and report.skipped and item.get_closest_marker("integration") \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"integration test skipped while CONSOLIDATOR_REQUIRE_INTEGRATION=1: "
                           f"{reason}")
