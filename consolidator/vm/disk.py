"""Per-guest disk overlays: a qcow2 on top of the image's base, which is never written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import ImageError
from ..inventory.files import qemu_img




def backing_chain(top: Path) -> tuple[tuple[str, str], ...]:
    """(path, format) of ``top`` and every file below it, as qemu-img reads them."""
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", "-U", str(top)))
    chain = tuple((str(i["filename"]), str(i["format"])) for i in info)
    if not chain or any(not os.path.isabs(p) for p, _ in chain):
        raise ImageError(f"disk {top}: cannot read its backing chain as absolute paths")
    return chain


def own(path: Path, uid: int, gid: int) -> None:
    """A file QEMU writes (an overlay, NVRAM) belongs to the guest's uid, mode 0600."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def prepare_overlay(base: Path, base_format: str, overlay: Path
                    ) -> tuple[tuple[str, str], ...]:
    """Make (or reuse) ``overlay`` backed by ``base``; return its chain as
    :func:`backing_chain` reads it (one qemu-img run for a reused overlay). An overlay on
    another base is kept aside as ``<name>.<time>.qcow2``, never deleted: only ``--purge``
    deletes disks."""
    if not os.access(base, os.R_OK):
        raise ImageError(f"disk image {base} is missing or unreadable")
    if overlay.exists():
        chain = backing_chain(overlay)
        if len(chain) > 1 and chain[1][0] == str(base):
            return chain
        aside = overlay.with_name(f"{overlay.stem}.{int(time.time())}{overlay.suffix}")
        os.replace(overlay, aside)
    overlay.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, overlay)
    return backing_chain(overlay)


def virtual_size(path: Path) -> int:
    info = json.loads(qemu_img("info", "--output=json", "-U", str(path)))
    return int(info["virtual-size"])


def prepare_data_disk(path: Path, size: int) -> bool:
    """Make the data disk ``path`` (a qcow2 of ``size`` bytes), or grow it to ``size``;
    never shrink it. True when it was made."""
    if path.exists():
        if virtual_size(path) < size:
            qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size))
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(size))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return True


def prepare_vars(template: Path, dest: Path) -> None:
    """The guest's own UEFI variable store: a copy of ``template`` made once, then kept
    (boot entries and settings live in it), with the guest's disks."""
    if dest.exists():
        return
    try:
        data = template.read_bytes()
    except OSError as e:
        raise ImageError(f"UEFI variable store template {template}: {e.strerror}",
                         hint="apt-get install ovmf") from None
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
