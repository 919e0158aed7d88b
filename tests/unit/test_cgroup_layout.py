"""cgroup layout detection from /proc/self/mountinfo and /proc/self/cgroup samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from consolidator.sched.cgroup import CgroupLayout, CgroupMode, Mount, parse_mountinfo, parse_proc_cgroup

HYBRID = """\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
37 30 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
V2 = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
V2_SELF = "0::/system.slice/consolidator.service\n"
COMOUNTED = "31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n" \
            "34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
# inside a container: the mount shows the container's own cgroup at its top
CONTAINER = "31 30 0:27 /docker/xyz /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def layout(mountinfo: str, self_cg: str, ctrls=()) -> CgroupLayout:
    v1, v2 = parse_mountinfo(mountinfo)
    own_v1, own_v2 = parse_proc_cgroup(self_cg)
    mode = (CgroupMode.HYBRID if v1 and v2 else CgroupMode.V1 if v1 else
            CgroupMode.V2 if v2 else CgroupMode.NONE)
    return CgroupLayout(mode, v1, v2, tuple(ctrls), own_v1, own_v2)


def test_hybrid_uses_v1_and_own_memory_cgroup():
    lay = layout(HYBRID, HYBRID_SELF, ["hugetlb"])
    assert lay.mode is CgroupMode.HYBRID and lay.backend == "v1"
    sub = lay.subtree("cns")
    assert sub["memory"] == Path("/sys/fs/cgroup/memory/process_api/abc/cns")
    assert sub["cpu"] == Path("/sys/fs/cgroup/cpu/cns")
    assert set(sub) == {"cpu", "cpuacct", "cpuset", "memory", "pids"}


def test_pure_v2_with_controllers():
    lay = layout(V2, V2_SELF, ["cpuset", "cpu", "io", "memory", "pids"])
    assert lay.mode is CgroupMode.V2 and lay.backend == "v2"
    assert lay.subtree("cns") == {
        "unified": Path("/sys/fs/cgroup/system.slice/consolidator.service/cns")}
    assert lay.subtree("t1", parent="custom/parent") == {
        "unified": Path("/sys/fs/cgroup/system.slice/consolidator.service/custom/parent/t1")}


def test_comounted_v1_controllers():
    v1, _ = parse_mountinfo(COMOUNTED)
    assert v1["cpu"] == v1["cpuacct"] == Mount("/sys/fs/cgroup/cpu,cpuacct", "/")


def test_container_mount_root_is_stripped():
    _, v2 = parse_mountinfo(CONTAINER)
    assert v2 is not None
    assert v2.path_of("/docker/xyz/sub") == Path("/sys/fs/cgroup/sub")
    with pytest.raises(ValueError):
        v2.path_of("/other")


@pytest.mark.parametrize("parent", ["../../escaped", "a/../../..", "../x"])
def test_a_parent_that_leaves_the_supervisors_cgroup_is_refused_before_any_write(parent):
    from consolidator.errors import CgroupError
    from consolidator.sched.cgroup import CgroupDriver, CgroupLayout, CgroupMode
    v1, _ = parse_mountinfo(HYBRID)
    own_v1, _ = parse_proc_cgroup(HYBRID_SELF)
    layout = CgroupLayout(CgroupMode.V1, v1, None, (), own_v1, None)
    with pytest.raises(CgroupError, match="is not below the supervisor's own cgroup"):
        CgroupDriver(layout, "cns", parent)
    assert CgroupDriver(layout, "cns", "machines/consolidator").base["memory"] == \
        Path("/sys/fs/cgroup/memory/process_api/abc/machines/consolidator/cns")
