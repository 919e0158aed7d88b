"""Templates for linked clones: an image ``from: GUEST@REF`` is GUEST's boot disk as it
was at snapshot REF (read out of its qcow2) or at backup REF (read out of the backup
directory), written once to ``<state>/images/templates/GUEST@REF.qcow2`` as an overlay
on the base GUEST's disk is on. Every guest of the image then gets an overlay of its own
on the template: eight clones cost one template and eight small overlays."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from ..errors import ImageError
from ..inventory.files import qemu_img
from .repo import Repo




def make_template(ref: str, dest: Path, *, guests_dir: Path, repo: Repo) -> bool:
    """Write the template of ``ref`` to ``dest`` unless it is there; True when made. Two
    guests starting at once wait for one writer (a lock beside it)."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(dest.with_name(f".{dest.name}.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            return False
        guest, _, tag = ref.partition("@")
        tmp = dest.with_name(f".{dest.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        src = guests_dir / guest / "disk.qcow2"
        info = json.loads(qemu_img("info", "-U", "--output=json", str(src))) \
            if src.exists() else {}
        if any(s.get("name") == tag for s in info.get("snapshots") or []):
            base = info.get("full-backing-filename") or info.get("backing-filename")
            args = ["convert", "-U", "-l", f"snapshot.name={tag}", "-f", "qcow2",
                    "-O", "qcow2"]
            if base:
                args += ["-B", base, "-F", info.get("backing-filename-format", "raw")]
            qemu_img(*args, str(src), str(tmp), timeout=3600)
        else:
            _from_backup(repo, guest, tag, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
        return True
    finally:
        os.close(lock)


def _from_backup(repo: Repo, guest: str, tag: str, tmp: Path) -> None:
    try:
        b = repo.find(tag, guest)
    except Exception:
        raise ImageError(f"{guest}@{tag}: guest {guest} has no snapshot {tag!r} and "
                         f"{repo.root} no backup of it so named") from None
    if "disk" not in b.disks:
        raise ImageError(f"{b.id} holds no boot disk to make a template of")
    problems = repo.verify(b)
    if problems:
        raise ImageError(f"{b.id} does not verify: {problems[0]}")
    base = b.disks["disk"].get("base")
    if base is None:
        repo.materialize(b, "disk", tmp, None)
        return
    orig = Path(base["path"])
    if orig.exists() and repo.same_base(base, orig):
        repo.materialize(b, "disk", tmp, orig)
        return
    # the base it was taken on is gone from this host: a standalone template
    part = tmp.with_name(f"{tmp.name}.part")
    repo.materialize(b, "disk", part, repo.root / base["file"])
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "qcow2", str(part), str(tmp), timeout=3600)
    finally:
        part.unlink(missing_ok=True)
