"""File primitives the state dir, the guests' logs and the CLI's log readers share: no
symlink followed, nothing group- or world-readable created. A leaf with no imports beyond
the standard library, so that ``logs`` and the daemon's log writer cost nothing to load."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator

SERIAL_LOG_CAP = 4 << 20


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """An fd on ``path`` that is never a symlink's target, created 0600."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def fsync_dir(d: Path) -> None:
    """Make a rename or a new entry in ``d`` durable."""
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rotate_log(path: Path, cap: int = SERIAL_LOG_CAP) -> bool:
    """Copy-truncate ``path`` to ``path.1`` when over ``cap``. QEMU appends (O_APPEND), so
    truncating under it is safe. Returns whether it rotated."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size <= cap:
        return False                          # a link is never followed, nor truncated
    tmp = path.with_name(path.name + ".1.tmp")
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, os.O_RDWR | nofollow)
    with os.fdopen(fd, "r+b") as src, \
            os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | nofollow, 0o600),
                      "wb") as dst:
        dst.write(src.read())
        os.replace(tmp, path.with_name(path.name + ".1"))
        src.truncate(0)
    return True


SUN_PATH_MAX = 107      # sockaddr_un's sun_path: 108 bytes, its NUL included


@contextlib.contextmanager
def unix_address(path: str | os.PathLike[str]) -> Iterator[str]:
    """The address to ``bind`` or ``connect`` the AF_UNIX socket at ``path`` by, whatever
    the path's length.

    sun_path holds 107 bytes, and a deep state dir (or a guest with a 63-character name)
    makes a longer path. Such a path is reached through a descriptor held on its
    directory for the block, as ``/proc/self/fd/N/<name>``, which the kernel resolves to
    the same file (the socket is made, or found, where ``path`` says)."""
    raw = os.fsencode(path)
    if len(raw) <= SUN_PATH_MAX:
        yield os.fsdecode(raw)
        return
    parent, name = os.path.split(raw)
    fd = os.open(parent or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = b"/proc/self/fd/%d/%s" % (fd, name)
        if len(short) > SUN_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket name too long: {os.fsdecode(name)}")
        yield os.fsdecode(short)
    finally:
        os.close(fd)
