"""Network namespaces: create, remove, and run things inside one.

Namespaces are bind mounts under /run/netns, as iproute2 makes them, so ``ip netns``
and operators see them. ``None`` means the host's root namespace throughout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

from .. import linux
from ..errors import NetError

RUN_DIR = Path("/run/netns")


def exists(name: str) -> bool:
    return (RUN_DIR / name).exists()


def listing() -> list[str]:
    return sorted(p.name for p in RUN_DIR.iterdir()) if RUN_DIR.is_dir() else []


def create(name: str) -> bool:
    """Create ``name`` unless it exists. Returns whether it was created."""
    if exists(name):
        return False
    try:
        _netns.create(name)
    except OSError as e:
        raise NetError(f"cannot create netns {name}: {e}") from None
    return True


def remove(name: str) -> bool:
    if not exists(name):
        return False
    _netns.remove(name)
    return True


def path(name: str | None) -> str:
    return f"/proc/1/ns/net" if name is None else str(RUN_DIR / name)


@contextlib.contextmanager
def iproute(name: str | None) -> Iterator[IPRoute]:
    """An rtnetlink socket in ``name`` (the root netns for None)."""
    if name is not None and not exists(name):
        raise NetError(f"netns {name} does not exist")
    ipr = IPRoute(netns=name) if name else IPRoute()
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
    """Set a per-netns sysctl (net.*) in ``name``."""
    p = "/proc/sys/" + key.replace(".", "/")
    if name is None:
        with open(p, "w") as f:
            f.write(value)
        return
    run(name, ["sh", "-c", f"echo {value} > {p}"])
