"""Pure: which backups a guest's ``keep`` rules keep, and when its next backup is due.

The rules read as Proxmox's do. Backups are taken newest first. ``last: N`` keeps the N
newest. ``daily: N`` then keeps the newest backup of each of the N most recent days that
have one, counting only days no earlier rule already kept a backup of; ``weekly: N``
the same by ISO week. What no rule keeps is removed, except that the newest backup is
always kept: a rule set that keeps nothing cannot empty a guest's backups.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Keep:
    last: int = 7
    daily: int = 7
    weekly: int = 4


@dataclass(frozen=True)
class Decision:
    keep: tuple[str, ...]
    remove: tuple[str, ...]
    why: dict[str, str]            # id -> the rule that kept it


def _day(t: float, tz: dt.tzinfo | None) -> str:
    return dt.datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d")


def _week(t: float, tz: dt.tzinfo | None) -> str:
    y, w, _ = dt.datetime.fromtimestamp(t, tz).isocalendar()
    return f"{y}-W{w:02d}"


def select(backups: Sequence[tuple[str, float]], keep: Keep,
           tz: dt.tzinfo | None = None) -> Decision:
    """``backups``: (id, time taken). ``tz``: whose days and weeks (None: the host's)."""
    ordered = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    why: dict[str, str] = {}
    for i, (bid, _) in enumerate(ordered[:keep.last]):
        why[bid] = f"last {i + 1}"
    rules: list[tuple[str, int, Callable[[float, dt.tzinfo | None], str]]] = [
        ("daily", keep.daily, _day), ("weekly", keep.weekly, _week)]
    for rule, count, period in rules:
        covered = {period(t, tz) for bid, t in ordered if bid in why}
        taken: set[str] = set()
        for bid, t in ordered:
            p = period(t, tz)
            if bid in why or p in covered or p in taken:
                continue
            if len(taken) >= count:
                break
            taken.add(p)
            why[bid] = f"{rule} {p}"
    if ordered and ordered[0][0] not in why:
        why[ordered[0][0]] = "newest"
    kept = tuple(b for b, _ in ordered if b in why)
    gone = tuple(b for b, _ in ordered if b not in why)
    return Decision(kept, gone, why)


def due(last_success: float | None, every: float | None, now: float) -> bool:
    """A guest with a schedule is due when it has no backup or its last is ``every`` old."""
    if every is None:
        return False
    return last_success is None or now - last_success >= every
