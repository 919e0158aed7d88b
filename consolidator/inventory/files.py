"""Files an inventory may name: only regular files inside the image roots, and for disks
a backing chain that stays inside them, in the format declared.

Checked when the inventory is validated (by the CLI and again by the supervisor) and when
a guest is launched (``vm/launch.py``), so a file swapped for a link in between is caught.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from ..errors import ImageError


class QemuImgError(RuntimeError):
    pass


def run_qemu_img(*args: str, timeout: float = 60) -> str:
    try:
        res = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                             timeout=timeout)
    except FileNotFoundError:
        raise QemuImgError("qemu-img is not installed (apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise QemuImgError(f"qemu-img {args[0]} did not answer in {timeout:g}s") from None
    if res.returncode != 0:
        raise QemuImgError(f"qemu-img {args[0]} failed: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def qemu_img(*args: str, timeout: float = 600) -> str:
    """``run_qemu_img`` for the code that acts on disks: a failure is an ``ImageError``,
    so callers report it per guest like any other error of ours."""
    try:
        return run_qemu_img(*args, timeout=timeout)
    except QemuImgError as e:
        raise ImageError(str(e), hint="apt-get install qemu-utils" if "installed" in str(e)
                         else None) from None


def real_roots(roots: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.realpath(r) for r in roots)


def inside(path: str | Path, roots: tuple[str, ...]) -> bool:
    """``path`` (symlinks followed) is a root or below one."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def regular_file(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def backing_chain(path: str | Path) -> list[dict]:
    """Every image of ``path``'s chain, the file itself first (qemu-img's own reading)."""
    out = run_qemu_img("info", "--backing-chain", "--output=json", "-U", str(path))
    chain = json.loads(out)
    return chain if isinstance(chain, list) else [chain]


def disk_problems(path: str | Path, declared: str, roots: tuple[str, ...]
                  ) -> list[tuple[str, str]]:
    """(code, message) for a disk base whose chain leaves the roots (I012) or whose format
    is not the declared one (I013). Empty: the disk may be used."""
    try:
        chain = backing_chain(path)
    except (QemuImgError, ValueError) as e:
        return [("I012", f"cannot read its backing chain: {e}")]
    out: list[tuple[str, str]] = []
    top = chain[0] if chain else {}
    if top.get("format") != declared:
        out.append(("I013", f"declared {declared}, but the file is {top.get('format')}"))
    for image in chain[1:]:
        f = image.get("filename", "")
        if not inside(f, roots) or not regular_file(f):
            out.append(("I012", f"its backing file {f} is outside the image roots (or "
                                "not a regular file)"))
    for image in chain:             # a qcow2 may keep its data in an external file
        data = ((image.get("format-specific") or {}).get("data") or {}).get("data-file")
        if data and not (inside(data, roots) and regular_file(data)):
            out.append(("I012", f"its data file {data} is outside the image roots (or not "
                                "a regular file)"))
    return out
