"""Backups: taken (by hand or on schedule), listed, verified and pruned.

A backup of a running guest is taken by QEMU (``blockdev-backup``) into qcow2 files the
supervisor made in the backup directory (:mod:`consolidator.backup.repo`), one job per
disk, all started in one transaction with the guest's filesystems frozen through its
agent for that instant only. The first backup of a disk copies its own layer whole;
every later one copies only the clusters written since the last, as recorded by a
persistent dirty bitmap in the disk's qcow2 (named after the backup it starts from).
A disk whose bitmap is gone or was not saved (a replaced disk, a revert, a QEMU that
did not exit cleanly) gets a full copy, and the manifest says why. A stopped guest is
backed up with ``qemu-img`` (a full copy). At most one backup runs per guest (its
operation lock); the schedule takes guests one at a time.

Keeping the chain honest across crashes: the bitmap a backup starts from is left as it
is (``bitmap-mode: never``) and dropped only once the new backup is committed, so a
supervisor killed in the middle leaves the last committed backup's bitmap in place, and
the next backup is incremental from it (or full, if QEMU lost it meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import structlog

from ..backup import retention
from ..backup.repo import Backup, Repo
from ..errors import ConflictError, ConsolidatorError
from ..model import BOOT_NODE, GuestState
from ..state import write_json
from ..vm import storage
from ..vm.disk import backing_chain
from ..vm.storage import BackupJob, DiskNode
from .lifecycle import EmitFn
from .runtime import GuestRuntime, Runtime

log = structlog.get_logger("supervisor")
SCHEDULE_TICK = 30.0


class Backups:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.last: dict[str, dict[str, Any]] = {}     # guest -> its newest backup's summary
        self.failures: dict[str, str] = {}            # guest -> why its last backup failed
        self.usage: dict[str, Any] | None = None      # the backup dir's size and free space
        self._surveyed: Path | None = None            # the dir ``last`` and ``usage`` describe
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """The fleet changed: look at the schedules again now."""
        self._woken.set()

    def repo(self) -> Repo:
        fleet = self.runtime.fleet
        d = fleet.host.backup.dir if fleet and fleet.host.backup.dir else None
        return Repo(d or self.runtime.state.root / "backups")

    # ------------------------------------------------------------------ taking
    async def take(self, names: list[str], *, full: bool = False,
                   emit: EmitFn | None = None) -> dict[str, Any]:
        """Back up ``names``, one after the other; one failing does not stop the rest."""
        done, failed = [], []
        for n in names:
            g = self.runtime.get(n)
            t0 = time.monotonic()
            try:
                async with g.busy:
                    b = await self._one(g, full=full)
                done.append(b)
                if emit is not None:
                    emit({"guest": n, "phase": f"backup {b['kind']} {b['id']}",
                          "t": round(time.monotonic() - t0, 3)})
            except (ConsolidatorError, OSError) as e:    # a full backup dir, say
                msg = e.message if isinstance(e, ConsolidatorError) else \
                    f"{e.strerror or e} ({getattr(e, 'filename', None) or 'backup dir'})"
                failed.append({"name": n, "error": msg})
                self.failures[n] = msg
                if emit is not None:
                    emit({"guest": n, "phase": f"backup failed: {msg}",
                          "t": round(time.monotonic() - t0, 3)})
        return {"backups": done, "failures": failed, "dir": str(self.repo().root)}

    async def _one(self, g: GuestRuntime, *, full: bool) -> dict[str, Any]:
        repo = await asyncio.to_thread(self.repo().ensure)
        gdir = self.runtime.state.guest_dir(g.name)
        disks = storage.guest_disks(g.intent, gdir)
        if not disks or not all(d.path.exists() for d in disks):
            raise ConflictError(f"guest {g.name} has no disk to back up yet",
                                hint="a guest's disks are made when it first starts; the "
                                     "tiny image boots from RAM unless it has data disks")
        if g.state.active and not g.live:
            raise ConflictError(f"guest {g.name} is {g.state.value}: try again when it "
                                "runs or is stopped")
        parent = await asyncio.to_thread(repo.latest, g.name)
        t0 = time.time()
        s, part = await asyncio.to_thread(repo.begin, g.name, t0)
        new_bitmap = f"{storage.BITMAP_PREFIX}{s}"
        try:
            if g.live:
                modes = await self._modes_live(g, disks, parent, full)
            else:
                modes = {d.label: (None, "the guest is stopped: an offline backup is full"
                                   if parent else "the first backup of this guest")
                         for d in disks}
            manifest = await self._write(g, repo, part, disks, modes, parent, new_bitmap)
            manifest.update(started_at=round(t0, 3), seconds=round(time.time() - t0, 3),
                            instance=self.runtime.instance)
            b = await asyncio.to_thread(repo.commit, g.name, s, part, manifest)
        except BaseException:
            await asyncio.to_thread(repo.abort, part)
            raise
        # the new backup is kept: the bitmaps it started from are no longer needed
        if g.live:
            q = g.guest.qmp_client  # type: ignore[union-attr]
            for d in disks:
                with contextlib.suppress(ConsolidatorError):
                    await storage.remove_bitmaps(q, d.node, keep=new_bitmap)
        else:
            for d in disks:
                await asyncio.to_thread(storage.remove_bitmaps_offline, d.path)
                await asyncio.to_thread(storage.add_bitmap_offline, d.path, new_bitmap)
        if g.facts.get("backup_reset"):
            self.runtime.note(g, backup_reset=None)
        summary = b.summary()
        self.last[g.name] = summary
        self.failures.pop(g.name, None)
        self.runtime.event(g, "backup_done", id=b.id, backup_kind=summary["kind"],
                           seconds=summary["seconds"], bytes=summary["bytes"])
        log.info("backup.done", guest=g.name, id=b.id, kind=summary["kind"],
                 reason=summary["reason"], seconds=summary["seconds"], bytes=summary["bytes"])
        if g.intent.backup is not None:
            await self.prune_guest(g.name, g.intent.backup.keep)
        await self.refresh()
        return summary

    async def _modes_live(self, g: GuestRuntime, disks: tuple[DiskNode, ...],
                          parent: Backup | None, full: bool
                          ) -> dict[str, tuple[str | None, str | None]]:
        """Per disk: the bitmap to copy since (None: a full copy), and why it is full."""
        q = g.guest.qmp_client  # type: ignore[union-attr]
        modes: dict[str, tuple[str | None, str | None]] = {}
        for d in disks:
            have = {b["name"]: b for b in await storage.bitmaps(q, d.node)}
            # other bitmaps (of a backup never kept, or of another backup dir) stay
            # until this backup is kept: a failed backup takes nothing away
            want = parent.disks.get(d.label, {}).get("bitmap") if parent else None
            if full:
                modes[d.label] = (None, "a full backup was asked for")
            elif parent is None:
                modes[d.label] = (None, "the first backup of this guest")
            elif want is None:
                modes[d.label] = (None, f"disk {d.label} is new since {parent.stamp}")
            elif want not in have:
                modes[d.label] = (None, g.facts.get("backup_reset") or
                                  f"disk {d.label} lost its bitmap since {parent.stamp} "
                                  "(made anew, or its QEMU was killed)")
            elif have[want].get("inconsistent"):
                modes[d.label] = (None, f"disk {d.label}'s bitmap was not saved (its QEMU "
                                        "did not exit cleanly)")
            else:
                modes[d.label] = (want, None)
        return modes

    async def _write(self, g: GuestRuntime, repo: Repo, part: Path,
                     disks: tuple[DiskNode, ...],
                     modes: dict[str, tuple[str | None, str | None]], parent: Backup | None,
                     new_bitmap: str) -> dict[str, Any]:
        """Every file of the backup but its manifest, which is returned."""
        entries: dict[str, dict[str, Any]] = {}
        bases: dict[str, dict[str, Any]] = {}
        for d in disks:
            if d.node == BOOT_NODE:
                chain = await asyncio.to_thread(backing_chain, d.path)
                if len(chain) > 1:
                    bases[d.label] = await asyncio.to_thread(repo.store_base, chain[1:])
        targets = {}
        live = await storage.nodes(g.guest.qmp_client) if g.live else {}  # type: ignore[union-attr]
        for d in disks:
            since, why = modes[d.label]
            size = (live.get(d.node, {}).get("image") or {}).get("virtual-size") or \
                (await asyncio.to_thread(storage.image_info, d.path))["virtual-size"]
            targets[d.label] = await asyncio.to_thread(
                repo.new_target, part, f"{d.label}.qcow2", int(size),
                parent if since else None)
            entries[d.label] = {"file": f"{d.label}.qcow2", "virtual_size": int(size),
                                "mode": "incremental" if since else "full", "why_full": why,
                                "parent": parent.stamp if since and parent else None,
                                "bitmap": new_bitmap, "base": bases.get(d.label)}
        if g.live:
            consistency = await self._copy_live(g, disks, targets, modes, new_bitmap)
        else:
            for d in disks:
                await asyncio.to_thread(_copy_offline, d.path, targets[d.label],
                                        bases.get(d.label))
            consistency = "offline"
        gdir = self.runtime.state.guest_dir(g.name)
        for f in ("efivars.fd", "instance-id"):
            if (gdir / f).exists():
                await asyncio.to_thread(shutil.copyfile, gdir / f, part / f)
        applied = self.runtime.state.read_applied() or {}
        definition = {"name": g.name, "instance": self.runtime.instance,
                      "intent": g.intent.model_dump(mode="json"),
                      "inventory": applied.get("inventory"),
                      "inventory_path": applied.get("inventory_path"),
                      "networks": {n.network: self.runtime.networks[n.network]
                                   .model_dump(mode="json") for n in g.intent.nics
                                   if n.network in self.runtime.networks}}
        await asyncio.to_thread(write_json, part / "definition.json", definition)
        fulls = [why for since, why in modes.values() if since is None]
        kind = "full" if len(fulls) == len(modes) else \
            ("incremental" if not fulls else "mixed")
        return {"kind": kind, "reason": fulls[0] if fulls else None, "disks": entries,
                "consistency": consistency}

    async def _copy_live(self, g: GuestRuntime, disks: tuple[DiskNode, ...],
                         targets: dict[str, Path],
                         modes: dict[str, tuple[str | None, str | None]],
                         new_bitmap: str) -> str:
        guest = g.guest
        assert guest is not None
        q = guest.qmp_client
        fds = [os.open(targets[d.label], os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
               for d in disks]
        jobs = [BackupJob(d.node, fd, modes[d.label][0], new_bitmap)
                for d, fd in zip(disks, fds)]
        ids: list[str] = []
        started = False
        try:
            frozen = await guest.freeze()
            try:
                ids = await storage.start_backup(q, jobs, new_bitmap.removeprefix(
                    storage.BITMAP_PREFIX))
                started = True
            finally:
                if frozen is not None:
                    with contextlib.suppress(ConsolidatorError):
                        await guest.thaw()
            await storage.finish_backup(q, jobs, ids, ok=True)
        except BaseException:
            if not started:
                await storage.finish_backup(q, jobs, ids, ok=False)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return "crash" if frozen is None else "frozen"

    # ------------------------------------------------------------------ reading
    def newest(self) -> dict[str, dict[str, Any]]:
        """Each guest's newest backup: surveyed from the directory at the schedule's tick
        and after each backup, and at once when the directory is not the one surveyed
        (``host.backup.dir`` changed by an apply)."""
        if self._surveyed != self.repo().root:
            with contextlib.suppress(Exception):
                self._take_survey(self.repo())
        return self.last

    def figures(self) -> dict[str, Any]:
        """Plain figures for status and the metrics: each guest's newest backup, its last
        failure, and the backup directory's size and free space."""
        return {"last": {g: {"id": b["id"], "at": b["taken_at"], "kind": b["kind"]}
                         for g, b in self.newest().items()},
                "failures": dict(self.failures), "usage": self.usage}

    def _take_survey(self, repo: Repo) -> None:
        usage, newest = repo.survey() if repo.root.exists() else (None, {})
        self.usage, self.last, self._surveyed = usage, newest, repo.root

    async def refresh(self) -> None:
        """Read the directory again: backups copied in, pruned or merged are seen."""
        await asyncio.to_thread(self._take_survey, self.repo())

    # ------------------------------------------------------------------ pruning
    async def prune_guest(self, name: str, keep: Any) -> dict[str, Any]:
        repo = self.repo()
        backups = [b for b in await asyncio.to_thread(repo.backups, name) if b.manifest]
        rules = retention.Keep(keep.last, keep.daily, keep.weekly)
        decision = retention.select([(b.stamp, b.taken_at) for b in backups], rules)
        removed = []
        for b in backups:                               # oldest first
            if b.stamp in decision.remove:
                removed.append(await asyncio.to_thread(repo.remove, b))
        if removed:
            log.info("backup.pruned", guest=name, removed=[r["removed"] for r in removed])
        return {"guest": name, "kept": [f"{name}/{s}" for s in decision.keep],
                "removed": removed, "why": decision.why}

    async def prune(self, names: list[str]) -> dict[str, Any]:
        out = []
        for n in names:
            g = self.runtime.get(n)
            if g.intent.backup is None:
                continue
            async with g.busy:
                out.append(await self.prune_guest(n, g.intent.backup.keep))
        return {"pruned": out}

    # ------------------------------------------------------------------ schedule
    async def run_schedule(self, stopping: asyncio.Event) -> None:
        """Back up each guest whose ``backup.every`` has passed, one at a time."""
        await asyncio.to_thread(self.repo().repair)
        while not stopping.is_set():
            with contextlib.suppress(OSError):
                await self.refresh()
            for name, g in list(self.runtime.guests.items()):
                policy = g.intent.backup
                if policy is None or policy.every is None or g.busy.locked():
                    continue
                last = self.newest().get(name)
                if not retention.due(last["taken_at"] if last else None, policy.every,
                                     time.time()):
                    continue
                if g.state not in (GuestState.RUNNING, GuestState.STOPPED,
                                   GuestState.DEFINED):
                    continue
                try:
                    async with g.busy:
                        await self._one(g, full=False)
                except (ConsolidatorError, OSError) as e:
                    msg = e.message if isinstance(e, ConsolidatorError) else str(e)
                    self.failures[name] = msg
                    log.warning("backup.failed", guest=name, error=msg)
                    self.runtime.event(g, "backup_failed", error=msg[:300])
                if stopping.is_set():
                    return
            self._woken.clear()
            waits = [asyncio.ensure_future(stopping.wait()),
                     asyncio.ensure_future(self._woken.wait())]
            try:
                await asyncio.wait(waits, timeout=self._next_due(time.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _next_due(self, now: float) -> float:
        """Seconds until the next guest is due (at least 1, at most SCHEDULE_TICK: a
        schedule an apply adds is seen within that)."""
        wait = SCHEDULE_TICK
        for name, g in self.runtime.guests.items():
            every = g.intent.backup.every if g.intent.backup is not None else None
            if every is None:
                continue
            last = self.newest().get(name)
            wait = min(wait, (last["taken_at"] + every - now) if last else 0.0)
        return max(1.0, wait)


def _copy_offline(disk: Path, target: Path, base: dict[str, Any] | None) -> None:
    """A stopped guest's disk, its own layer only, into ``target`` (made anew here)."""
    from ..inventory.files import qemu_img
    target.unlink()
    if base:
        qemu_img("convert", "-f", "qcow2", "-O", "qcow2", "-B", base["path"], "-F",
                 base["format"], str(disk), str(target), timeout=3600)
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", "", str(target))
    else:
        qemu_img("convert", "-f", "qcow2", "-O", "qcow2", str(disk), str(target),
                 timeout=3600)
