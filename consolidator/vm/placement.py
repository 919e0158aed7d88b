"""Where QEMU runs: its cgroup and its network namespace, from its first instruction.

The choice, among the three the design allows: a ``preexec`` hook. ``clone3`` with
``CLONE_INTO_CGROUP`` needs cgroup v2, and the development hosts put cpu and memory
on v1; an exec helper costs a second exec per launch. The hook is safe in this
process model because it does nothing a forked child of a threaded parent must not
do: it writes "0" to ``cgroup.procs`` files and calls ``setns`` on file descriptors
opened *before* the fork, no imports, no logging, no locks. Writing "0" moves the
writing process, so QEMU's first instruction (and every thread it makes, and every
page it touches) is already in the guest's cgroup; the netns is entered before
QEMU opens its taps.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import linux


class GuestPlacement:
    def __init__(self, procs_files: list[Path], netns_path: str | None) -> None:
        self.procs_files = list(procs_files)
        self.netns_path = netns_path
        self._fds: list[int] = []
        self._ns_fd: int | None = None
        try:
            self._fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.procs_files]
            if netns_path:
                self._ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.close()
            raise

    def preexec(self) -> None:
        """In the child, between fork and exec."""
        for fd in self._fds:
            os.write(fd, b"0")
        if self._ns_fd is not None:
            linux.setns(self._ns_fd, linux.CLONE_NEWNET)

    def describe(self) -> str:
        cg = ", ".join(str(p.parent) for p in self.procs_files) or "no cgroup"
        return f"cgroups [{cg}], netns {self.netns_path or 'host'}"

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None

    def __enter__(self) -> "GuestPlacement":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
