"""Network namespaces: create, remove, and work inside one, without forking.

Namespaces are bind mounts under /run/netns, as iproute2 makes them, so ``ip netns``
and operators see them. ``None`` means the host's root namespace throughout.

A network namespace belongs to a *thread*, so the calling thread enters the target
(``setns``), opens what it needs there (a netlink socket stays bound to the netns it
was opened in; /proc/sys/net shows the opener's), and returns. pyroute2's own helpers
fork a child for this, and a forked child of the asyncio supervisor inherits the
event loop's signal wakeup fd: the SIGTERM pyroute2 sends its helper then arrived in
the supervisor as a request to stop (seen in the supervisor's log). No forks here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute

from .. import linux
from ..errors import NetError

RUN_DIR = Path("/run/netns")


_CREATE = threading.Lock()
_NSFS_DEV = os.stat("/proc/self/ns/net").st_dev


def exists(name: str) -> bool:
    """A namespace, not merely a file: creation makes the file, then bind-mounts onto it."""
    try:
        return os.stat(RUN_DIR / name).st_dev == _NSFS_DEV
    except FileNotFoundError:
        return False


def listing() -> list[str]:
    return sorted(p.name for p in RUN_DIR.iterdir()) if RUN_DIR.is_dir() else []


def path(name: str | None) -> str:
    return "/proc/1/ns/net" if name is None else str(RUN_DIR / name)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in netns ``name`` (None: stay where it is)."""
    if name is None:
        yield
        return
    if not exists(name):
        raise NetError(f"netns {name} does not exist")
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(target, linux.CLONE_NEWNET)
        try:
            yield
        finally:
            linux.setns(back, linux.CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(back)


def _shared_run_dir() -> None:
    """/run/netns as a shared mount point of its own, as iproute2 sets it up."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    try:
        linux.mount("", str(RUN_DIR), None, linux.MS_SHARED | linux.MS_REC)
    except OSError:
        linux.mount(str(RUN_DIR), str(RUN_DIR), None, linux.MS_BIND | linux.MS_REC)
        linux.mount("", str(RUN_DIR), None, linux.MS_SHARED | linux.MS_REC)


def create(name: str) -> bool:
    """Create ``name`` unless it exists. Returns whether it was created. Thread-safe: a
    thread that finds the file mid-creation must not use it before it is a namespace."""
    with _CREATE:
        if exists(name):
            return False
        return _create(name)


def _create(name: str) -> bool:
    _shared_run_dir()
    target = RUN_DIR / name
    with contextlib.suppress(FileNotFoundError):
        target.unlink()              # a stale empty file from a crash mid-creation
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.unshare(linux.CLONE_NEWNET)          # this thread only
        try:
            linux.mount("/proc/thread-self/ns/net", str(target), None, linux.MS_BIND)
        finally:
            linux.setns(back, linux.CLONE_NEWNET)
    except OSError as e:
        with contextlib.suppress(OSError):
            target.unlink()
        raise NetError(f"cannot create netns {name}: {e}") from None
    finally:
        os.close(back)
    return True


def remove(name: str) -> bool:
    target = RUN_DIR / name
    if not target.exists():     # a plain file left by a crash is removed too
        return False
    with contextlib.suppress(OSError):
        linux.umount2(str(target), linux.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    return True


@contextlib.contextmanager
def iproute(name: str | None) -> Iterator[IPRoute]:
    """An rtnetlink socket in ``name`` (the root netns for None)."""
    if name is None:
        ipr = IPRoute()
    else:
        with entered(name):
            ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def open_fd(name: str | None) -> int:
    return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)


def run(name: str | None, argv: list[str], *, input: str | None = None,
        check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside netns ``name`` (setns in the child before exec)."""
    fd = open_fd(name) if name else None

    def enter() -> None:
        if fd is not None:
            linux.setns(fd, linux.CLONE_NEWNET)

    try:
        res = subprocess.run(argv, input=input, capture_output=True, text=True,
                             timeout=timeout, preexec_fn=enter if fd is not None else None)
    finally:
        if fd is not None:
            os.close(fd)
    if check and res.returncode != 0:
        raise NetError(f"{argv[0]} in netns {name or 'root'} failed: "
                       f"{(res.stderr or res.stdout).strip()}")
    return res


def sysctl(name: str | None, key: str, value: str) -> None:
    """Set a per-netns sysctl (net.*) in ``name``: /proc/sys/net shows the opener's netns."""
    p = "/proc/sys/" + key.replace(".", "/")
    with entered(name):
        with open(p, "w") as f:
            f.write(value)
