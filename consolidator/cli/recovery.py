"""Disaster recovery on the command line: ``snapshot``, ``backup`` and ``restore``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .base import Ctx, common_options, handled
from .output import err, out, show


def _call(c: Ctx, op: str, *, start: bool = False, **args: Any) -> Any:
    from ..daemon import protocol
    with protocol.connect(Path(c.state_dir), start=start) as client:
        return client.call(op, on_event=lambda ev: err.print(
            f"{ev.get('guest')}: {ev.get('phase')}", markup=False), **args)


def _names(c: Ctx, names: tuple[str, ...], all_: bool) -> list[str]:
    if all_ and names:
        raise UsageError("name guests or give --all, not both")
    if all_:
        st = _call(c, "status")
        return [g["name"] for g in st["guests"]]
    if not names:
        raise UsageError("name at least one guest, or give --all")
    return list(names)


def _ms(v: Any) -> str:
    return "" if v is None else f"{v:.0f} ms"


@click.group()
def snapshot() -> None:
    """Snapshots of guests' disks (and with --memory, of their RAM), inside their qcow2."""


@snapshot.command("create")
@common_options
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every guest, at one instant")
@click.option("--memory", is_flag=True,
              help="Also RAM and device state: a revert resumes the guest where it was")
@click.option("--tag", default=None, help="The snapshot's name [default snap-DATE-TIME]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
@handled
def snapshot_create(c: Ctx, names: tuple[str, ...], all_: bool, memory: bool,
                    tag: str | None, as_json: bool) -> None:
    """Snapshot guests live. Several guests (or --all) are taken at one instant: every
    filesystem is frozen through the guests' agents, every disk snapshotted, then every
    guest thawed (with --memory: every guest paused, saved, resumed)."""
    res = _call(c, "snapshot-create", names=_names(c, names, all_), memory=memory, tag=tag)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for g in res["guests"]:
        out.print(f"{g['name']}: snapshot {res['tag']} ({g['kind']}, disks "
                  f"{', '.join(g['disks'])})", markup=False)
    if res.get("window_ms") is not None:
        what = "paused" if any(g["memory"] for g in res["guests"]) else "frozen"
        out.print(f"{what} for {_ms(res['window_ms'])}", markup=False)


@snapshot.command("list")
@common_options
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON")
@handled
def snapshot_list(c: Ctx, name: str | None, as_json: bool) -> None:
    """Snapshots per guest: when, what kind (memory, frozen, crash, offline) and where.

    frozen: the guest's agent froze its filesystems; crash: no agent answered, the disks
    hold what a power cut would leave; memory: RAM too; offline: the guest was stopped."""
    from rich.table import Table
    from ..units import human_size
    res = _call(c, "snapshot-list", **({"name": name} if name else {}))["snapshots"]
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("GUEST", "TAG", "TAKEN", "KIND", "DISKS", "RAM", "NOTE"):
        t.add_column(col)
    import time
    for s in res:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["taken_at"])) \
            if s.get("taken_at") else "?"
        note = f"missing on {', '.join(s['missing_on'])}" if s.get("missing_on") else ""
        t.add_row(s["name"], s["tag"], when, s["kind"], ", ".join(s["disks"]),
                  human_size(s["vm_state_size"]) if s.get("vm_state_size") else "", note)
    show(out, t)


@snapshot.command("revert")
@common_options
@click.argument("name")
@click.argument("tag")
@handled
def snapshot_revert(c: Ctx, name: str, tag: str) -> None:
    """Put a guest back to snapshot TAG. A memory snapshot resumes where it was taken; a
    disk-only one restarts the guest (if it ran) on the reverted disks. The next backup
    of the guest is full: a revert invalidates what its bitmaps recorded."""
    res = _call(c, "snapshot-revert", name=name, tag=tag)
    out.print(f"{name}: reverted to {tag} ({res['how']}) in {res['seconds']:.2f} s; "
              f"{res['state']}", markup=False)


@snapshot.command("rm")
@common_options
@click.argument("name")
@click.argument("tag")
@handled
def snapshot_rm(c: Ctx, name: str, tag: str) -> None:
    """Delete snapshot TAG of a guest from its disks."""
    res = _call(c, "snapshot-rm", name=name, tag=tag)
    out.print(f"{name}: snapshot {tag} removed from {', '.join(res['removed_from']) or 'the record'}",
              markup=False)
