"""cgroups: layout detection (v1, v2, hybrid) and where the supervisor's subtree is.

The driver writes only below the supervisor's own cgroup (its delegated
subtree, as under systemd's ``Delegate=yes``): ``<own>/<instance>/...``.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

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
