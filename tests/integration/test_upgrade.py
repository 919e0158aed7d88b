"""Upgrades in place: a supervisor of this version adopts guests that the previous version
started, with the same PIDs and no restart, and the next apply restarts nothing. The
previous version wrote state format 1; this one migrates it to format 2, once, while the
guests run.

The previous version is taken from the repository's history (``git archive``), so the
test runs the very code an operator would have had running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from .env import IMAGE_CACHE, ROOT, cli_fleet

pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.long]

#: the version before this one: the last commit of the previous work session (issue 15)
PREVIOUS = "175f36db54a13de4ec3e9ad3f5c52e7517d167b7"

FLEET = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, metrics: {{enabled: false}}}}
networks:
  lan: {{subnet: 10.88.0.0/24, gateway: 10.88.0.1}}
guests:
  a: {{memory: {{max: 128MiB, min: 64MiB}}, nics: [{{network: lan, ip: 10.88.0.10}}]}}
  b: {{memory: {{max: 128MiB}}, disks: [{{size: 64MiB, name: data}}]}}
"""


def previous_package(dest) -> None:
    """The previous version's ``consolidator`` package, from git, into ``dest``."""
    res = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS,
                          "consolidator"], capture_output=True)
    if res.returncode != 0:
        pytest.fail(f"the previous version ({PREVIOUS[:10]}) is not in this clone's "
                    f"history ({res.stderr.decode().strip()}): the upgrade test needs it; "
                    "run `git fetch --unshallow`")
    tar = dest / "old.tar"
    tar.write_bytes(res.stdout)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")


def test_a_newer_supervisor_adopts_the_previous_version_s_guests(tmp_path):
    old = tmp_path / "previous"
    old.mkdir()
    previous_package(old)
    with cli_fleet(tmp_path, FLEET) as f:
        env = {**os.environ, "CONSOLIDATOR_STATE_DIR": str(f.state),
               "CONSOLIDATOR_IMAGE_CACHE": str(IMAGE_CACHE), "PYTHONPATH": str(old)}
        # cwd: the old package's parent, so that `-m consolidator` is the old one
        res = subprocess.run([sys.executable, "-m", "consolidator", "apply", "-f",
                              str(f.inventory)], cwd=old, env=env, capture_output=True,
                             text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        sup = f.supervisor_pid()
        assert sup is not None
        environ = open(f"/proc/{sup}/environ", "rb").read().split(b"\0")
        assert f"PYTHONPATH={old}".encode() in environ     # the old code runs it
        # the old supervisor answers as the old version did (this one added the
        # history's state to the status document)
        old_doc = json.loads(subprocess.run(
            [sys.executable, "-m", "consolidator", "status", "--json"], cwd=old, env=env,
            capture_output=True, text=True, timeout=60, check=True).stdout)
        assert "history" not in old_doc and "ksm" not in old_doc["rebalancer"]
        before = {g["name"]: g for g in old_doc["guests"]}
        assert all(g["state"] == "running" for g in before.values()), before
        os.kill(sup, signal.SIGTERM)                        # guests stay up
        deadline = time.monotonic() + 30
        while f.supervisor_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f.supervisor_pid() is None
        assert (f.state / "FORMAT").read_text() == "consolidator-state 1\n"
        flat = json.loads((f.state / "guests" / "a" / "record.json").read_text())
        assert "facts" not in flat and flat["pid"] == before["a"]["pid"]

        after = f.guests()                                  # this version's supervisor
        assert "history" in f.status()
        new_sup = f.supervisor_pid()
        # migrated once, under the new supervisor's lock, the originals kept
        assert (f.state / "FORMAT").read_text() == "consolidator-state 2\n"
        nested = json.loads((f.state / "guests" / "a" / "record.json").read_text())
        assert nested["format"] == 2 and nested["facts"]["pid"] == before["a"]["pid"]
        kept = f.state / "migrated" / "format-1"
        assert json.loads((kept / "guests" / "a" / "record.json").read_text())["pid"] == \
            before["a"]["pid"]
        migrated = [json.loads(x) for x in (f.state / "supervisor" / "log.jsonl")
                    .read_text().splitlines() if '"state.migrated"' in x]
        assert [(m["from_format"], m["to_format"]) for m in migrated] == [(1, 2)], migrated
        from .test_faults import check_oom_order      # adopted guests get it too
        check_oom_order(f, [g["pid"] for g in before.values()])
        assert new_sup and f"PYTHONPATH={old}".encode() not in \
            open(f"/proc/{new_sup}/environ", "rb").read().split(b"\0")
        for n, g in before.items():
            assert after[n]["state"] == "running" and after[n]["pid"] == g["pid"], after[n]
            assert after[n]["restarts"] == 0
            assert "crashed" not in f.events(n)
        # the next apply restarts nothing: what the new version added has defaults that
        # leave a running guest as it is
        plan = f.cli("plan").stdout
        assert re.search(r"\b0 to restart, 0 to replace", plan), plan
        f.cli("apply")
        final = f.guests()
        assert {n: g["pid"] for n, g in final.items()} == \
            {n: g["pid"] for n, g in before.items()}
        assert f.cli("agent", "a", "ping").stdout.startswith("pong ")   # still answers
        rec = json.loads((f.state / "guests" / "b" / "record.json").read_text())
        assert rec["state"] == "running"
