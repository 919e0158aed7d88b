"""Crash injection in CI: ten seeds of tools/crashtest.py, each a command (apply's create,
change, restart, replace and prune, destroy, snapshot, backup, restore) whose supervisor is killed
with SIGKILL at a random point, then the fleet's invariants (see the tool's docstring).

The seeds start from CONSOLIDATOR_CRASH_BASE, or a fresh random base each run (more of
the space is covered over many runs); a failure prints the command that replays it."""

from __future__ import annotations

import os
import random
import sys

import pytest

from .env import ROOT

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.timeout(900)]
SEEDS = 10


def test_the_supervisor_killed_anywhere_leaves_a_fleet_that_converges(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from crashtest import Harness
    finally:
        sys.path.remove(str(ROOT / "tools"))
    base = int(os.environ.get("CONSOLIDATOR_CRASH_BASE") or random.randrange(1, 10**6))
    replay = f"python tools/crashtest.py --first {base} --seeds {SEEDS}"
    h = Harness(tmp_path / "crash")
    failures: list[str] = []
    left: list[str] = []
    try:
        h.setup()
        for s in range(base, base + SEEDS):
            failures += h.seed(s)
    finally:
        left = h.teardown()
    print("\n".join(h.log))
    assert not failures, f"replay with: {replay}\n" + "\n".join(failures)
    assert not left, f"left over after destroy --purge: {left} (replay: {replay})"
    # the kills happened: a run in which every command ended before its kill proves little
    assert sum("killed at" in x for x in h.log) >= 3, h.log
