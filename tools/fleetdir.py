"""A fleet's directory as the tests and the tools drive it: its ``inventory.yaml``, its
state dir, and the consolidator CLI run against the two as an operator runs it (a process
of its own), or the running supervisor asked in-process.

The integration tests (``tests/integration/env.py``), the crash harness and the soak share
it, so all three start the CLI, find the supervisor and read ``status`` the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CACHE = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE",
                                  "/var/tmp/consolidator-test-images"))
#: the commands that read the inventory: ``-f`` is added to them
READS_INVENTORY = ("apply", "plan", "validate", "doctor")


@dataclass
class FleetDir:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.yaml"

    def write(self, text: str) -> None:
        self.inventory.write_text(text)

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONSOLIDATOR_STATE_DIR": str(self.state),
                "CONSOLIDATOR_IMAGE_CACHE": str(IMAGE_CACHE), "COLUMNS": "200"}

    def argv(self, *args: str, inventory: Path | None = None) -> list[str]:
        """The CLI's command line for ``args`` (``-f`` the inventory where one is read)."""
        cmd = [sys.executable, "-m", "consolidator", *args]
        if args and args[0] in READS_INVENTORY:
            cmd += ["-f", str(inventory or self.inventory)]
        return cmd

    def cli(self, *args: str, check: bool = True, timeout: float = 240,
            input: str | None = None,
            inventory: Path | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(*args, inventory=inventory), capture_output=True,
                             text=True, timeout=timeout, env=self.env(), input=input,
                             cwd=ROOT)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {res.returncode}:\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def call(self, op: str, **args: Any) -> Any:
        """``op`` asked of the running supervisor (none running: OSError)."""
        from consolidator.daemon import protocol
        with protocol.Client(protocol.socket_path(self.state), timeout=300) as c:
            return c.call(op, **args)

    def status(self, explain: bool = False) -> dict:
        """``status --json``'s document. Asked of the running supervisor in-process (what
        the CLI asks, without a Python start each poll: tests poll it by the hundred, and
        the quiet tests measure CPU); with none running, the CLI starts one."""
        from consolidator.errors import SupervisorError
        try:
            return self.call("status", explain=explain)
        except (OSError, SupervisorError):     # none runs, or it is going away
            pass
        return json.loads(self.cli("status", "--json", *(["--explain"] if explain else []))
                          .stdout)

    def supervisor_pid(self) -> int | None:
        """The running supervisor's PID, or None."""
        try:
            pid = int((self.state / "supervisor" / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):       # no pidfile, or no such process
            return None
        return pid
