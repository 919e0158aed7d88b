"""What the supervisor opens for one QEMU launch, so that QEMU opens nothing by path.

The sockets are bound and listening in the guest's run dir (root's, 0700): clients
(the supervisor, ``console``) connect by path; QEMU only accepts. The serial log is
opened for appending (the supervisor rotates it by copy-truncate, as before). The
kernel and initrd are opened read-only; the disk's overlay read-write and every layer
below it read-only, each once, from the chain the supervisor read and checked. Vhost
descriptors are opened here; taps come from the placement (they live in the guest's
netns). After the spawn the supervisor closes its copies: QEMU holds its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from ..errors import LaunchError
from ..files import unix_address
from .disk import backing_chain
from .qemu import DiskLayer, Handles, LaunchSpec


class Opened:
    """The descriptors of one launch (:attr:`handles`); :meth:`close` after the spawn."""

    def __init__(self, spec: LaunchSpec, taps: tuple[int, ...] = ()) -> None:
        self._fds: list[int] = []
        self._socks: list[socket.socket] = []
        try:
            self.handles = self._open(spec, taps)
        except BaseException:
            self.close()
            raise

    def _open(self, spec: LaunchSpec, taps: tuple[int, ...]) -> Handles:
        p, boot, name = spec.paths, spec.boot, spec.name
        qmp, console, agent = (self._listen(s) for s in (p.qmp, p.console, p.agent))
        serial = self._file(p.serial_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                            os.O_NOFOLLOW, name, "serial log")
        kernel = self._file(Path(boot.kernel), os.O_RDONLY, name, "kernel") \
            if boot.kernel else None
        initrd = self._file(Path(boot.initrd), os.O_RDONLY, name, "initrd") \
            if boot.kernel and boot.initrd else None
        disk: tuple[DiskLayer, ...] = ()
        if boot.disk:
            chain = tuple(tuple(x) for x in boot.chain) or backing_chain(Path(boot.disk))
            if chain[0][0] != boot.disk:
                raise LaunchError(f"guest {name}: the disk chain does not start at its "
                                  f"overlay {boot.disk}")
            disk = tuple(DiskLayer(self._file(Path(path), os.O_RDWR if i == 0 else os.O_RDONLY,
                                              name, "disk"), fmt)
                         for i, (path, fmt) in enumerate(chain))
        vhost = tuple(self._file(Path("/dev/vhost-net"), os.O_RDWR, name, "vhost")
                      for _ in spec.nics) if spec.vhost else ()
        ro, rw = os.O_RDONLY | os.O_NOFOLLOW, os.O_RDWR | os.O_NOFOLLOW
        code = vars_ = None
        if boot.firmware == "uefi":
            if not boot.uefi_code or not boot.uefi_vars:
                raise LaunchError(f"guest {name}: UEFI without its firmware files")
            code = self._file(Path(boot.uefi_code), os.O_RDONLY, name, "UEFI firmware")
            vars_ = self._file(Path(boot.uefi_vars), rw, name, "UEFI variable store")
        cdrom = self._file(Path(boot.cdrom), ro, name, "cdrom") if boot.cdrom else None
        seed = self._file(Path(boot.seed), ro, name, "cloud-init seed") if boot.seed else None
        data = tuple(self._file(Path(d.path), rw, name, f"data disk {d.name}")
                     for d in boot.data)
        return Handles(qmp, console, agent, serial, kernel, initrd, disk, taps, vhost,
                       uefi_code=code, uefi_vars=vars_, cdrom=cdrom, data=data, seed=seed)

    def _listen(self, path: Path) -> int:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._socks.append(s)
        with unix_address(path) as addr:
            s.bind(addr)
        os.chmod(path, 0o600)
        s.listen(8)
        return s.fileno()

    def _file(self, path: Path, flags: int, guest: str, what: str) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise LaunchError(f"guest {guest}: cannot open its {what} {path}: "
                              f"{e.strerror}") from None
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for s in self._socks:
            s.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._socks, self._fds = [], []
