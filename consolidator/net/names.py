"""Deterministic names for kernel objects and MACs.

Every object carries the instance prefix, so two instances never collide and
``gc`` can find leftovers by prefix after a crash. Linux limits interface
names to 15 bytes (IFNAMSIZ - 1), so names that would not fit are shortened
with a hash of the full name.
"""

from __future__ import annotations

import hashlib

IFNAMSIZ = 15


def _h(*parts: str, n: int) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


def derive_mac(instance: str, guest: str, index: int) -> str:
    """A locally administered unicast MAC (52:54:xx:xx:xx:xx) stable per instance/guest/NIC."""
    h = hashlib.sha256(f"{instance}/{guest}/{index}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in h[:4])
