"""The one teardown path: find and remove an instance's kernel objects by name prefix.

``destroy`` (through the supervisor or without one) and ``gc`` all come here. After a
crash the records may be gone or stale; the kernel objects still carry the instance
prefix (see :mod:`consolidator.net.names`), and QEMU processes sit in the instance's
cgroups. :func:`scan` lists them; :func:`collect` removes them, processes first.

What is removed is always named by a :class:`Scope`: the instance the state dir
recorded (:meth:`Scope.from_applied`), or one the operator named explicitly. Nothing
here guesses an instance from an inventory in the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..net import names
from ..net import netns as ns
from ..net import nft
from ..net.fabric import Fabric
from ..sched.cgroup import CgroupDriver, detect
from ..state import StateDir
from ..vm.identity import Registry


@dataclass(frozen=True)
class Scope:
    """Whose objects: an instance, where its bridges live, where its cgroups hang."""

    instance: str
    fabric_netns: str | None = None
    cgroup_parent: str | None = None

    @classmethod
    def from_applied(cls, applied: dict[str, Any]) -> "Scope":
        host = applied["fleet"]["host"]
        return cls(applied["fleet"]["instance"], host.get("fabric_netns"),
                   host.get("cgroup_parent"))

    @classmethod
    def recorded(cls, state: StateDir) -> "Scope | None":
        """The instance the state dir records: its applied fleet, else its guests' records."""
        applied = state.read_applied() if state.root.exists() else None
        if applied:
            return cls.from_applied(applied)
        for g in state.guest_names():
            inst = (state.read_guest_record(g) or {}).get("instance")
            if inst:
                return cls(inst)
        return None


@dataclass(frozen=True)
class Leftover:
    kind: str      # process, netns, link, nft, cgroup
    name: str
    where: str     # netns or path

    def describe(self) -> str:
        return f"{self.kind:8} {self.name}" + (f"  ({self.where})" if self.where else "")


def _netns_candidates(scope: Scope) -> list[str | None]:
    out: list[str | None] = [None]
    if scope.fabric_netns and ns.exists(scope.fabric_netns):
        out.append(scope.fabric_netns)
    out += [n for n in ns.listing() if names.netns_is_ours(scope.instance, n) and n not in out]
    return out


def scan(scope: Scope) -> list[Leftover]:
    found: list[Leftover] = []
    inst = scope.instance
    driver = CgroupDriver(detect(), inst, scope.cgroup_parent)
    for guest in driver.guests_present():
        for pid in sorted(driver.pids(guest)):
            found.append(Leftover("process", str(pid), _whose(guest)))
    for n in ns.listing():
        if names.netns_is_ours(inst, n):
            found.append(Leftover("netns", n, "/run/netns"))
    for where in _netns_candidates(scope):
        with ns.iproute(where) as ipr:
            for link in ipr.get_links():
                ifname = link.get_attr("IFLA_IFNAME")
                if names.link_is_ours(inst, ifname):
                    found.append(Leftover("link", ifname, where or "root netns"))
        for family, table in nft.tables(where):
            if names.nft_table_is_ours(inst, table):
                found.append(Leftover("nft", f"{family} {table}", where or "root netns"))
    for d in driver.leftovers():
        found.append(Leftover("cgroup", d.name, str(d)))
    return found


def _whose(group: str) -> str:
    """A cgroup of ``guests/``: a guest's, or (a dot no guest name has) a service's."""
    kind, dot, net = group.partition(".")
    return f"the {kind} of network {net}" if dot else f"guest {group}"


def collect(scope: Scope) -> list[str]:
    """Remove every kernel object of ``scope``'s instance, processes first. Returns what
    went. A fabric netns goes only when it carries the instance's prefix."""
    inst = scope.instance
    driver = CgroupDriver(detect(), inst, scope.cgroup_parent)
    gone = []
    for guest in driver.guests_present():
        if driver.pids(guest):
            driver.kill(guest)
            gone.append(f"processes of {_whose(guest)}")
    for where in _netns_candidates(scope):
        gone += Fabric(inst, where).destroy(
            remove_fabric_netns=where is not None and names.netns_is_ours(inst, where))
    gone += [f"cgroup {d}" for d in driver.leftovers()]
    driver.remove_instance()
    return gone


def forget(state: StateDir, *, purge: bool, ids: Registry | None = None) -> None:
    """After :func:`collect`: the records and guests' files go (their disks too with
    ``purge``), and so do the uids the guests held, free for other guests again."""
    state.clear(purge=purge)
    (ids or Registry()).release_state(str(state.root.resolve()))
