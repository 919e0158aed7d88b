"""Snapshots: taken, listed, reverted and removed, for one guest or the fleet at once.

A snapshot is internal to each qcow2 disk of a guest (:mod:`consolidator.vm.storage`)
and recorded in ``snapshots.json`` beside them, with what makes it trustworthy:

- ``memory``: RAM and device state too (``--memory``); a revert resumes the guest where
  it was. For the fleet, every guest is paused first and resumed last, so all of them
  hold the same instant.
- ``frozen``: the guest's agent froze its filesystems around the snapshot (what is on
  disk is what its applications last flushed).
- ``crash``: no agent answered: what a power cut at that instant would leave.
- ``offline``: the guest was not running.

``--all`` (or several names) freezes every guest, snapshots every guest, then thaws
them all, so an application tier and its database are captured at one instant; the
thaw runs whatever failed in between, and the window (first freeze to last thaw) is
reported. A revert drops the disks' dirty bitmaps (QEMU cannot apply a snapshot under
them), so the next backup of that guest is full, and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import structlog

from ..errors import ConflictError, UsageError
from ..model import GuestState
from ..vm import storage
from ..vm.storage import DiskNode
from .lifecycle import EmitFn, Lifecycle
from .runtime import GuestRuntime, Runtime

log = structlog.get_logger("supervisor")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
S = GuestState


def check_tag(tag: str) -> str:
    if not TAG.fullmatch(tag) or tag.isdigit():
        raise UsageError(f"snapshot tag {tag!r}: letters, digits, '.', '_' and '-', up to "
                         "63, not all digits (QEMU reads a number as a snapshot id)")
    return tag


def default_tag(now: float) -> str:
    return time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime(now))


class Snapshots:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.frozen: dict[str, int | None] = {}     # filesystems the last freeze froze

    # ------------------------------------------------------------------ helpers
    def _disks(self, g: GuestRuntime) -> tuple[DiskNode, ...]:
        disks = storage.guest_disks(g.intent, self.runtime.state.guest_dir(g.name))
        if not disks:
            raise ConflictError(f"guest {g.name} has no disk to snapshot",
                                hint="the tiny image boots from RAM: give it a data disk")
        return disks

    def _vars(self, g: GuestRuntime) -> Path | None:
        p = self.runtime.state.guest_dir(g.name) / "efivars.fd"
        return p if g.intent.firmware == "uefi" and p.exists() else None

    def _record(self, g: GuestRuntime, entry: dict[str, Any]) -> None:
        st = self.runtime.state
        snaps = [s for s in st.read_snapshots(g.name) if s["tag"] != entry["tag"]]
        st.write_snapshots(g.name, snaps + [entry])

    # ------------------------------------------------------------------ create
    async def create(self, names: list[str], *, memory: bool, tag: str | None,
                     emit: EmitFn | None = None) -> dict[str, Any]:
        """Snapshot ``names`` at one instant (see the module's doc)."""
        if not names:
            raise UsageError("snapshot create: name a guest, or --all")
        guests = [self.runtime.get(n) for n in names]
        tag = check_tag(tag or default_tag(time.time()))
        plan: list[tuple[GuestRuntime, tuple[DiskNode, ...], bool]] = []
        for g in guests:
            disks = self._disks(g)
            if any(s["tag"] == tag for s in self.runtime.state.read_snapshots(g.name)):
                raise ConflictError(f"guest {g.name} already has a snapshot {tag!r}",
                                    hint="choose another --tag, or snapshot rm it first")
            live = g.live
            if g.state.active and not live:
                raise ConflictError(f"guest {g.name} is {g.state.value}: wait until it runs "
                                    "or is stopped")
            if live:
                assert g.guest is not None
                await storage.check_snapshottable(g.guest.qmp_client, disks)
            else:
                for d in disks:
                    await asyncio.to_thread(_check_offline, g.name, d)
            plan.append((g, disks, live))
        live = [(g, d) for g, d, is_live in plan if is_live]
        offline = [(g, d) for g, d, is_live in plan if not is_live]
        t0 = time.time()
        kinds: dict[str, str] = {}
        if memory:
            window = await self._memory_instant(live, tag, kinds)
        else:
            window = await self._frozen_instant(live, tag, kinds)
        for g, disks in offline:
            for d in disks:
                await asyncio.to_thread(storage.snapshot_offline, d.path, "create", tag)
            kinds[g.name] = "offline"
        out = []
        for g, disks, _ in plan:
            vars_ = self._vars(g)
            if vars_ is not None:
                await asyncio.to_thread(_copy, vars_, vars_.with_name(f"efivars.{tag}.fd"))
            entry = {"tag": tag, "taken_at": round(t0, 3), "kind": kinds[g.name],
                     "memory": kinds[g.name] == "memory",
                     "disks": [d.label for d in disks], "group": len(plan) > 1,
                     "efivars": vars_ is not None, "window_ms": window.get(g.name),
                     "filesystems_frozen": self.frozen.pop(g.name, None)}
            self._record(g, entry)
            self.runtime.event(g, "snapshot_created", tag=tag, consistency=entry["kind"])
            out.append({"name": g.name, **entry})
            if emit is not None:
                emit({"guest": g.name, "phase": f"snapshot {entry['kind']}",
                      "t": round(time.time() - t0, 3)})
        total = window.get("*")
        log.info("snapshot.created", tag=tag, guests=[g.name for g, _, _ in plan],
                 window_ms=total)
        return {"tag": tag, "guests": out, "window_ms": total}

    async def _frozen_instant(self, live: list[tuple[GuestRuntime, tuple[DiskNode, ...]]],
                              tag: str, kinds: dict[str, str]) -> dict[str, float]:
        """Freeze all, snapshot all, thaw all (the thaw whatever happens between)."""
        if not live:
            return {}
        t0 = time.monotonic()
        frozen = await asyncio.gather(*(g.guest.freeze() for g, _ in live))  # type: ignore[union-attr]
        t1 = time.monotonic()
        try:
            await asyncio.gather(*(storage.snapshot_disks(g.guest.qmp_client, d, tag)  # type: ignore[union-attr]
                                   for g, d in live))
        finally:
            thawed = await asyncio.gather(*(g.guest.thaw() for (g, _), n in zip(live, frozen)  # type: ignore[union-attr]
                                            if n is not None), return_exceptions=True)
            t2 = time.monotonic()
            for e in thawed:
                if isinstance(e, BaseException):
                    log.error("snapshot.thaw_failed", error=str(e)[:300])
        for (g, _), n in zip(live, frozen):
            kinds[g.name] = "crash" if n is None else "frozen"
            self.frozen[g.name] = n
        window = round((t2 - t0) * 1000, 1)
        log.info("snapshot.freeze_window", ms=window, freeze_ms=round((t1 - t0) * 1000, 1),
                 frozen=sum(n is not None for n in frozen), guests=len(live))
        return {**{g.name: window for g, _ in live}, "*": window}

    async def _memory_instant(self, live: list[tuple[GuestRuntime, tuple[DiskNode, ...]]],
                              tag: str, kinds: dict[str, str]) -> dict[str, float]:
        """Pause all, save each (RAM, devices, disks), resume all."""
        if not live:
            return {}
        qmps = [g.guest.qmp_client for g, _ in live]  # type: ignore[union-attr]
        t0 = time.monotonic()
        await asyncio.gather(*(q.execute("stop") for q in qmps))
        try:                               # each QEMU writes its own RAM: all at once
            saved = await asyncio.gather(*(storage.save_vm(q, disks, tag)
                                           for (_, disks), q in zip(live, qmps)),
                                         return_exceptions=True)
            for (g, _), r in zip(live, saved):
                if isinstance(r, BaseException):
                    raise r
                kinds[g.name] = "memory"
        finally:
            await asyncio.gather(*(q.execute("cont") for q in qmps), return_exceptions=True)
        window = round((time.monotonic() - t0) * 1000, 1)
        return {**{g.name: window for g, _ in live}, "*": window}

    # ------------------------------------------------------------------ list
    async def list(self, name: str | None) -> list[dict[str, Any]]:
        """Every recorded snapshot, checked against the disks: one a disk lost (or that a
        disk holds unrecorded) says so."""
        names = [name] if name else sorted(self.runtime.guests)
        out = []
        for n in names:
            g = self.runtime.get(n)
            disks = storage.guest_disks(g.intent, self.runtime.state.guest_dir(n))
            held: dict[str, dict[str, Any]] = {}
            for d in disks:
                if d.path.exists():
                    for s in await asyncio.to_thread(storage.snapshots_of, d.path):
                        held.setdefault(s["name"], {"vm_state_size": 0, "disks": []})
                        held[s["name"]]["disks"].append(d.label)
                        held[s["name"]]["vm_state_size"] += int(s.get("vm-state-size", 0))
            recorded = {s["tag"]: s for s in self.runtime.state.read_snapshots(n)}
            for tag in sorted(set(recorded) | set(held),
                              key=lambda t: recorded.get(t, {}).get("taken_at", 0)):
                r = recorded.get(tag, {"tag": tag, "kind": "unknown", "memory": False,
                                       "disks": held[tag]["disks"]})
                h = held.get(tag, {"disks": [], "vm_state_size": 0})
                missing = sorted(set(r["disks"]) - set(h["disks"]))
                out.append({"name": n, **r, "vm_state_size": h["vm_state_size"],
                            "missing_on": missing})
        return out

    # ------------------------------------------------------------------ revert
    async def revert(self, name: str, tag: str, emit: EmitFn | None = None) -> dict[str, Any]:
        g = self.runtime.get(name)
        snap = next((s for s in self.runtime.state.read_snapshots(name) if s["tag"] == tag),
                    None)
        if snap is None:
            raise UsageError(f"guest {name} has no snapshot {tag!r}",
                             hint=f"consolidator snapshot list {name}")
        disks = self._disks(g)
        t0 = time.monotonic()
        was = g.state
        if snap["memory"] and was is S.RUNNING and g.live:
            assert g.guest is not None
            q = g.guest.qmp_client
            for d in disks:
                await storage.remove_bitmaps(q, d.node)
            await storage.load_vm(q, disks, tag)
            if (await q.status()) != "running":
                await q.execute("cont")
            how = "loaded in place"
        else:
            if g.state.active:
                await self.lifecycle.stop(g, reason=f"revert to {tag}")
            for d in disks:
                await asyncio.to_thread(storage.remove_bitmaps_offline, d.path)
                await asyncio.to_thread(storage.snapshot_offline, d.path, "apply", tag)
            vars_ = self._vars(g)
            saved = vars_.with_name(f"efivars.{tag}.fd") if vars_ else None
            if saved is not None and saved.exists():
                await asyncio.to_thread(_copy, saved, vars_)   # type: ignore[arg-type]
            how = "applied to its disks"
            if snap["memory"] or was is S.RUNNING:
                g.restarts.clear()
                await self.lifecycle.start(g, emit)
                if snap["memory"]:
                    assert g.guest is not None
                    q = g.guest.qmp_client
                    await storage.load_vm(q, disks, tag)
                    if (await q.status()) != "running":
                        await q.execute("cont")
                    how = "loaded into a new QEMU"
        self.runtime.note(g, backup_reset=f"reverted to snapshot {tag} at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}")
        self.runtime.event(g, "snapshot_reverted", tag=tag, how=how)
        return {"name": name, "tag": tag, "how": how, "state": g.state.value,
                "seconds": round(time.monotonic() - t0, 3)}

    # ------------------------------------------------------------------ remove
    async def remove(self, name: str, tag: str) -> dict[str, Any]:
        g = self.runtime.get(name)
        st = self.runtime.state
        snaps = st.read_snapshots(name)
        disks = storage.guest_disks(g.intent, st.guest_dir(name))
        held = [d for d in disks if d.path.exists() and
                any(s["name"] == tag for s in await asyncio.to_thread(storage.snapshots_of,
                                                                      d.path))]
        if not held and not any(s["tag"] == tag for s in snaps):
            raise UsageError(f"guest {name} has no snapshot {tag!r}")
        if held:
            if g.live:
                assert g.guest is not None
                await storage.delete_snapshot(g.guest.qmp_client, tuple(held), tag)
            elif g.state.active:
                raise ConflictError(f"guest {name} is {g.state.value}: try again when it "
                                    "runs or is stopped")
            else:
                for d in held:
                    await asyncio.to_thread(storage.snapshot_offline, d.path, "delete", tag)
        with contextlib.suppress(FileNotFoundError):
            (st.guest_dir(name) / f"efivars.{tag}.fd").unlink()
        st.write_snapshots(name, [s for s in snaps if s["tag"] != tag])
        self.runtime.event(g, "snapshot_removed", tag=tag)
        return {"name": name, "tag": tag, "removed_from": [d.label for d in held]}


def _check_offline(name: str, d: DiskNode) -> None:
    if not d.path.exists():
        raise ConflictError(f"guest {name}: disk {d.label} does not exist yet",
                            hint="start the guest once; its disks are made then")
    fmt = storage.image_info(d.path).get("format")
    if fmt != "qcow2":
        raise ConflictError(f"guest {name}: disk {d.label} is {fmt}: internal snapshots "
                            "need qcow2")


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    st = os.stat(src)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, 0o600)
    os.replace(tmp, dst)

