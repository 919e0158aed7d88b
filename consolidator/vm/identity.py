"""Who a guest's QEMU runs as: a uid and gid of its own, from a range the host hands out.

Every guest gets a uid (and the gid of the same number) no other process on the host
has: not a user in ``/etc/passwd``, not a group in ``/etc/group``, not the owner of a
running process, and not another guest's, whatever state dir or instance it belongs to.
Claims are host-wide files, ``/run/consolidator/ids/<uid>``, made with ``O_EXCL`` under
a lock: two supervisors cannot hand out one uid. A claim names its state dir and
guest; the guest's record names its uid. A uid is handed out again only when the claim
is stale: its guest's record is gone (the guest was removed or destroyed) or names
another uid, and the claim is older than a few minutes (a claim is made just before the
record names it). So a guest keeps its uid across restarts and supervisor restarts, and a
uid is reused only after its guest is gone.

The default range, 0x70000000 and the 65536 above it, lies outside every range systemd
documents (system and regular users, DynamicUser, container ranges up to 0x6FFFFFFF).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import itertools
import json
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


from ..errors import HostError
from ..state import StateDir, record_facts

REGISTRY = Path("/run/consolidator/ids")
FRESH = 300.0          # seconds a claim is honoured before its guest's record names it


@dataclass(frozen=True)
class Identity:
    """The credentials QEMU runs with. ``uid`` 0 means it stays root (``host.runas: root``)."""
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0

    def to_json(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid}


def candidates(first: int, count: int, key: str) -> Iterator[int]:
    """Pure: every uid of the range once, starting at one derived from ``key`` (so a
    guest tends to get the same uid on every host, and two guests rarely race)."""
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count
    for i in range(count):
        yield first + (start + i) % count


@dataclass(frozen=True)
class Owner:
    state: str          # the state dir's absolute path
    guest: str

    def holds(self, uid: int) -> bool:
        """Whether the guest still exists and its record names ``uid``."""
        with contextlib.suppress(Exception):
            rec = StateDir(self.state).read_guest_record(self.guest)
            return isinstance(rec, dict) and \
                (record_facts(rec).get("identity") or {}).get("uid") == uid
        return False


class Registry:
    def __init__(self, root: Path = REGISTRY) -> None:
        self.root = root

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def holder(self, uid: int) -> Owner | None:
        try:
            fd = os.open(self.root / str(uid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd) as f:
            try:
                d = json.load(f)
                return Owner(str(d["state"]), str(d["guest"]))
            except (ValueError, KeyError, TypeError):
                return Owner("", "")          # unreadable: stale

    def _fresh(self, uid: int) -> bool:
        try:
            return time.time() - os.stat(self.root / str(uid)).st_mtime < FRESH
        except OSError:
            return False

    def _write(self, uid: int, owner: Owner) -> None:
        tmp = self.root / f".{uid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"state": owner.state, "guest": owner.guest}, f)
        os.replace(tmp, self.root / str(uid))

    def claim(self, owner: Owner, first: int, count: int, want: int | None = None) -> int:
        """A uid for ``owner``: ``want`` (the one its record names) when that is still
        its own or free, else the first free one of the range."""
        with self._locked():
            busy: set[int] | None = None
            order = itertools.chain([want] if want is not None else [],
                                    candidates(first, count, f"{owner.state}\0{owner.guest}"))
            for uid in order:
                if not first <= uid < first + count:
                    continue
                held = self.holder(uid)
                if held == owner:
                    return uid
                if held is not None and (held.holds(uid) or self._fresh(uid)):
                    continue
                if busy is None:
                    busy = _uids_in_use()
                if uid in busy or _named(uid):
                    continue
                self._write(uid, owner)
                return uid
        raise HostError(f"no free uid in host.guest_ids ({first}..{first + count - 1}) for "
                        f"guest {owner.guest}", fact="guest ids",
                        fix="widen host.guest_ids, or remove guests that are gone")

    def release(self, owner: Owner) -> list[int]:
        """Drop every claim of ``owner`` (its guest is gone). Returns the uids freed."""
        return self._release(lambda held: held == owner)

    def release_state(self, state: str) -> list[int]:
        """Drop every claim made for guests of the state dir ``state``."""
        return self._release(lambda held: held.state == state)

    def _release(self, match: Callable[[Owner], bool]) -> list[int]:
        freed: list[int] = []
        if not self.root.is_dir():
            return freed
        with self._locked():
            for p in self.root.iterdir():
                if p.name.isdigit():
                    held = self.holder(int(p.name))
                    if held is not None and match(held):
                        p.unlink()
                        freed.append(int(p.name))
        return freed


def _uids_in_use() -> set[int]:
    """The uids and gids that own a running process (its /proc directory's owner: the
    effective ids). One stat per process: reading every process's status took 40 ms."""
    out = set()
    with os.scandir("/proc") as it:
        for e in it:
            if e.name.isdigit():
                with contextlib.suppress(OSError):
                    st = e.stat()
                    out.update((st.st_uid, st.st_gid))
    return out


def _named(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def named_user(name: str) -> Identity:
    """``host.runas: <user>``: every guest runs as that user and its primary group."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise HostError(f"host.runas names user {name!r}, which this host does not have",
                        fact="runas", fix=f"useradd --system {name}, or remove host.runas") from None
    return Identity(pw.pw_uid, pw.pw_gid)
