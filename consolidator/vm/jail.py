"""Where and as whom QEMU runs: a mount-namespace jail, and credentials it cannot undo.

The plan (:func:`plan_jail`) is made in the supervisor; :meth:`Jail.enter` and
:meth:`Jail.drop` run in the forked child before exec, after the cgroup and netns are
entered (:mod:`.placement`). Like the rest of the pre-exec hook they only make syscalls
on values prepared before the fork: no imports, no logging, no locks.

The jail is a private mount namespace whose root is a small tmpfs holding:

- ``/usr`` (and ``/bin``, ``/lib``, ``/lib64``... as the host has them: links on a
  merged-/usr host, read-only binds otherwise), bound read-only: QEMU's binary, its
  libraries, modules and firmware;
- ``/etc/ld.so.cache``, read-only;
- ``/dev`` with ``null``, ``zero``, ``random``, ``urandom``, and ``kvm`` made for the
  guest's uid (as Firecracker's jailer does), so KVM works whatever the host's
  ``/dev/kvm`` mode;
- ``/proc``, mounted ``hidepid=2``: QEMU sees its own process only;
- ``/tmp``, a 1 MiB tmpfs;

and the root is then remounted read-only. Nothing of the state dir, the inventory, the
images or the host's ``/etc`` is in it: QEMU gets its files as descriptors
(:class:`~consolidator.vm.qemu.Handles`). Then the credentials drop: no supplementary
groups, the guest's gid, the guest's uid (every capability goes with uid 0), and
``no_new_privs``, so no later exec can gain anything.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import linux
from .identity import Identity

JAIL_ROOT = Path("/run/consolidator/jail")
TOP_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "random", "urandom")


@dataclass(frozen=True)
class Node:
    name: str           # under /dev
    mode: int           # S_IFCHR | permissions
    rdev: int
    owned: bool         # owned by the guest's uid (else root)


@dataclass(frozen=True)
class Jail:
    root: str                              # an empty dir: the jail's tmpfs is mounted on it
    binds: tuple[tuple[str, bool], ...]    # (host path, is a directory), read-only, same path
    links: tuple[tuple[str, str], ...]     # (path, target)
    devices: tuple[Node, ...]
    hidepid: bool                          # per-mount proc options (Linux 5.8 and later)

    def describe(self) -> str:
        return f"jail (binds {', '.join(p for p, _ in self.binds)})"

    # ------------------------------------------------------- in the child, pre-exec
    def enter(self, ident: Identity) -> None:
        r = self.root
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", r, "tmpfs", linux.MS_NOSUID, "size=1m,mode=0755")
        for path, is_dir in self.binds:
            target = r + path
            os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
            if not is_dir:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            linux.mount(path, target, None, linux.MS_BIND | linux.MS_REC)
            linux.mount("none", target, None, linux.MS_REMOUNT | linux.MS_BIND |
                        linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
        for path, target in self.links:
            os.makedirs(os.path.dirname(r + path), exist_ok=True)
            os.symlink(target, r + path)
        os.mkdir(r + "/dev", 0o755)
        for d in self.devices:
            os.mknod(f"{r}/dev/{d.name}", d.mode, d.rdev)
            os.chmod(f"{r}/dev/{d.name}", stat.S_IMODE(d.mode))
            if d.owned:
                os.chown(f"{r}/dev/{d.name}", ident.uid, ident.gid)
        os.mkdir(r + "/proc", 0o555)
        linux.mount("proc", r + "/proc", "proc",
                    linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                    "hidepid=2" if self.hidepid else None)
        os.mkdir(r + "/tmp", 0o1777)
        linux.mount("tmpfs", r + "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    "size=1m,mode=1777")
        os.mkdir(r + "/.old", 0o700)
        linux.pivot_root(r, r + "/.old")
        os.chdir("/")
        linux.umount2("/.old", linux.MNT_DETACH)
        os.rmdir("/.old")
        linux.mount("none", "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY |
                    linux.MS_NOSUID)

    @staticmethod
    def drop(ident: Identity) -> None:
        """Become the guest's uid and gid for good (a no-op for root), then forbid any
        exec from granting privileges."""
        if not ident.root:
            os.setgroups([])
            os.setresgid(ident.gid, ident.gid, ident.gid)
            os.setresuid(ident.uid, ident.uid, ident.uid)
        linux.no_new_privs()


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def plan_jail(binary: str) -> Jail:
    """The jail for QEMU ``binary`` on this host (reads the host; makes nothing but the
    empty mount point)."""
    JAIL_ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
    binds: list[tuple[str, bool]] = [("/usr", True)]
    links: list[tuple[str, str]] = []
    for name in TOP_DIRS:
        p = Path("/") / name
        if p.is_symlink():
            links.append((str(p), os.readlink(p)))
        elif p.is_dir():
            binds.append((str(p), True))
    exe = shutil.which(binary)
    if exe:
        real = os.path.realpath(exe)
        if not any(real.startswith(b + "/") for b, _ in binds):
            binds.append((str(Path(real).parent.parent), True))   # e.g. /opt/qemu
    if os.path.isfile("/etc/ld.so.cache"):
        binds.append(("/etc/ld.so.cache", False))
    devices = []
    for name in DEVICES + ("kvm",):
        try:
            st = os.stat(f"/dev/{name}")
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            kvm = name == "kvm"
            devices.append(Node(name, stat.S_IFCHR | (0o600 if kvm else 0o666), st.st_rdev,
                                owned=kvm))
    return Jail(str(JAIL_ROOT), tuple(binds), tuple(links), tuple(devices),
                hidepid=_kernel_at_least(5, 8))
