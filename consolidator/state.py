"""The state dir: what was applied, and a record per guest and network.

Layout (format 2), mode 0700 throughout::

    <state>/FORMAT                   "consolidator-state 2"
    <state>/applied.json             last applied fleet, its hash and the inventory text
    <state>/networks/<name>.json     a network as created (spec + kernel object names)
    <state>/guests/<name>/record.json   a guest as defined/launched (intent, state, pid, ...)
    <state>/guests/<name>/log.jsonl  its serial lines and supervisor events
    <state>/guests/<name>/disk.qcow2 its disk overlay: kept until an explicit purge
    <state>/guests/<name>/data-<disk>.qcow2   its data disks: kept until an explicit purge
    <state>/guests/<name>/efivars.fd its UEFI variable store: kept with its disks
    <state>/guests/<name>/snapshots.json   its snapshots (they live inside its qcow2
                                     disks; a UEFI guest's variable store is copied
                                     beside them as efivars.<tag>.fd): kept with its disks
    <state>/guests/<name>/run/       QMP and console sockets, pidfile (0700)
    <state>/images/                  the image cache
    <state>/history.sqlite           samples for reports
    <state>/supervisor/              lock, API socket, daemon log
    <state>/migrated/format-<N>/     each file a migration rewrote, as format N had it

A guest's record holds its own fields (:data:`RECORD_KEYS`) and, under ``facts``, what
the supervisor learnt running it (pid, boot files, kernel objects, uid...).

**Formats and migrations.** ``FORMAT`` names the layout. A state dir of an older format
is read by clients as it is (the fields they read did not move) and migrated by the
supervisor, once, under its lock, before it reads a record: each migration rewrites its
files one by one, atomically, keeping each original under ``migrated/format-<N>/``, and
only then is ``FORMAT`` advanced. A supervisor killed in the middle leaves the old tag,
and the next one runs the migration again: a file already rewritten is passed over. A
newer format than this version knows is refused. The migrations:

- 1 -> 2: a guest record's facts move under ``facts`` (in format 1 they sat beside the
  record's own fields, where a fact could shadow one); every file's ``format`` is 2.

Every write is atomic: write a temporary file, fsync, rename, fsync the directory.
:class:`StateDir` is the only writer of records and of ``applied.json``; in the
supervisor, records are written by its runtime alone (:mod:`consolidator.daemon.runtime`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import DEFAULT_STATE_DIR as _DEFAULT_STATE_DIR
from .files import fsync_dir, open_private
from .errors import StateError
from .inventory.schema import HostSpec, NetworkSpec
from .model import Fleet, GuestIntent, GuestState
from .plan import Observed, ObservedGuest

FORMAT = 2
FORMAT_TAG = f"consolidator-state {FORMAT}\n"
#: A guest record's own fields; everything else it knows is under "facts".
RECORD_KEYS = ("format", "name", "instance", "index", "intent", "spec_hash", "state",
               "restarts", "last_event")
DEFAULT_STATE_DIR = _DEFAULT_STATE_DIR
#: A guest's files that hold its data: kept by destroy and prune unless purged.
DISK_SUFFIXES = (".qcow2", ".fd")        # overlays, data disks, UEFI variable stores
#: Other files kept with a guest's disks: they describe what the disks hold.
KEPT_FILES = ("snapshots.json", "instance-id")


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


HOST_IO = "host-io.json"      # what doctor --measure-io measured of the state dir's disk


def io_budget(host_io: Any, root: Path) -> tuple[float | None, float | None]:
    """``host.io`` resolved: a declared figure, or for ``auto`` what ``doctor
    --measure-io`` measured here (None until it has)."""
    measured: dict[str, Any] = {}
    if "auto" in (host_io.bps, host_io.iops):
        with contextlib.suppress(OSError, ValueError, StateError):
            got = read_json(root / HOST_IO)
            measured = got if isinstance(got, dict) else {}

    def pick(v: Any, key: str) -> float | None:
        v = measured.get(key) if v == "auto" else v
        return float(v) if isinstance(v, (int, float)) and v > 0 else None
    return pick(host_io.bps, "bps"), pick(host_io.iops, "iops")


def write_json(path: Path, obj: Any, mode: int = 0o600) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path) -> Any:
    try:
        with os.fdopen(open_private(path, os.O_RDONLY)) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: corrupt JSON ({e})",
                         hint="the file was not written by consolidator's atomic writer; "
                              "move it aside and re-apply") from None


class StateDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- layout
    @property
    def applied_path(self) -> Path:
        return self.root / "applied.json"

    @property
    def networks_dir(self) -> Path:
        return self.root / "networks"

    @property
    def guests_dir(self) -> Path:
        return self.root / "guests"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def supervisor_dir(self) -> Path:
        return self.root / "supervisor"

    @property
    def history_path(self) -> Path:
        return self.root / "history.sqlite"

    def guest_dir(self, name: str) -> Path:
        return self.guests_dir / name

    def guest_record_path(self, name: str) -> Path:
        return self.guest_dir(name) / "record.json"

    def guest_log_path(self, name: str) -> Path:
        return self.guest_dir(name) / "log.jsonl"

    def snapshots_path(self, name: str) -> Path:
        return self.guest_dir(name) / "snapshots.json"

    def read_snapshots(self, name: str) -> list[dict[str, Any]]:
        p = self.snapshots_path(name)
        return list(read_json(p).get("snapshots", [])) if p.exists() else []

    def write_snapshots(self, name: str, snapshots: list[dict[str, Any]]) -> None:
        write_json(self.snapshots_path(name), {"format": FORMAT, "snapshots": snapshots})

    def network_record_path(self, name: str) -> Path:
        return self.networks_dir / f"{name}.json"

    # -- lifecycle
    def exists(self) -> bool:
        return (self.root / "FORMAT").exists()

    def check_owner(self) -> None:
        """Refuse a state dir root cannot trust, as ssh's StrictModes refuses a loose home:
        the dir and its own subdirectories must be real directories (no links) owned by
        this user and writable by no one else; every ancestor must be owned by root or
        this user, and writable by others only with the sticky bit (/tmp)."""
        me = os.geteuid()
        for d in (self.root, self.networks_dir, self.guests_dir, self.images_dir,
                  self.supervisor_dir):
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                continue
            what = "the state dir" if d == self.root else str(d)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise StateError(f"{what} {d}: not a directory (a link, say)",
                                 hint="move it aside; consolidator makes it anew")
            if st.st_uid != me:
                raise StateError(f"{what} {d} is owned by uid {st.st_uid}, not {me}",
                                 hint="a state dir another user controls can make root "
                                      "write where they choose: use one root owns")
            if st.st_mode & 0o022:
                raise StateError(f"{what} {d} is writable by group or others "
                                 f"(mode {stat.S_IMODE(st.st_mode):o})",
                                 hint=f"chmod go-w {d}")
        for p in Path(os.path.abspath(self.root)).parents:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if st.st_uid not in (0, me) or \
                    (st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX):
                raise StateError(f"{p}, above the state dir, may be changed by others",
                                 hint="put the state dir below directories only root "
                                      "can change")

    def ensure(self) -> "StateDir":
        """Create the dir (0700) with its format tag, or check an existing one. Either
        way it must be ours alone (check_owner)."""
        if self.root.exists() or self.root.is_symlink():
            self.check_owner()
        if self.exists():
            self.check_format()
            return self
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
            for d in (self.networks_dir, self.guests_dir, self.images_dir, self.supervisor_dir):
                d.mkdir(exist_ok=True, mode=0o700)
            atomic_write(self.root / "FORMAT", FORMAT_TAG, 0o644)
        except PermissionError as e:
            raise StateError(f"cannot create state dir {self.root}: {e.strerror}",
                             hint="run as root, or set --state-dir / CONSOLIDATOR_STATE_DIR") from None
        self.check_owner()
        return self

    def share_with(self, gid: int | None) -> None:
        """Let a group reach the supervisor's socket (and only that: the dirs on the way
        get group search permission, nothing to list or read); None takes it back."""
        for d in (self.root, self.supervisor_dir):
            os.chown(d, -1, gid if gid is not None else os.getegid(), follow_symlinks=False)
            os.chmod(d, 0o710 if gid is not None else 0o700)

    def check_format(self) -> int:
        """The dir's format: this version's, or an older one it migrates. Refuses others."""
        try:
            tag = (self.root / "FORMAT").read_text()
        except FileNotFoundError:
            return FORMAT
        word, _, n = tag.strip().rpartition(" ")
        if word == "consolidator-state" and n.isdigit() and \
                (int(n) == FORMAT or int(n) in MIGRATIONS):
            return int(n)
        raise StateError(f"{self.root}: state format {tag.strip()!r} is not "
                         f"{FORMAT_TAG.strip()!r}",
                         hint="this state dir was written by a newer consolidator version: "
                              "run that version, or restore from a backup")

    def migrate(self) -> list[tuple[int, int, int]]:
        """Bring an older state dir to this format (the supervisor, under its lock).
        Returns (from, to, files rewritten) per migration run."""
        done = []
        n = self.check_format()
        while n < FORMAT:
            keep = self.root / "migrated" / f"format-{n}"
            files = MIGRATIONS[n](self, keep)
            atomic_write(self.root / "FORMAT", f"consolidator-state {n + 1}\n", 0o644)
            done.append((n, n + 1, files))
            n += 1
        return done

    def _rewrite(self, path: Path, keep: Path, new: dict[str, Any]) -> None:
        """One file of a migration: its original kept (once: a second run finds it
        rewritten and passes it over), then the new content, atomically."""
        saved = keep / path.relative_to(self.root)
        if not saved.exists():
            saved.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(saved, path.read_bytes())
        write_json(path, new)

    # -- applied fleet
    def read_applied(self) -> dict[str, Any] | None:
        if not self.applied_path.exists():
            return None
        return read_json(self.applied_path)

    def write_applied(self, fleet: Fleet, inventory_text: str, *, complete: bool,
                      index: int, path: str | None = None) -> None:
        """The fleet being applied (``complete`` false: written ahead, so a supervisor
        killed mid-apply is followed by one that knows it) or applied."""
        write_json(self.applied_path, {
            "format": FORMAT, "hash": fleet.fleet_hash(), "applied_at": time.time(),
            "complete": complete, "index": index, "fleet": fleet.model_dump(mode="json"),
            "inventory": inventory_text, "inventory_path": path})

    # -- records
    def read_guest_record(self, name: str) -> dict[str, Any] | None:
        p = self.guest_record_path(name)
        return read_json(p) if p.exists() else None

    def write_guest_record(self, name: str, record: dict[str, Any]) -> None:
        """``record``: its own fields (RECORD_KEYS) and ``facts``, nothing else."""
        stray = set(record) - set(RECORD_KEYS) - {"facts"}
        if stray:
            raise StateError(f"guest {name}: record fields {sorted(stray)} belong in facts",
                             hint="a supervisor bug: please report it")
        self.guest_dir(name).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(self.guest_record_path(name), {"format": FORMAT, **record})

    def remove_guest_files(self, name: str, *, purge: bool) -> None:
        """Everything of the guest but its disks; with ``purge``, its disks too."""
        gdir = self.guest_dir(name)
        if purge:
            shutil.rmtree(gdir, ignore_errors=True)
            return
        for p in gdir.iterdir() if gdir.is_dir() else []:
            if p.suffix in DISK_SUFFIXES or p.name in KEPT_FILES:
                # kept, but no longer the guest uid's: that uid may go to another guest
                with contextlib.suppress(OSError):
                    os.chown(p, 0, 0, follow_symlinks=False)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        with contextlib.suppress(OSError):
            gdir.rmdir()

    def remove_network_record(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.network_record_path(name).unlink()

    def clear(self, *, purge: bool) -> None:
        """Forget the fleet: every record, the applied fleet and the guests' files; the
        disks stay unless ``purge``. The image cache and the history stay."""
        for g in self.guest_names() + self._guest_dirs_without_record():
            self.remove_guest_files(g, purge=purge)
        for n in self.network_names():
            self.remove_network_record(n)
        with contextlib.suppress(FileNotFoundError):
            self.applied_path.unlink()

    def kept_disks(self) -> list[str]:
        """Disks of guests no longer recorded (kept by a destroy or prune without purge)."""
        return [str(p) for g in self._guest_dirs_without_record()
                for p in sorted(self.guest_dir(g).iterdir()) if p.suffix in DISK_SUFFIXES]

    def _guest_dirs_without_record(self) -> list[str]:
        if not self.guests_dir.is_dir():
            return []
        return sorted(p.name for p in self.guests_dir.iterdir()
                      if p.is_dir() and not (p / "record.json").exists())

    def guest_names(self) -> list[str]:
        if not self.guests_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.guests_dir.glob("*/record.json"))

    def read_network_record(self, name: str) -> dict[str, Any] | None:
        p = self.network_record_path(name)
        return read_json(p) if p.exists() else None

    def write_network_record(self, name: str, record: dict[str, Any]) -> None:
        write_json(self.network_record_path(name), {"format": FORMAT, **record})

    def network_names(self) -> list[str]:
        if not self.networks_dir.is_dir():
            return []
        return sorted(p.stem for p in self.networks_dir.glob("*.json"))

    # -- observed state
    def observe(self) -> Observed:
        """The observed fleet as the state dir records it. Absent or empty: nothing runs."""
        if not self.root.exists():
            return Observed.empty()
        self.check_format()
        applied = self.read_applied()
        host = HostSpec.model_validate(applied["fleet"]["host"]) if applied else None
        instance = applied["fleet"]["instance"] if applied else None
        networks = {}
        for n in self.network_names():
            rec = self.read_network_record(n)
            if rec and "spec" in rec:
                networks[n] = NetworkSpec.model_validate(rec["spec"])
        guests = {}
        for g in self.guest_names():
            rec = self.read_guest_record(g)
            if rec and "intent" in rec:
                guests[g] = ObservedGuest(GuestIntent.model_validate(rec["intent"]),
                                          GuestState(rec.get("state", "defined")))
        if instance is None:
            instance = next((r.get("instance") for r in
                             (self.read_guest_record(g) for g in guests) if r), None)
        return Observed(instance=instance, host=host, networks=networks, guests=guests)


def record_facts(rec: dict[str, Any]) -> dict[str, Any]:
    """A guest record's facts, in any format this version reads (another state dir, of
    another supervisor's version, may be read but never migrated by this one)."""
    if isinstance(rec.get("facts"), dict):
        return rec["facts"]
    return {k: v for k, v in rec.items() if k not in RECORD_KEYS}


# ------------------------------------------------------------------ migrations

def _v1_to_v2(st: StateDir, keep: Path) -> int:
    """Facts under "facts"; every file's "format" 2. Returns the files rewritten."""
    n = 0
    for name in st.guest_names():
        path = st.guest_record_path(name)
        rec = read_json(path)
        if rec.get("format") == 2:
            continue
        new = {k: rec[k] for k in RECORD_KEYS if k in rec}
        st._rewrite(path, keep, {**new, "format": 2, "facts": record_facts(rec)})
        n += 1
    others = [st.applied_path, *st.networks_dir.glob("*.json"),
              *st.guests_dir.glob("*/snapshots.json")]
    for path in others:
        if path.is_file():
            obj = read_json(path)
            if isinstance(obj, dict) and obj.get("format") == 1:
                st._rewrite(path, keep, {**obj, "format": 2})
                n += 1
    return n


#: format N -> the function that brings a state dir of format N to N + 1
MIGRATIONS: dict[int, Callable[[StateDir, Path], int]] = {1: _v1_to_v2}
