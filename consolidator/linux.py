"""Syscalls Python 3.11 lacks, through cffi in ABI mode (no compiler at install time).

``setns``/``unshare`` arrived in Python 3.12's ``os``; ``pidfd_open`` is used from
``os`` where it exists; KVM needs ``ioctl`` with integer returns; mounts for the netns
directory. Each wrapper raises ``OSError`` with errno set, like ``os`` does.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading

import cffi

_CDEF = """
int ioctl(int fd, unsigned long request, ...);
int setns(int fd, int nstype);
int unshare(int flags);
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
          unsigned long arg5);
long syscall(long number, ...);
"""

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1

# x86_64 syscall numbers (pidfd_open is the same on aarch64; pivot_root is 41 there).
SYS_PIDFD_OPEN = 434
SYS_PIVOT_ROOT = 155 if os.uname().machine == "x86_64" else 41


def _build() -> tuple[cffi.FFI, object]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(None)


# Built once, at import, never lazily: a preexec hook runs these in a forked child, and
# a child forked while another thread was building them (cffi's parser holds a lock)
# would have to build them itself under a lock that can never be released.
_FFI_LIB = _build()
_FFI_LIB[0].typeof("char[]")        # pivot_root's argument type, parsed now (see above)


def _lib() -> tuple[cffi.FFI, object]:
    return _FFI_LIB


def _check(ret: int, what: str) -> int:
    if ret < 0:
        ffi, _ = _lib()
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """``ioctl(fd, request, arg)`` returning the int result (e.g. KVM_GET_API_VERSION)."""
    ffi, lib = _lib()
    return _check(lib.ioctl(fd, ffi.cast("unsigned long", request),  # type: ignore[attr-defined]
                            ffi.cast("unsigned long", arg)), f"ioctl {request:#x}")


def setns(fd: int, nstype: int = 0) -> None:
    _, lib = _lib()
    _check(lib.setns(fd, nstype), "setns")  # type: ignore[attr-defined]


def unshare(flags: int) -> None:
    _, lib = _lib()
    _check(lib.unshare(flags), "unshare")  # type: ignore[attr-defined]


def mount(source: str, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    ffi, lib = _lib()
    _check(lib.mount(source.encode(), target.encode(),  # type: ignore[attr-defined]
                     fstype.encode() if fstype else ffi.NULL, flags,
                     data.encode() if data else ffi.NULL),
           f"mount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    ffi, lib = _lib()
    _check(lib.syscall(SYS_PIVOT_ROOT, ffi.new("char[]", new_root.encode()),  # type: ignore
                       ffi.new("char[]", put_old.encode())), "pivot_root")


def parent_death_signal(sig: int) -> None:
    """The calling process gets ``sig`` when its parent thread dies (for a child
    before exec: a helper that must not outlive the supervisor)."""
    ffi, lib = _lib()
    _check(lib.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl")  # type: ignore[attr-defined]


def no_new_privs() -> None:
    """From here on, no exec may grant privileges (setuid bits, file capabilities)."""
    _, lib = _lib()
    _check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")  # type: ignore


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap(name: str) -> int:
    """Attach to the existing tap ``name`` (in the calling thread's netns): a descriptor
    that reads and writes its frames, with virtio-net headers, as QEMU's ``tap,fd=`` wants."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"tap {name}: {e.strerror}") from None
    return fd


def umount2(target: str, flags: int = 0) -> None:
    _, lib = _lib()
    _check(lib.umount2(target.encode(), flags), f"umount {target}")  # type: ignore


#: the OOM killer's view of what consolidator runs (oom_score_adj, -1000..1000): the host's
#: other processes go first, then a guest, the supervisor last; none is exempt (-1000), so
#: a runaway one can still be stopped
OOM_ADJ_SUPERVISOR = -900
OOM_ADJ_GUEST = -500


CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process holds capability ``cap`` (its effective set)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def set_oom_score_adj(pid: int | str, value: int) -> bool:
    """Write a process's oom_score_adj (``"self"`` for this one). False where the kernel
    refuses (lowering it needs CAP_SYS_RESOURCE) or the process is gone."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


def pidfd_open(pid: int) -> int:
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    ffi, lib = _lib()
    return _check(lib.syscall(SYS_PIDFD_OPEN, ffi.cast("int", pid),  # type: ignore
                              ffi.cast("unsigned int", 0)), "pidfd_open")


class HeldFiles:
    """Kernel pseudo-files (procfs, cgroupfs) read again and again through descriptors
    kept open: each read is one ``pread`` at offset 0, which makes the kernel generate
    the file afresh, instead of open, fstat, ioctl, lseek, read and close behind a Python
    file object. The rebalancer reads some fifty of them a second; this is most of what
    an idle supervisor would otherwise spend.

    A descriptor that fails (its process exited, its cgroup was removed) is closed and the
    error raised; the next read opens the path again, so a recreated cgroup is followed."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._fds: dict[str, int] = {}
        # the loop reads while an executor thread may forget a removed cgroup's files:
        # a descriptor must never be closed (and its number reused) between get and pread
        self._lock = threading.Lock()

    def read(self, path: str) -> bytes:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[path] = fd
            try:
                return os.pread(fd, self.size, 0)
            except OSError:
                self._drop(path)
                raise

    def forget(self, prefix: str) -> None:
        """Close every descriptor of a path under ``prefix`` (a guest's cgroup or PID)."""
        with self._lock:
            for path in [p for p in self._fds if p.startswith(prefix)]:
                self._drop(path)

    def keep_only(self, prefix: str, paths: set[str]) -> None:
        """Under ``prefix``, close the descriptors of paths not in ``paths``."""
        with self._lock:
            for path in [p for p in self._fds if p.startswith(prefix) and p not in paths]:
                self._drop(path)

    def close(self) -> None:
        self.forget("")

    def __del__(self) -> None:        # an owner dropped without close() leaks nothing
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _drop(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)
