"""The backup directory: what a backup holds on disk, and the operations on those files.

Layout (``host.backup.dir``, default ``<state>/backups``), mode 0700::

    <dir>/FORMAT                          "consolidator-backups 1"
    <dir>/<guest>/<stamp>/manifest.json   what the backup holds, with a sha256 per file
    <dir>/<guest>/<stamp>/definition.json the guest as applied, and the inventory's text
    <dir>/<guest>/<stamp>/<disk>.qcow2    each disk's data: all of it (full), or the
                                          clusters written since the parent (incremental,
                                          a qcow2 whose backing file is ../<parent>/<disk>)
    <dir>/<guest>/<stamp>/efivars.fd      a UEFI guest's variable store
    <dir>/<guest>/.partial-<stamp>/       a backup being written (removed if it fails)
    <dir>/bases/<sha256>.<format>         a disk's base image, stored once for all guests

A guest's boot disk is an overlay on its image: a backup holds the overlay's own
clusters and refers to the base by content; the base is stored once. So a backup is
self-contained within the directory: the directory alone restores the fleet on a new
host. An incremental backup needs the backups it is based on; pruning one of those
first merges it into the backup above it (``qemu-img rebase``), so every kept backup
stays restorable.

A backup appears only whole: it is written under ``.partial-<stamp>``, its manifest last,
then renamed. Every file is checked against the manifest by :meth:`Repo.verify`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImageError, StateError, UsageError
from ..inventory.files import qemu_img
from ..files import fsync_dir
from ..state import atomic_write, read_json, write_json

FORMAT = 1
FORMAT_TAG = f"consolidator-backups {FORMAT}\n"
STAMP_RE = re.compile(r"^\d{8}T\d{6}(\d{3})?Z$")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
FILE_RE = re.compile(r"^(disk|data-[a-z0-9][a-z0-9-]{0,62})\.qcow2$|^efivars\.fd$")
CHUNK = 1 << 20


def stamp(now: float) -> str:
    """A backup's id within its guest: its UTC time, to the millisecond."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()




@dataclass
class Backup:
    """One committed backup, as its manifest says."""

    guest: str
    stamp: str
    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.guest}/{self.stamp}"

    @property
    def taken_at(self) -> float:
        return float(self.manifest.get("started_at", 0))

    @property
    def disks(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("disks", {}))

    def definition(self) -> dict[str, Any]:
        return read_json(self.dir / "definition.json")

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"id": self.id, "guest": self.guest, "stamp": self.stamp,
                "taken_at": self.taken_at, "kind": m.get("kind"),
                "consistency": m.get("consistency"), "reason": m.get("reason"),
                "seconds": m.get("seconds"), "bytes": self.size(),
                "instance": m.get("instance"),
                "disks": {k: {"mode": d.get("mode"), "parent": d.get("parent"),
                              "bytes": d.get("bytes"), "virtual_size": d.get("virtual_size")}
                          for k, d in self.disks.items()}}


class Repo:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ layout
    def ensure(self) -> "Repo":
        tag = self.root / "FORMAT"
        if tag.exists():
            self.check_format()
            return self
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
            (self.root / "bases").mkdir(exist_ok=True, mode=0o700)
            atomic_write(tag, FORMAT_TAG, 0o644)
        except PermissionError as e:
            raise StateError(f"cannot create backup dir {self.root}: {e.strerror}") from None
        return self

    def check_format(self) -> None:
        tag = self.root / "FORMAT"
        if not tag.exists():
            raise StateError(f"{self.root} is not a consolidator backup directory "
                             "(no FORMAT file)")
        text = tag.read_text()
        if text != FORMAT_TAG:
            raise StateError(f"{self.root}: backup format {text.strip()!r} is not "
                             f"{FORMAT_TAG.strip()!r}")

    def guest_dir(self, guest: str) -> Path:
        if not NAME_RE.match(guest):
            raise UsageError(f"{guest!r} is not a guest name")
        return self.root / guest

    # ------------------------------------------------------------------ reading
    def guests(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name))

    def backups(self, guest: str | None = None) -> list[Backup]:
        """Committed backups, oldest first. A manifest that cannot be read is listed with
        an empty manifest (verify says what is wrong with it)."""
        out = []
        for g in [guest] if guest else self.guests():
            d = self.guest_dir(g)
            if not d.is_dir():
                continue
            for b in sorted(d.iterdir()):
                if not b.is_dir() or not STAMP_RE.match(b.name):
                    continue
                try:
                    m = read_json(b / "manifest.json")
                except (OSError, ValueError, StateError):
                    m = {}
                out.append(Backup(g, b.name, b, m if isinstance(m, dict) else {}))
        return sorted(out, key=lambda b: (b.guest, b.stamp))

    def find(self, ref: str, guest: str | None = None) -> Backup:
        """A backup by ``guest/stamp``, or by ``stamp`` with ``guest``."""
        g, _, s = ref.rpartition("/")
        g = g or guest or ""
        if not g or not STAMP_RE.match(s):
            raise UsageError(f"backup {ref!r}: expected GUEST/STAMP (see backup list)")
        for b in self.backups(g):
            if b.stamp == s:
                return b
        raise UsageError(f"no backup {g}/{s} in {self.root}")

    def latest(self, guest: str) -> Backup | None:
        done = [b for b in self.backups(guest) if b.manifest]
        return done[-1] if done else None

    # ------------------------------------------------------------------ writing
    def begin(self, guest: str, at: float) -> tuple[str, Path]:
        """A partial dir for a new backup; stale partials of the guest are removed."""
        d = self.guest_dir(guest)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in d.glob(".partial-*"):
            shutil.rmtree(p, ignore_errors=True)
        s = stamp(at)
        while (d / s).exists():                     # two in one millisecond
            at += 0.001
            s = stamp(at)
        part = d / f".partial-{s}"
        part.mkdir(mode=0o700)
        return s, part

    def abort(self, part: Path) -> None:
        shutil.rmtree(part, ignore_errors=True)

    def commit(self, guest: str, s: str, part: Path, manifest: dict[str, Any]) -> Backup:
        """Checksum every file, write the manifest, then make the backup appear."""
        files = {}
        for p in sorted(part.iterdir()):
            if p.is_file() and p.name != "manifest.json":
                os.chmod(p, 0o600)
                files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for label, disk in manifest["disks"].items():
            disk["bytes"] = files[disk["file"]]["bytes"]
        manifest = {**manifest, "format": FORMAT, "files": files, "stamp": s,
                    "guest": guest}
        write_json(part / "manifest.json", manifest)
        final = self.guest_dir(guest) / s
        os.replace(part, final)
        fsync_dir(final.parent)
        return Backup(guest, s, final, manifest)

    def new_target(self, part: Path, file: str, size: int, parent: Backup | None) -> Path:
        """An empty qcow2 for a disk's data; backed by the parent's file (by a relative
        name, so the directory may move) when incremental."""
        path = part / file
        args = ["create", "-q", "-f", "qcow2"]
        if parent is not None:
            args += ["-u", "-F", "qcow2", "-b", f"../{parent.stamp}/{file}"]
        qemu_img(*args, str(path), str(size), timeout=3600)
        os.chmod(path, 0o600)
        return path

    def store_base(self, chain: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        """Keep a disk's base (everything below its overlay) once, by content: the layers
        flattened into one file named by the sha256 of the layers' own checksums."""
        layers = [(Path(p), fmt) for p, fmt in chain]
        key = hashlib.sha256("".join(self.file_sha(p) + fmt for p, fmt in layers)
                             .encode()).hexdigest()
        dest = self.root / "bases" / f"{key}.qcow2"
        if not dest.exists():
            dest.parent.mkdir(exist_ok=True, mode=0o700)
            tmp = dest.with_name(f".{dest.name}.tmp")
            qemu_img("convert", "-U", "-O", "qcow2", "-f", layers[0][1], str(layers[0][0]),
                     str(tmp), timeout=3600)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
        return {"key": key, "file": f"bases/{dest.name}", "path": str(layers[0][0]),
                "format": layers[0][1], "sha256": self.file_sha(layers[0][0])}

    def file_sha(self, path: Path) -> str:
        """sha256 of a (large, unchanging) image file, cached by its identity."""
        st = path.stat()
        ident = f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cache = self.root / "bases" / "sums.json"
        try:
            sums = read_json(cache)
        except (OSError, ValueError, StateError):
            sums = {}
        if ident not in sums:
            sums[ident] = sha256_file(path)
            write_json(cache, sums)
        return str(sums[ident])

    # ------------------------------------------------------------------ checking
    def verify(self, backup: Backup, *, deep: bool = True) -> list[str]:
        """What is wrong with ``backup`` (empty: it restores): its manifest, every file's
        checksum, its parents', its base's; with ``deep``, qemu-img's own check too."""
        problems: list[str] = []
        seen: set[str] = set()
        b: Backup | None = backup
        while b is not None and b.id not in seen:
            seen.add(b.id)
            problems += self._verify_one(b, deep)
            parents = {d.get("parent") for d in b.disks.values()} - {None}
            b = self.find(parents.pop(), b.guest) if parents and not problems else None
        return problems

    def verify_all(self, ref: str | None) -> dict[str, Any]:
        """Verify one backup (``GUEST/STAMP``), a guest's (``GUEST``) or all of them."""
        self.check_format()
        if ref and "/" in ref:
            targets = [self.find(ref)]
        else:
            targets = self.backups(ref)
            if ref and not targets:
                raise UsageError(f"no backups of {ref} in {self.root}")
        results = [{"id": b.id, "problems": self.verify(b)} for b in targets]
        for r in results:
            r["ok"] = not r["problems"]
        return {"dir": str(self.root), "results": results,
                "ok": all(r["ok"] for r in results)}

    def _verify_one(self, b: Backup, deep: bool) -> list[str]:
        if not b.manifest:
            return [f"{b.id}: manifest.json is missing or unreadable"]
        out = []
        for name, f in b.manifest.get("files", {}).items():
            p = b.dir / name
            if not FILE_RE.match(name) and name != "definition.json" and name != "instance-id":
                out.append(f"{b.id}: {name}: not a file a backup holds")
                continue
            if not p.is_file():
                out.append(f"{b.id}: {name}: missing")
                continue
            if sha256_file(p) != f["sha256"]:
                out.append(f"{b.id}: {name}: checksum mismatch (the file changed since "
                           "the backup was written)")
                continue
            if deep and name.endswith(".qcow2"):
                try:
                    qemu_img("check", "-q", "-U", "-f", "qcow2", str(p), timeout=3600)
                except ImageError as e:
                    out.append(f"{b.id}: {name}: {e.message}")
        for label, d in b.disks.items():
            base = d.get("base")
            if base:
                bp = self.root / base["file"]
                if not bp.is_file():
                    out.append(f"{b.id}: {label}: its base {base['file']} is missing")
            parent = d.get("parent")
            if parent and not (b.dir.parent / parent / d["file"]).is_file():
                out.append(f"{b.id}: {label}: its parent backup {parent} is missing")
        return out

    # ------------------------------------------------------------------ using
    def materialize(self, b: Backup, label: str, dest: Path, base: Path | None) -> None:
        """Write disk ``label`` of backup ``b`` as the qcow2 ``dest`` (made beside it,
        then renamed): flattened through its parents, on ``base`` (the image at its
        path on this host) when it is an overlay."""
        d = b.disks[label]
        top = b.dir / d["file"]
        tmp = dest.with_name(f".{dest.name}.restore")
        args = ["convert", "-O", "qcow2", "-f", "qcow2"]
        if d.get("base"):
            if base is None:
                raise UsageError(f"{b.id}: disk {label} is an overlay: its base is needed")
            args += ["-B", str(base), "-F", d["base"]["format"]]
        qemu_img(*args, str(top), str(tmp), timeout=3600)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)

    def same_base(self, base: dict[str, Any], path: Path) -> bool:
        """``path`` holds what the stored base ``base`` holds (the same file, or the same
        content in another file, as one put back by a restore)."""
        if self.file_sha(path) == base["sha256"]:
            return True
        try:
            qemu_img("compare", "-U", "-q", str(self.root / base["file"]), str(path),
                     timeout=3600)
            return True
        except ImageError:
            return False

    def remove(self, b: Backup) -> dict[str, Any]:
        """Delete ``b``; a backup based on it first takes in what it needs from it."""
        merged = []
        for child in self.backups(b.guest):
            deps = [lbl for lbl, d in child.disks.items() if d.get("parent") == b.stamp]
            if not deps:
                continue
            self._merge_into(child, b, deps)
            merged.append(child.id)
        shutil.rmtree(b.dir)
        return {"removed": b.id, "merged_into": merged}

    def _merge_into(self, child: Backup, gone: Backup, labels: list[str]) -> None:
        """Rebase ``child``'s disks from ``gone`` onto ``gone``'s parent (or onto nothing),
        on a copy; the manifest names the new checksum before the copy takes the file's
        place, so a crash between the two is seen (and finished) by :meth:`repair`."""
        m = json.loads(json.dumps(child.manifest))
        swaps = []
        for lbl in labels:
            d = m["disks"][lbl]
            f = child.dir / d["file"]
            work = child.dir / f".{d['file']}.rebase"
            shutil.copyfile(f, work)
            up = gone.disks.get(lbl, {}).get("parent")
            qemu_img("rebase", "-f", "qcow2", "-F", "qcow2",
                     "-b", f"../{up}/{d['file']}" if up else "", str(work), timeout=3600)
            d["parent"] = up
            if not up and d.get("mode") == "incremental":
                d["mode"] = "full (merged)"
            m["files"][d["file"]] = {"sha256": sha256_file(work), "bytes": work.stat().st_size}
            d["bytes"] = m["files"][d["file"]]["bytes"]
            swaps.append((work, f))
        m["pending"] = [w.name for w, _ in swaps]
        write_json(child.dir / "manifest.json", m)
        for work, f in swaps:
            os.replace(work, f)
        del m["pending"]
        write_json(child.dir / "manifest.json", m)
        child.manifest = m

    def repair(self) -> list[str]:
        """Finish merges a crash interrupted; remove the copies of merges it
        interrupted before they were recorded."""
        done = []
        for b in self.backups():
            pending = b.manifest.get("pending") or []
            for stray in b.dir.glob(".*"):
                if stray.name not in pending:
                    stray.unlink()
            if not pending:
                continue
            for w in pending:
                work = b.dir / w
                if work.exists():
                    os.replace(work, b.dir / w[1:].removesuffix(".rebase"))
            m = dict(b.manifest)
            del m["pending"]
            write_json(b.dir / "manifest.json", m)
            done.append(b.id)
        return done

    def survey(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The directory's size and its filesystem's free space (bytes), and each guest's
        newest backup, in one pass over the manifests: they record every file's size, so
        only the bases and a backup without a readable manifest are stat'ed."""
        total, newest = 0, {}
        for b in self.backups():
            files = b.manifest.get("files")
            if isinstance(files, dict) and files:
                total += sum(int(f.get("bytes") or 0) for f in files.values()
                             if isinstance(f, dict))
            else:
                with contextlib.suppress(OSError):
                    total += b.size()
            if b.manifest:
                newest[b.guest] = b          # oldest first: the last one stays
        with contextlib.suppress(OSError):
            for f in (self.root / "bases").iterdir():
                total += f.lstat().st_size
        try:
            st = os.statvfs(self.root)
            free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        except OSError:
            free = size = None
        usage = {"dir": str(self.root), "bytes": total, "fs_free": free, "fs_size": size}
        return usage, {g: b.summary() for g, b in newest.items()}

    def usage(self) -> dict[str, Any]:
        return self.survey()[0]

