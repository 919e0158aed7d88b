"""KSM's knobs and counters in sysfs: read each tick, written only by their one owner.

KSM is one per host, and so is its owner: the supervisor that first has to change a
setting takes ``/run/consolidator/ksm.lock`` (flock: it goes with its process) and is the
only one that writes until it exits. Another supervisor on the same host (another state
dir) reads the counters but leaves the knobs alone, and says so.

Before its first write the owner records the settings it found (``run``,
``pages_to_scan``, ``sleep_millisecs``: the only knobs it ever writes) in
``/run/consolidator/ksm-found.json``; when it exits, or ``host.ksm`` becomes ``off``, it
writes them back and removes the file. An owner killed with SIGKILL leaves the file:
the next owner keeps it (those are the host's settings, not the dead owner's) and so
restores what the host had. /run is emptied at boot, as KSM's settings are reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import structlog

from ..linux import HeldFiles
from .ksm import KsmObs

log = structlog.get_logger("ksm")
KSM_DIR = Path("/sys/kernel/mm/ksm")
RUN_DIR = Path("/run/consolidator")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
COUNTERS = ("pages_shared", "pages_sharing", "full_scans", "pages_scanned")


def available(root: Path = KSM_DIR) -> bool:
    return (root / "run").exists()


def ksmd_pid(proc: str = "/proc") -> int | None:
    """ksmd's PID: a kernel thread (child of kthreadd, PID 2) named ksmd."""
    for d in os.listdir(proc):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"{proc}/{d}/stat", "rb") as f:
                head = f.read(200)
            comm = head[head.index(b"(") + 1:head.rindex(b")")]
            ppid = int(head[head.rindex(b")") + 2:].split()[1])
            if comm == b"ksmd" and ppid == 2:
                return int(d)
    return None


def merging_pages(pid: int, held: HeldFiles) -> int | None:
    """A process's pages that KSM has merged (None where the kernel does not say)."""
    try:
        return int(held.read(f"/proc/{pid}/ksm_merging_pages"))
    except (OSError, ValueError):
        return None


class KsmSysfs:
    def __init__(self, root: Path = KSM_DIR, run_dir: Path = RUN_DIR) -> None:
        self.root = root
        self.run_dir = run_dir
        self._pid: int | None = None
        self._lock_fd: int | None = None
        self.other: str | None = None     # why we may not write (another owner), said once
        self._found: dict[str, Any] | None = None     # recorded, while this one owns KSM

    @property
    def owner(self) -> bool:
        return self._lock_fd is not None

    @property
    def found_path(self) -> Path:
        return self.run_dir / "ksm-found.json"

    # --------------------------------------------------------------- reading
    def read(self, held: HeldFiles, mono: float) -> KsmObs | None:
        """ksmd now, or None where KSM is not built in."""
        try:
            v = {k: int(held.read(str(self.root / k))) for k in
                 ("run", "pages_to_scan", "sleep_millisecs", "pages_shared",
                  "pages_sharing", "full_scans")}
        except (OSError, ValueError):
            return None
        scanned = None
        with contextlib.suppress(OSError, ValueError):
            scanned = int(held.read(str(self.root / "pages_scanned")))
        advisor = False                  # advisor_mode: "[none] scan-time", 6.8 and later
        with contextlib.suppress(OSError):
            advisor = b"[scan-time]" in held.read(str(self.root / "advisor_mode"))
        return KsmObs(mono, v["run"], v["pages_to_scan"], v["sleep_millisecs"],
                      v["pages_shared"], v["pages_sharing"], v["full_scans"],
                      self._cpu(held), scanned, advisor)

    def _cpu(self, held: HeldFiles) -> float:
        for _ in range(2):
            if self._pid is None:
                self._pid = ksmd_pid()
                if self._pid is None:
                    return 0.0
            try:
                return int(held.read(f"/proc/{self._pid}/schedstat").split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                held.forget(f"/proc/{self._pid}/")
                self._pid = None
        return 0.0

    def settings(self) -> dict[str, int]:
        return {k: int((self.root / k).read_text()) for k in KNOBS}

    def host_scanning(self) -> tuple[int, int] | None:
        """(pages_to_scan, sleep_millisecs) the host ran ksmd at before any supervisor
        changed its settings; None: the host had it stopped. Those are what an owner
        recorded (``ksm-found.json``), or, while no owner has written, what is set now."""
        if self._found is None:
            path = self.found_path
            found = json.loads(path.read_text()) if path.exists() else self.settings()
            if not self.owner:
                return _scanning(found)    # may change until this one records it
            self._found = found
        return _scanning(self._found)

    # --------------------------------------------------------------- writing
    def claim(self) -> bool:
        """Become the host's KSM owner, recording what was found. False: another
        supervisor owns it (said once in the log)."""
        if self._lock_fd is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.run_dir / "ksm.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_owner(self.run_dir / "ksm.owner")
            if self.other != holder:
                log.warning("ksm.owned_elsewhere", owner=holder,
                            note="another supervisor tunes KSM on this host; this one "
                                 "only reads its counters")
            self.other = holder
            return False
        self._lock_fd = fd
        self.other = None
        _write(self.run_dir / "ksm.owner", f"pid {os.getpid()}")
        if self.found_path.exists():
            found = json.loads(self.found_path.read_text())
            log.info("ksm.found_kept", found=found,
                     note="left by an owner that did not exit cleanly: the host's settings")
        else:
            found = self.settings()
            _write(self.found_path, json.dumps(found))
            log.info("ksm.found", found=found)
        return True

    def write(self, run: bool, pages: int, sleep_ms: int, current: KsmObs) -> bool:
        """Set the knobs that differ from ``current``. False: not the owner."""
        if not self.claim():
            return False
        want = {"pages_to_scan": pages, "sleep_millisecs": sleep_ms} if run else {}
        have = {"pages_to_scan": current.pages_to_scan, "sleep_millisecs": current.sleep_ms}
        for k, v in want.items():
            if have[k] != v:
                (self.root / k).write_text(str(v))
        if current.run != int(run):
            (self.root / "run").write_text("1" if run else "0")
        return True

    def restore(self) -> dict[str, Any] | None:
        """Put back the settings found, and let go. Returns them (None: not the owner)."""
        if self._lock_fd is None:
            return None
        found: dict[str, Any] | None = None
        try:
            found = json.loads(self.found_path.read_text())
            for k in ("pages_to_scan", "sleep_millisecs", "run"):   # run last
                if k in found and int((self.root / k).read_text()) != int(found[k]):
                    (self.root / k).write_text(str(int(found[k])))
            self.found_path.unlink()
            log.info("ksm.restored", settings=found)
        except (OSError, ValueError) as e:
            log.error("ksm.restore_failed", error=f"{type(e).__name__}: {e}",
                      found=str(self.found_path))
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "ksm.owner").unlink()
        os.close(self._lock_fd)
        self._lock_fd = None
        self._found = None
        return found


def _scanning(found: dict[str, Any]) -> tuple[int, int] | None:
    if int(found.get("run", 0)) != 1:
        return None
    return int(found["pages_to_scan"]), int(found["sleep_millisecs"])


def read_owner(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
