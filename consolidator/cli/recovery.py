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


def _table(*columns: str) -> Any:
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in columns:
        t.add_column(col)
    return t


def _when(t: float | None) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


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
    from ..units import human_size
    res = _call(c, "snapshot-list", **({"name": name} if name else {}))["snapshots"]
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = _table("GUEST", "TAG", "TAKEN", "KIND", "DISKS", "RAM", "NOTE")
    for s in res:
        when = _when(s.get("taken_at"))
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


# ------------------------------------------------------------------ backups

class _TakeByDefault(click.Group):
    """``backup web db`` takes backups; ``backup list`` and the like are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["take", *args]
        return super().parse_args(ctx, args)


def backup_dir(c: Ctx, given: str | None) -> Path:
    """``--dir``, else the applied fleet's host.backup.dir, else <state>/backups."""
    if given:
        return Path(given)
    applied = c.state().read_applied() if Path(c.state_dir).exists() else None
    d = (((applied or {}).get("fleet") or {}).get("host") or {}).get("backup", {}).get("dir")
    return Path(d) if d else Path(c.state_dir) / "backups"


@click.group(cls=_TakeByDefault)
def backup() -> None:
    """Backups of guests' disks into the backup directory (host.backup.dir).

    \b
    consolidator backup web db          back them up (incremental after the first)
    consolidator backup --all --full    every guest, each a full copy
    consolidator backup list            what the directory holds
    consolidator backup verify [ID]     re-read every file against its checksum
    consolidator backup prune           apply each guest's keep rules now
    """


@backup.command("take", hidden=True)
@common_options
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every guest")
@click.option("--full", is_flag=True, help="A full copy, even where an increment would do")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
@handled
def backup_take(c: Ctx, names: tuple[str, ...], all_: bool, full: bool, as_json: bool) -> None:
    """Back up guests now."""
    import sys
    from ..units import human_size
    res = _call(c, "backup", names=_names(c, names, all_), full=full)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for b in res["backups"]:
            why = f" ({b['reason']})" if b.get("reason") else ""
            out.print(f"{b['id']}: {b['kind']}{why}, {human_size(b['bytes'])} in "
                      f"{b['seconds']:.2f} s, {b['consistency']}", markup=False)
        for f in res["failures"]:
            err.print(f"{f['name']}: backup failed: {f['error']}", markup=False)
    if res["failures"]:
        sys.exit(1)


@backup.command("list")
@common_options
@click.argument("guest", required=False)
@click.option("--dir", "dir_", default=None, help="The backup directory [default: the "
              "applied fleet's host.backup.dir, else <state>/backups]")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON")
@handled
def backup_list(c: Ctx, guest: str | None, dir_: str | None, as_json: bool) -> None:
    """The backups in the backup directory, oldest first, with the directory's size and
    its filesystem's free space."""
    from ..backup.repo import Repo
    from ..units import human_size
    repo = Repo(backup_dir(c, dir_))
    if repo.root.exists():
        repo.check_format()
    res = {"dir": str(repo.root), "backups": [b.summary() for b in repo.backups(guest)],
           "usage": repo.usage() if repo.root.exists() else None}
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = _table("ID", "TAKEN", "KIND", "SIZE", "TIME", "CONSISTENCY", "WHY FULL")
    for b in res["backups"]:
        t.add_row(b["id"], _when(b["taken_at"]),
                  str(b["kind"]), human_size(b["bytes"]),
                  f"{b['seconds']:.1f} s" if b.get("seconds") is not None else "",
                  str(b["consistency"]), b.get("reason") or "")
    show(out, t)
    u = res["usage"]
    if u:
        out.print(f"{u['dir']}: {human_size(u['bytes'])} in backups, "
                  f"{human_size(u['fs_free'])} free", markup=False)


@backup.command("verify")
@common_options
@click.argument("ref", required=False)
@click.option("--dir", "dir_", default=None, help="The backup directory (as for list)")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
@handled
def backup_verify(c: Ctx, ref: str | None, dir_: str | None, as_json: bool) -> None:
    """Re-read backups and check every file against its manifest's checksum (and
    qemu-img's own check): one backup (GUEST/STAMP), a guest's (GUEST), or all. Exits 1
    when any fails, naming the backup and the file."""
    import sys
    from ..backup.repo import Repo
    res = Repo(backup_dir(c, dir_)).verify_all(ref)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for r in res["results"]:
            if r["ok"]:
                out.print(f"{r['id']}: ok", markup=False)
            for p in r["problems"]:
                err.print(f"{p}", markup=False)
        out.print(f"{len(res['results'])} backups, "
                  f"{sum(not r['ok'] for r in res['results'])} failed", markup=False)
    if not res["ok"]:
        sys.exit(1)


@backup.command("prune")
@common_options
@click.argument("names", nargs=-1)
@handled
def backup_prune(c: Ctx, names: tuple[str, ...]) -> None:
    """Apply each guest's backup.keep rules now (the supervisor also does after each
    backup). A backup a kept one is based on is merged into it first."""
    res = _call(c, "backup-prune", names=_names(c, names, not names))
    for p in res["pruned"]:
        gone = [r["removed"] for r in p["removed"]]
        out.print(f"{p['guest']}: kept {len(p['kept'])}, removed "
                  f"{', '.join(gone) if gone else 'none'}", markup=False)


# ------------------------------------------------------------------ restore

@click.command()
@common_options
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True,
              help="Every guest of the backups' inventory, each from its newest backup")
@click.option("--backup", "ref", default=None, help="Which backup (GUEST/STAMP or STAMP) "
              "[default: the newest]")
@click.option("--as", "as_", default=None, help="Restore as a new guest of this name, with "
              "its own MACs, addresses, hostname and cloud-init instance")
@click.option("--from", "from_", default=None, type=click.Path(file_okay=False),
              help="The backup directory [default: host.backup.dir, else <state>/backups]")
@click.option("-y", "--yes", is_flag=True, help="Replace existing guests' disks without "
              "asking (they are kept aside until a purge)")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
@handled
def restore(c: Ctx, name: str | None, all_: bool, ref: str | None, as_: str | None,
            from_: str | None, yes: bool, as_json: bool) -> None:
    """Bring a guest back from a backup, or (--all --from DIR on an empty state dir) the
    whole fleet: the disaster drill. Backups are verified first."""
    import os
    import sys
    from ..errors import ConflictError
    if bool(name) == all_:
        raise UsageError("restore NAME, or restore --all")
    args: dict[str, Any] = {"names": [name] if name else [], "all": all_, "yes": yes}
    for k, v in (("backup", ref), ("as", as_), ("from", os.path.abspath(from_)
                                                   if from_ else None)):
        if v is not None:
            args[k] = v
    try:
        res = _call(c, "restore", start=True, **args)
    except ConflictError as e:
        if yes or not sys.stdin.isatty() or "confirm with -y" not in (e.hint or ""):
            raise
        if not click.confirm(f"{e.message}. Go on?", err=True):
            raise
        res = _call(c, "restore", start=True, **{**args, "yes": True})
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for r in res["restored"]:
        kept = f"; replaced disks kept as {', '.join(r['aside'])}" if r.get("aside") else ""
        out.print(f"{r['name']}: restored from {r['backup']}{kept}", markup=False)
    for n in res.get("notes", []):
        out.print(f"note: {n}", markup=False)
    applied = res.get("applied")
    if applied is not None:
        for f in applied["failures"]:
            err.print(f"{f.get('target')}: {f.get('error')}", markup=False)
        out.print(f"the inventory applied is in {res['inventory']}: merge it into yours, "
                  "or the restored guests stay outside it", markup=False)
        if not applied["ok"]:
            sys.exit(1)
