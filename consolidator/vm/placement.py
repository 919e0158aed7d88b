"""Where QEMU runs: its cgroup and its network namespace, from its first instruction.

The choice, among the three the design allows: a ``preexec`` hook. ``clone3`` with
``CLONE_INTO_CGROUP`` needs cgroup v2, and the development hosts put cpu and memory
on v1; an exec helper costs a second exec per launch. The hook is safe in this
process model because it does nothing a forked child of a threaded parent must not
do: it writes "0" to ``cgroup.procs`` files and calls ``setns`` on file descriptors
opened *before* the fork, no imports, no logging, no locks. Writing "0" moves the
writing process, so QEMU's first instruction (and every thread it makes, and every
page it touches) is already in the guest's cgroup; the netns is entered before
QEMU starts. Then the jail and the guest's credentials (:mod:`.jail`), last, so QEMU's
first instruction runs unprivileged, in the jail.

The placement also holds the guest's taps, opened here as root (in a short-lived thread
that enters the guest's netns: ``TUNSETIFF`` finds a tap by name in the caller's netns)
and passed to QEMU as descriptors; QEMU never needs ``/dev/net/tun``.

A failure in the child is written to QEMU's stderr and the child exits 126, so the launch
fails with that message (a Python exception there would only say "preexec_fn failed").
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

from .. import linux
from .identity import Identity
from .jail import Jail

T = TypeVar("T")
CONFINE_FAILED = 126


def in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` run in the netns at ``path``, on a thread of its own that ends with it
    (so no pooled thread is ever left in a guest's netns)."""
    if path is None:
        return fn()
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, linux.CLONE_NEWNET)
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="in-netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


class GuestPlacement:
    def __init__(self, procs_files: list[Path], netns_path: str | None, *,
                 identity: Identity | None = None, jail: Jail | None = None,
                 taps: tuple[str, ...] = ()) -> None:
        """Blocking (opens files, enters a netns on a thread): not on the event loop."""
        self.procs_files = list(procs_files)
        self.netns_path = netns_path
        self.identity = identity
        self.jail = jail
        self._fds: list[int] = []
        self._ns_fd: int | None = None
        self.tap_fds: tuple[int, ...] = ()
        try:
            self._fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.procs_files]
            if netns_path:
                self._ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            if taps:
                self.tap_fds = in_netns(netns_path, lambda: self._open_taps(taps))
        except OSError:
            self.close()
            raise

    @staticmethod
    def _open_taps(taps: tuple[str, ...]) -> tuple[int, ...]:
        fds: list[int] = []
        try:
            for tap in taps:
                fds.append(linux.open_tap(tap))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return tuple(fds)

    def preexec(self) -> None:
        """In the child, between fork and exec."""
        step = "cgroup"
        try:
            for fd in self._fds:
                os.write(fd, b"0")
            step = "netns"
            if self._ns_fd is not None:
                linux.setns(self._ns_fd, linux.CLONE_NEWNET)
            ident = self.identity
            if ident is not None:
                if self.jail is not None:
                    step = "jail"
                    self.jail.enter(ident)
                step = "credentials"
                Jail.drop(ident)
        except BaseException as e:  # noqa: BLE001 - the child must say why, then go
            os.write(2, f"consolidator: cannot confine QEMU ({step}): {e}\n".encode())
            os._exit(CONFINE_FAILED)

    def describe(self) -> str:
        cg = ", ".join(str(p.parent) for p in self.procs_files) or "no cgroup"
        who = "" if self.identity is None else \
            f", uid {self.identity.uid}{', jailed' if self.jail else ''}"
        return f"cgroups [{cg}], netns {self.netns_path or 'host'}{who}"

    def close(self) -> None:
        for fd in (*self._fds, *self.tap_fds):
            os.close(fd)
        self._fds = []
        self.tap_fds = ()
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None

    def __enter__(self) -> "GuestPlacement":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
