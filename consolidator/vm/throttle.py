"""Disk throttling: QEMU throttle groups, two on every disk, changed live. Pure.

Every disk of a guest sits under two ``throttle`` filter nodes, so any limit can be set,
changed or lifted through QMP (``qom-set`` of a group's ``limits``) with no restart:

    device -> <drive>-io (group io-<drive>: the inventory's limits for that disk)
           -> <drive>-share (group io-guest: the guest's part of the host budget, set by
              the rebalancer; one group for all the guest's disks)
           -> <drive> (the format node: snapshots, backups and bitmaps act here)

A group without limits passes every request straight on (QEMU checks ``throttle_enabled``
and takes no timer), which is what the bench measures against no filter at all.

``limits`` holds every field, the unset ones 0: ``qom-set`` merges into the group's
current limits, so a limit lifted must be written as 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:                       # qemu.py's argv builder imports this: keep it light
    from ..inventory.schema import DiskIo
    from ..model import GuestIntent

GUEST_GROUP = "io-guest"
_KINDS = ("total", "read", "write")
#: every ThrottleLimits field this module writes
FIELDS = tuple(f"{what}-{kind}{suffix}" for what in ("bps", "iops") for kind in _KINDS
               for suffix in ("", "-max", "-max-length"))


def group(drive: str) -> str:
    """The throttle group holding ``drive``'s own limits."""
    return f"io-{drive}"


def top_node(drive: str) -> str:
    """The node a disk's device is attached to."""
    return f"{drive}-io"


def share_node(drive: str) -> str:
    return f"{drive}-share"


def _empty() -> dict[str, int]:
    return {f: (1 if f.endswith("-max-length") else 0) for f in FIELDS}


def disk_limits(io: DiskIo | None) -> dict[str, int]:
    """A disk's limits as QEMU's ThrottleLimits. A burst of B bytes over a largest byte
    limit L lets every limit run B/L times as fast for up to a second after a quiet spell
    (QEMU's bucket: ``max`` x ``max-length``)."""
    out = _empty()
    if io is None:
        return out
    declared = {"bps-total": io.bps, "bps-read": io.read_bps, "bps-write": io.write_bps,
                "iops-total": io.iops}
    byte_limits = [v for k, v in declared.items() if v and k.startswith("bps")]
    factor = io.burst / max(byte_limits) if io.burst and byte_limits else None
    for key, v in declared.items():
        if v:
            out[key] = int(v)
            if factor is not None and factor > 1:
                out[f"{key}-max"] = max(int(v), round(v * factor))
    return out


def share_limits(bps: int | None, iops: int | None) -> dict[str, int]:
    """The guest group's limits: its part of the host budget (None: no ceiling)."""
    out = _empty()
    if bps:
        out["bps-total"] = int(bps)
    if iops:
        out["iops-total"] = int(iops)
    return out


def guest_limits(intent: GuestIntent) -> dict[str, dict[str, int]]:
    """Each drive's own limits, by drive node name (``disk0``, ``data-<name>``)."""
    return {d.node: disk_limits(d.io) for d in intent.drives()}


def object_arg(group_id: str, limits: dict[str, int] | None = None) -> str:
    """``-object`` value for a throttle group with ``limits`` (only the fields set)."""
    arg = f"throttle-group,id={group_id}"
    for k, v in (limits or {}).items():
        if v and not (k.endswith("-max-length") and v == 1):
            arg += f",x-{k}={v}"
    return arg


def shown(limits: dict[str, Any]) -> dict[str, int]:
    """The limits that are set, for status and logs."""
    return {k: v for k, v in limits.items()
            if v and not k.endswith("-max-length") and not k.endswith("-max")}
