"""Deterministic names for kernel objects.

Every object carries the instance prefix, so two instances never collide and
``gc`` can find leftovers by prefix after a crash. Instance names are
``[a-z][a-z0-9]{0,7}``: no ``-``, ``.`` or ``_``, so a prefix ending in one of those
is unambiguous (``cns-`` never matches instance ``cns2``'s objects).

=================  ===========================  ================================
object             name                         where
=================  ===========================  ================================
bridge             ``{inst}-{network}``         fabric netns
guest port (veth)  ``{inst}.{guest}.{i}``       fabric netns, enslaved to bridge
veth peer          ``vnic{i}``                  the guest's netns
tap                ``tap{i}``                   the guest's netns
tap-veth join      ``br{i}``                    the guest's netns
guest netns        ``{inst}-{guest}``           /run/netns
nft tables         ``{inst}_guard`` (bridge),   fabric netns
                   ``{inst}_filter`` (inet),
                   ``{inst}_nat`` (ip)
cgroup             ``<own>/{inst}/guests/{g}``  every hierarchy
=================  ===========================  ================================

Linux limits interface names to 15 bytes (IFNAMSIZ - 1); a name that would not fit
keeps its prefix and as much of the name as fits, then 4 hex digits of a hash of
the full name.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def fit(prefix: str, name: str, limit: int = IFNAMSIZ) -> str:
    """``prefix + name`` if it fits in ``limit`` bytes, else shortened with a hash."""
    full = prefix + name
    if len(full.encode()) <= limit:
        return full
    room = limit - len(prefix) - 4
    return prefix + name[:max(room, 0)] + _h(full, 4)


def bridge(instance: str, network: str) -> str:
    return fit(f"{instance}-", network)


def guest_port(instance: str, guest: str, index: int) -> str:
    """The fabric-side end of a guest NIC's veth pair (a bridge port)."""
    return fit(f"{instance}.", f"{guest}.{index}")


def guest_peer(index: int) -> str:
    """The guest-netns end of the veth pair."""
    return f"vnic{index}"


def tap(index: int) -> str:
    return f"tap{index}"


def guest_join(index: int) -> str:
    """The two-port bridge joining tap{i} and vnic{i} inside the guest's netns."""
    return f"br{index}"


def guest_netns(instance: str, guest: str) -> str:
    return f"{instance}-{guest}"


def nft_guard_table(instance: str) -> str:
    return f"{instance}_guard"


def nft_nat_table(instance: str) -> str:
    return f"{instance}_nat"


def nft_filter_table(instance: str) -> str:
    return f"{instance}_filter"


def link_is_ours(instance: str, ifname: str) -> bool:
    """Bridges and guest ports of ``instance`` (for gc after a crash)."""
    return ifname.startswith((f"{instance}-", f"{instance}."))


def netns_is_ours(instance: str, name: str) -> bool:
    return name.startswith(f"{instance}-")


def nft_table_is_ours(instance: str, table: str) -> bool:
    return re.fullmatch(rf"{re.escape(instance)}_(guard|filter|nat)", table) is not None

