"""Find and remove an instance's leftovers by name prefix alone: no state dir needed.

After a crash the records may be gone or stale; the kernel objects still carry the
instance prefix (see :mod:`consolidator.net.names`), and QEMU processes sit in the
instance's cgroups. ``scan`` lists them; ``collect`` removes them, processes first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .net import names
from .net import netns as ns
from .net import nft
from .net.fabric import Fabric
from .sched.cgroup import CgroupDriver, detect


@dataclass(frozen=True)
class Leftover:
    kind: str      # process, netns, link, nft, cgroup
    name: str
    where: str     # netns or path

    def describe(self) -> str:
        return f"{self.kind:8} {self.name}" + (f"  ({self.where})" if self.where else "")


def _netns_candidates(instance: str, fabric_netns: str | None) -> list[str | None]:
    out: list[str | None] = [None]
    if fabric_netns and ns.exists(fabric_netns):
        out.append(fabric_netns)
    out += [n for n in ns.listing() if names.netns_is_ours(instance, n) and n not in out]
    return out


def scan(instance: str, fabric_netns: str | None = None, cgroup_parent: str | None = None
         ) -> list[Leftover]:
    found: list[Leftover] = []
    driver = CgroupDriver(detect(), instance, cgroup_parent)
    for guest in driver.guests_present():
        for pid in sorted(driver.pids(guest)):
            found.append(Leftover("process", str(pid), f"guest {guest}"))
    for n in ns.listing():
        if names.netns_is_ours(instance, n):
            found.append(Leftover("netns", n, "/run/netns"))
    for where in _netns_candidates(instance, fabric_netns):
        with ns.iproute(where) as ipr:
            for link in ipr.get_links():
                ifname = link.get_attr("IFLA_IFNAME")
                if names.link_is_ours(instance, ifname):
                    found.append(Leftover("link", ifname, where or "root netns"))
        for family, table in nft.tables(where):
            if names.nft_table_is_ours(instance, table):
                found.append(Leftover("nft", f"{family} {table}", where or "root netns"))
    for d in driver.leftovers():
        found.append(Leftover("cgroup", d.name, str(d)))
    return found


def collect(instance: str, fabric_netns: str | None = None, cgroup_parent: str | None = None
            ) -> list[str]:
    """Remove every leftover of ``instance``. Returns what went."""
    driver = CgroupDriver(detect(), instance, cgroup_parent)
    gone = []
    for guest in driver.guests_present():
        if driver.pids(guest):
            driver.kill(guest)
            gone.append(f"processes of guest {guest}")
    for where in _netns_candidates(instance, fabric_netns):
        gone += Fabric(instance, where).destroy(
            remove_fabric_netns=where is not None and names.netns_is_ours(instance, where))
    gone += [f"cgroup {d}" for d in driver.leftovers()]
    driver.remove_instance()
    return gone
