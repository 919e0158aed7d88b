"""cgroups: one driver interface, with v1 and v2 backends.

Layout detection reads /proc/self/mountinfo and /proc/self/cgroup (v1, v2, or hybrid
like the development hosts: controllers on v1, an empty cgroup2 at
/sys/fs/cgroup/unified). The driver writes only below the supervisor's own cgroup
(its delegated subtree, as under systemd's ``Delegate=yes``)::

    <own cgroup>[/<host.cgroup_parent>]/<instance>/guests/<guest>
    <own cgroup>/supervisor          (v2 only: the no-internal-processes rule)

What each knob becomes is computed by pure functions (:func:`v1_writes`,
:func:`v2_writes`); only :class:`CgroupDriver` touches cgroupfs.

Memory: the hard limit is the guest's ``memory.max`` plus :data:`QEMU_OVERHEAD` plus
the TCG translation cache. The overhead was measured with tools/bench/boot.py: QEMU's
RSS after READY minus the guest RAM it touched is 90-101 MiB (tb-size 32-256), so the
allowance is 96 MiB of process overhead + the bounded translation cache + 2 % of the
guest RAM (page tables, dirty bitmaps). The guest's ``memory.min`` is protected with
``memory.low`` on v2 and the soft limit on v1.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CgroupError
from ..linux import HeldFiles
from ..inventory.schema import format_cpulist
from ..units import MiB

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "io", "pids")


class CgroupMode(enum.StrEnum):
    V1 = "v1"
    V2 = "v2"
    HYBRID = "hybrid"      # v1 controllers, plus a (usually empty) cgroup2 mount
    NONE = "none"


@dataclass(frozen=True)
class Mount:
    point: str        # where it is mounted
    root: str         # which cgroup path the mount shows at its top (not "/" in containers)

    def path_of(self, cgroup_path: str) -> Path:
        """Filesystem path of ``cgroup_path`` (as /proc/self/cgroup names it)."""
        rel = os.path.relpath(cgroup_path, self.root) if self.root != "/" else \
            cgroup_path.lstrip("/")
        if rel.startswith(".."):
            raise ValueError(f"cgroup {cgroup_path} is outside mount root {self.root}")
        return Path(self.point) / ("" if rel == "." else rel)


@dataclass(frozen=True)
class CgroupLayout:
    mode: CgroupMode
    v1: dict[str, Mount] = field(default_factory=dict)        # controller -> mount
    v2: Mount | None = None
    v2_controllers: tuple[str, ...] = ()                        # enabled at the v2 mount root
    own_v1: dict[str, str] = field(default_factory=dict)        # controller -> own cgroup path
    own_v2: str | None = None

    @property
    def backend(self) -> str:
        """Which backend drives guests: v2 when cpu and memory are on cgroup2, else v1."""
        if self.v2 is not None and {"cpu", "memory"} <= set(self.v2_controllers):
            return "v2"
        return "v1" if {"cpu", "memory"} <= set(self.v1) else "none"

    def own_dirs(self) -> dict[str, Path]:
        """The supervisor's own cgroup directory per controller (v1) or for all (v2)."""
        if self.backend == "v2":
            assert self.v2 is not None and self.own_v2 is not None
            return {"unified": self.v2.path_of(self.own_v2)}
        return {c: self.v1[c].path_of(self.own_v1.get(c, "/"))
                for c in V1_CONTROLLERS if c in self.v1}

    def subtree(self, instance: str, parent: str | None = None) -> dict[str, Path]:
        """Where the instance's subtree goes: ``<own or parent>/<instance>`` per hierarchy."""
        base = self.own_dirs()
        if parent:
            base = {c: (p / parent.strip("/")) for c, p in base.items()}
        return {c: p / instance for c, p in base.items()}


def parse_mountinfo(text: str) -> tuple[dict[str, Mount], Mount | None]:
    v1: dict[str, Mount] = {}
    v2: Mount | None = None
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, opts = fields[3], fields[4], tail[0], tail[2].split(",")
        point = point.replace("\\040", " ")
        if fstype == "cgroup2" and v2 is None:
            v2 = Mount(point, root)
        elif fstype == "cgroup":
            for o in opts:
                if o in V1_CONTROLLERS and o not in v1:
                    v1[o] = Mount(point, root)
    return v1, v2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            own_v2 = path
        for c in ctrls.split(","):
            if c in V1_CONTROLLERS:
                own_v1[c] = path
    return own_v1, own_v2


def detect(pid: int | str = "self") -> CgroupLayout:
    with open(f"/proc/{pid}/mountinfo") as f:
        v1, v2 = parse_mountinfo(f.read())
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            own_v1, own_v2 = parse_proc_cgroup(f.read())
    except FileNotFoundError:
        own_v1, own_v2 = {}, None
    ctrls: tuple[str, ...] = ()
    if v2 is not None:
        try:
            ctrls = tuple((Path(v2.point) / "cgroup.controllers").read_text().split())
        except OSError:
            ctrls = ()
    if v1 and v2 is not None:
        mode = CgroupMode.HYBRID
    elif v1:
        mode = CgroupMode.V1
    elif v2 is not None:
        mode = CgroupMode.V2
    else:
        mode = CgroupMode.NONE
    return CgroupLayout(mode, v1, v2, ctrls, own_v1, own_v2)


# --------------------------------------------------------------------- settings

QEMU_OVERHEAD = 96 * MiB
CFS_PERIOD_US = 100_000
PIDS_MAX = 512


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares -> v2 cpu.weight, the systemd way (1024 -> 100), clamped."""
    return max(1, min(10000, shares * 100 // 1024))


PAGE = 4096


def _page(n: int) -> int:
    """The kernel keeps memory limits in whole pages; so do we, or every apply rewrites."""
    return n // PAGE * PAGE


def memory_limit(guest_max: int, tb_size_mib: int = 64) -> int:
    """Hard limit for the guest's cgroup: guest RAM + QEMU's measured overhead."""
    return _page(guest_max + QEMU_OVERHEAD + tb_size_mib * MiB + guest_max // 50)


def memory_protection(guest_min: int) -> int:
    """What memory.low (v2) / the soft limit (v1) protects: the balloon floor + QEMU."""
    return _page(guest_min + QEMU_OVERHEAD)


@dataclass(frozen=True)
class CgroupSettings:
    cpu_shares: int | None = 1024            # None: leave the weight to its owner
    cpu_quota_cores: float | None = None     # None: no cap
    cpus: tuple[int, ...] | None = None      # pin; None: the parent's
    memory_limit: int | None = None          # bytes; None: no limit
    memory_low: int = 0                      # bytes protected
    pids_max: int = PIDS_MAX


def format_cpus(cpus: tuple[int, ...]) -> str:
    return format_cpulist(tuple(sorted(cpus)))


def shares_write(backend: str, shares: int) -> tuple[str, str, str]:
    """The CPU weight's one write, in every full apply and in each rebalancer change."""
    if backend == "v2":
        return ("cpu", "cpu.weight", str(shares_to_weight(shares)))
    return ("cpu", "cpu.shares", str(shares))


def v1_writes(s: CgroupSettings, parent_cpus: str) -> list[tuple[str, str, str]]:
    """Pure: (controller, file, value) writes that make a v1 guest cgroup match ``s``."""
    quota = -1 if s.cpu_quota_cores is None else max(1000, round(s.cpu_quota_cores *
                                                                 CFS_PERIOD_US))
    weight = [shares_write("v1", s.cpu_shares)] if s.cpu_shares is not None else []
    return weight + [
        ("cpu", "cpu.cfs_period_us", str(CFS_PERIOD_US)),
        ("cpu", "cpu.cfs_quota_us", str(quota)),
        ("cpuset", "cpuset.cpus", format_cpus(s.cpus) if s.cpus else parent_cpus),
        ("memory", "memory.limit_in_bytes",
         str(_page(s.memory_limit)) if s.memory_limit is not None else "-1"),
        ("memory", "memory.soft_limit_in_bytes",
         str(_page(s.memory_low)) if s.memory_low else "-1"),
        ("pids", "pids.max", str(s.pids_max)),
    ]


def v2_writes(s: CgroupSettings, parent_cpus: str) -> list[tuple[str, str, str]]:
    """Pure: (controller, file, value) writes for a v2 guest cgroup."""
    quota = "max" if s.cpu_quota_cores is None else str(max(1000, round(s.cpu_quota_cores *
                                                                        CFS_PERIOD_US)))
    weight = [shares_write("v2", s.cpu_shares)] if s.cpu_shares is not None else []
    return weight + [
        ("cpu", "cpu.max", f"{quota} {CFS_PERIOD_US}"),
        ("cpuset", "cpuset.cpus", format_cpus(s.cpus) if s.cpus else ""),
        ("memory", "memory.max",
         str(_page(s.memory_limit)) if s.memory_limit is not None else "max"),
        ("memory", "memory.low", str(_page(s.memory_low))),
        ("pids", "pids.max", str(s.pids_max)),
    ]


@dataclass(frozen=True)
class CgroupUsage:
    """What the rebalancer reads each interval: the CPU counter and memory, nothing more."""
    cpu_usage_ns: int
    memory_current: int


def parse_psi(text: str) -> dict[str, float]:
    """``some avg10=0.00 avg60=0.00 avg300=0.00 total=0`` lines -> flat dict."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for f in fields:
            k, _, v = f.partition("=")
            out[f"{kind}_{k}"] = float(v)
    return out


def parse_flat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


# ----------------------------------------------------------------------- driver

def _read(p: Path) -> str:
    return p.read_text().strip()


def _write(p: Path, value: str) -> None:
    try:
        with open(p, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {p}: {e.strerror}") from None


class CgroupDriver:
    """Creates, sets, reads and removes the instance's cgroups. ``backend`` is v1 or v2."""

    def __init__(self, layout: CgroupLayout, instance: str, parent: str | None = None,
                 backend: str | None = None) -> None:
        self.layout = layout
        self.instance = instance
        self.backend = backend or layout.backend
        if self.backend == "none":
            raise CgroupError("no usable cgroup hierarchy: need cpu and memory on v1 or v2")
        self.parent = parent
        self._held = HeldFiles()
        self._usage_paths: dict[str, tuple[str, str]] = {}
        self.base = layout.subtree(instance, parent)          # controller -> <own>/<inst>
        if self.backend == "v2":
            assert layout.v2 is not None and layout.own_v2 is not None
            unified = layout.v2.path_of(layout.own_v2)
            self.own = unified
            self.base = {"unified": (unified / parent.strip("/") if parent else unified)
                         / instance}
            avail = set(_read(unified / "cgroup.controllers").split()) \
                if (unified / "cgroup.controllers").exists() else set()
            self.controllers = [c for c in V2_CONTROLLERS if c in avail]
        else:
            self.controllers = [c for c in V1_CONTROLLERS if c in self.base]
        self._check_below_own()

    def _check_below_own(self) -> None:
        """Every directory this driver may write is strictly below the supervisor's own
        cgroup, once resolved: a parent like '../../x' never reaches a write."""
        own = self.layout.own_dirs() if self.backend == "v1" else {"unified": self.own}
        for ctrl, base in self.base.items():
            root = Path(os.path.normpath(own[ctrl]))
            real = Path(os.path.normpath(base))
            if real == root or root not in real.parents:
                raise CgroupError(f"cgroup {base} is not below the supervisor's own cgroup "
                                  f"{root}", hint="host.cgroup_parent must be a relative path "
                                  "of names")

    # -- paths
    def _dirs(self, *rel: str) -> dict[str, Path]:
        return {c: p.joinpath(*rel) for c, p in self.base.items()}

    def unique_dirs(self, *rel: str) -> list[Path]:
        """The same cgroup in each distinct hierarchy (co-mounted controllers share one)."""
        seen: dict[Path, None] = {}
        for p in self._dirs(*rel).values():
            seen.setdefault(p, None)
        return list(seen)

    def guest_dirs(self, guest: str) -> dict[str, Path]:
        return self._dirs("guests", guest)

    def _dir_for(self, controller: str, guest: str) -> Path:
        if self.backend == "v2":
            return self.base["unified"] / "guests" / guest
        return self.base[controller] / "guests" / guest

    def procs_files(self, guest: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.unique_dirs("guests", guest)]

    # -- lifecycle
    def prepare(self) -> None:
        """Create ``<inst>/guests`` (and on v2 the supervisor leaf, with controllers on)."""
        if self.backend == "v2":
            self._v2_prepare()
        else:
            for ctrl, d in self._dirs("guests").items():
                self._v1_mkdirs(ctrl, d)

    def _v1_mkdirs(self, ctrl: str, target: Path) -> None:
        """mkdir -p below the supervisor's own cgroup, never above it."""
        base = self.layout.v1[ctrl].path_of(self.layout.own_v1.get(ctrl, "/"))
        todo = []
        p = target
        while p != base:
            if p == p.parent:
                raise CgroupError(f"{target} is not below the supervisor's cgroup {base}")
            todo.append(p)
            p = p.parent
        for d in reversed(todo):
            with contextlib.suppress(FileExistsError):   # guests are prepared concurrently
                d.mkdir()
            if ctrl == "cpuset":   # a v1 cpuset is empty until given cpus and mems
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not _read(d / f):
                        _write(d / f, _read(d.parent / f))

    def _v2_prepare(self) -> None:
        own = self.own
        leaf = own / "supervisor"
        enable = " ".join(f"+{c}" for c in self.controllers)
        procs = _read(own / "cgroup.procs").split()
        if procs and own != Path(self.layout.v2.point):   # type: ignore[union-attr]
            leaf.mkdir(exist_ok=True)
            for pid in procs:     # no internal processes: everything of ours into the leaf
                with contextlib.suppress(OSError):
                    _write(leaf / "cgroup.procs", pid)
        chain = []
        p = self.base["unified"] / "guests"
        while p != own:
            chain.append(p)
            p = p.parent
        parent = own
        for d in reversed(chain):
            if enable:
                _write(parent / "cgroup.subtree_control", enable)
            d.mkdir(exist_ok=True)
            parent = d
        if enable:
            _write(parent / "cgroup.subtree_control", enable)

    def create_guest(self, guest: str) -> None:
        self._forget_usage(guest)
        self.prepare()
        if self.backend == "v2":
            (self.base["unified"] / "guests" / guest).mkdir(exist_ok=True)
            return
        for ctrl, d in self.guest_dirs(guest).items():
            self._v1_mkdirs(ctrl, d)

    def writes(self, settings: CgroupSettings, guest: str) -> list[tuple[str, str, str]]:
        if self.backend == "v2":
            parent_cpus = ""
            return [w for w in v2_writes(settings, parent_cpus) if w[0] in self.controllers]
        parent = self.base["cpuset"] / "guests" if "cpuset" in self.base else None
        parent_cpus = _read(parent / "cpuset.cpus") if parent else ""
        return [w for w in v1_writes(settings, parent_cpus) if w[0] in self.controllers]

    def apply(self, guest: str, settings: CgroupSettings) -> list[str]:
        """Write only what differs. Returns the files written (for logs and tests)."""
        changed = []
        for ctrl, fname, value in self.writes(settings, guest):
            path = self._dir_for(ctrl, guest) / fname
            if self._current(path) != self._normal(fname, value):
                _write(path, value)
                changed.append(f"{ctrl}/{fname}={value}")
        return changed

    def set_shares(self, guest: str, shares: int) -> bool:
        """Only the CPU weight (the rebalancer's knob). Returns whether it was written."""
        if "cpu" not in self.controllers:
            return False
        _, fname, value = shares_write(self.backend, shares)
        path = self._dir_for("cpu", guest) / fname
        if self._current(path) == value:
            return False
        _write(path, value)
        return True

    def read(self, guest: str, controller: str, fname: str) -> str:
        return _read(self._dir_for(controller, guest) / fname)

    @staticmethod
    def _normal(fname: str, value: str) -> str:
        if fname in ("memory.limit_in_bytes", "memory.soft_limit_in_bytes") and value == "-1":
            return "9223372036854771712"
        return value

    @staticmethod
    def _current(path: Path) -> str | None:
        try:
            return _read(path)
        except OSError:
            return None

    def pids(self, guest: str) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files(guest):
            with contextlib.suppress(FileNotFoundError):
                out.update(int(x) for x in _read(f).split())
        return out

    def kill(self, guest: str, timeout: float = 5.0) -> None:
        """SIGKILL everything in the guest's cgroup and wait until it is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids(guest)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def remove_guest(self, guest: str) -> None:
        self._forget_usage(guest)
        for d in self.unique_dirs("guests", guest):
            self._rmdir(d)

    def remove_instance(self) -> None:
        """Remove ``<inst>`` entirely (guests first). The v2 supervisor leaf stays."""
        for d in self.unique_dirs():
            if d.exists():
                for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        self._rmdir(sub)
                self._rmdir(d)

    @staticmethod
    def _rmdir(d: Path, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                d.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}") from None
                time.sleep(0.02)   # an exiting process is still being reaped

    def leftovers(self) -> list[Path]:
        return [d for d in self.unique_dirs() if d.exists()]

    def guests_present(self) -> list[str]:
        names: set[str] = set()
        for d in self.unique_dirs("guests"):
            if d.is_dir():
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    # -- usage
    def usage(self, guest: str) -> CgroupUsage:
        """What the rebalancer reads each interval: the CPU counter and memory, two files,
        through descriptors held open. (PSI is read once per tick for the host: on v1 a
        guest's PSI is the host's.)"""
        paths = self._usage_paths.get(guest)
        if paths is None:
            if self.backend == "v2":
                d = self.base["unified"] / "guests" / guest
                paths = (str(d / "cpu.stat"), str(d / "memory.current"))
            else:
                cpu = self._dir_for("cpuacct", guest) / "cpuacct.usage" \
                    if "cpuacct" in self.base else None
                paths = (str(cpu) if cpu else "",
                         str(self._dir_for("memory", guest) / "memory.usage_in_bytes"))
            self._usage_paths[guest] = paths
        cpu_path, mem_path = paths
        if self.backend == "v2":
            cpu = parse_flat(self._held.read(cpu_path).decode())
            try:
                mem = int(self._held.read(mem_path))
            except FileNotFoundError:          # no memory controller delegated
                mem = 0
            return CgroupUsage(cpu.get("usage_usec", 0) * 1000, mem)
        usage = int(self._held.read(cpu_path)) if cpu_path else 0
        return CgroupUsage(usage, int(self._held.read(mem_path)))

    def _forget_usage(self, guest: str) -> None:
        for path in self._usage_paths.pop(guest, ()):
            if path:
                self._held.forget(path)


_HOST = HeldFiles()


def host_psi(held: HeldFiles = _HOST) -> dict[str, dict[str, float]]:
    out = {}
    for r in ("cpu", "memory", "io"):
        with contextlib.suppress(OSError):
            out[r] = parse_psi(held.read(f"/proc/pressure/{r}").decode())
    return out
