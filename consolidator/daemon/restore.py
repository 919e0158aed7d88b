"""Restores: a guest from one of its backups, in place or as a new guest, and the whole
fleet on a host whose state dir is empty (the disaster drill).

Every backup restored is verified first; one that fails is refused with the reason, and
the operator names another (``--backup ID``). Its disks are written into the guest's
dir (flattened through the backups they are based on, on the image's base for a boot
disk), then the guest starts through the ordinary paths: an in-place restore stops the
guest, puts its disks aside (``*.replaced-<stamp>.*``, kept until a purge) and starts it
again; a guest the fleet in force does not have is added to it through an apply of the
inventory :func:`consolidator.backup.compose.compose` makes, which is also written to
``<state>/restored/`` for the operator to adopt. A restored disk has no dirty bitmap,
so the next backup of it is full (and says it was restored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from ..backup.compose import compose
from ..backup.repo import Backup, Repo, stamp
from ..errors import ConflictError, ImageError, UsageError
from ..hostfacts import HostFacts
from ..model import Fleet, GuestIntent, parse_fleet
from ..plan import plan as make_plan
from ..state import atomic_write
from ..units import DNS_LABEL_RE
from ..vm.disk import own
from .applier import Applier
from .backups import Backups
from .lifecycle import EmitFn, Lifecycle
from .runtime import Runtime

log = structlog.get_logger("supervisor")


class Restorer:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle, applier: Applier,
                 backups: Backups, after_apply: Callable[[], None]) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.applier = applier
        self.backups = backups
        self.after_apply = after_apply

    def _repo(self, from_dir: str | None) -> Repo:
        if from_dir is not None and not os.path.isabs(from_dir):
            raise UsageError("restore --from: the backup directory must be an absolute path")
        repo = Repo(from_dir) if from_dir else self.backups.repo()
        repo.check_format()
        return repo

    def _checked(self, repo: Repo, b: Backup) -> Backup:
        problems = repo.verify(b)
        if problems:
            raise ConflictError(f"backup {b.id} does not verify: " + "; ".join(problems[:3]),
                                hint=f"restore another: --backup ID (consolidator backup "
                                     f"list {b.guest})")
        return b

    # ------------------------------------------------------------------ one guest
    async def one(self, name: str, *, ref: str | None, as_: str | None,
                  from_dir: str | None, yes: bool, emit: EmitFn) -> dict[str, Any]:
        repo = self._repo(from_dir)
        b = await asyncio.to_thread(repo.find, ref, name) if ref else \
            await asyncio.to_thread(repo.latest, name)
        if b is None:
            raise UsageError(f"no backup of {name} in {repo.root}")
        if as_ is not None and not DNS_LABEL_RE.match(as_):
            raise UsageError(f"--as {as_!r}: a guest name is a DNS label")
        await asyncio.to_thread(self._checked, repo, b)
        target = as_ or name
        definition = await asyncio.to_thread(b.definition)
        t0 = time.monotonic()
        if target in self.runtime.guests:
            if not yes:
                raise ConflictError(f"guest {target} exists: restoring replaces its disks "
                                    "(they are kept aside until a purge)",
                                    hint="confirm with -y")
            g = self.runtime.get(target)
            async with g.busy:
                was = g.state
                if g.state.active:
                    await self.lifecycle.stop(g, reason=f"restore from {b.id}")
                aside = await asyncio.to_thread(self._place, repo, b, g.intent, keep_id=not as_)
                self.runtime.note(g, backup_reset=f"restored from backup {b.id}")
                self.runtime.event(g, "restored", backup=b.id, aside=aside)
                if was.active or g.intent.autostart:
                    g.restarts.clear()
                    await self.lifecycle.start(g, emit)
            return {"restored": [{"name": target, "backup": b.id, "aside": aside,
                                  "state": g.state.value}], "applied": None, "notes": [],
                    "seconds": round(time.monotonic() - t0, 2)}
        applied = self.runtime.state.read_applied()
        current = applied.get("inventory") if applied and applied.get("fleet") else None
        src_path = definition.get("inventory_path")
        text, notes = compose(current, definition.get("inventory") or "", name, target,
                              backup_dir=os.path.dirname(src_path) if src_path else None,
                              fresh_identity=as_ is not None)
        if current is not None and definition.get("instance") != self.runtime.instance:
            notes.append(f"from instance {definition.get('instance')} into "
                         f"{self.runtime.instance}: its derived MACs and names follow this "
                         "instance")
        path = (applied or {}).get("inventory_path") or src_path or \
            str(self.runtime.state.root / "restored" / "inventory.yaml")
        desired = await asyncio.to_thread(self._fleet, text, path)
        await asyncio.to_thread(self._place, repo, b, desired.guests[target],
                                keep_id=as_ is None)
        result = await self._apply(desired, text, path, emit)
        return {"restored": [{"name": target, "backup": b.id, "aside": []}],
                "applied": result, "notes": notes, "inventory": self._keep(text),
                "seconds": round(time.monotonic() - t0, 2)}

    # ------------------------------------------------------------------ the fleet
    async def fleet(self, *, from_dir: str | None, yes: bool, emit: EmitFn) -> dict[str, Any]:
        """Every guest the newest backups' inventory declares, from its newest backup
        (a guest without one is made anew, as apply makes it)."""
        repo = self._repo(from_dir)
        latest = {g: b for g in await asyncio.to_thread(repo.guests)
                  if (b := await asyncio.to_thread(repo.latest, g)) is not None}
        if not latest:
            raise UsageError(f"no backups in {repo.root}")
        bad = []
        for b in latest.values():
            problems = await asyncio.to_thread(repo.verify, b)
            if problems:
                bad.append(f"{b.id}: {problems[0]}")
        if bad:
            raise ConflictError("some backups do not verify: " + "; ".join(bad),
                                hint="restore those guests one by one with --backup ID, "
                                     "then the rest")
        newest = max(latest.values(), key=lambda b: b.taken_at)
        definition = await asyncio.to_thread(newest.definition)
        instance = definition.get("instance")
        if self.runtime.fleet is not None and self.runtime.instance != instance:
            raise ConflictError(f"this state dir runs instance {self.runtime.instance}; the "
                                f"backups are of instance {instance}",
                                hint="restore --all needs an empty state dir (or one of the "
                                     "same instance); restore guests one by one to bring "
                                     "them into this instance")
        text = definition.get("inventory") or ""
        path = definition.get("inventory_path") or \
            str(self.runtime.state.root / "restored" / "inventory.yaml")
        desired = await asyncio.to_thread(self._fleet, text, path)
        replacing = [n for n in desired.guests if n in self.runtime.guests and n in latest]
        if replacing and not yes:
            raise ConflictError(f"guests {', '.join(replacing)} exist: restoring replaces "
                                "their disks (kept aside until a purge)",
                                hint="confirm with -y")
        t0 = time.monotonic()
        restored = []
        for name, intent in desired.guests.items():
            b = latest.get(name)
            if b is None:
                continue
            aside: list[str] = []
            g = self.runtime.guests.get(name)
            if g is not None:
                async with g.busy:
                    if g.state.active:
                        await self.lifecycle.stop(g, reason=f"restore from {b.id}")
                    aside = await asyncio.to_thread(self._place, repo, b, intent, keep_id=True)
                    self.runtime.note(g, backup_reset=f"restored from backup {b.id}")
            else:
                aside = await asyncio.to_thread(self._place, repo, b, intent, keep_id=True)
            restored.append({"name": name, "backup": b.id, "aside": aside})
            emit({"guest": name, "phase": f"disks from {b.id}",
                  "t": round(time.monotonic() - t0, 3)})
        skipped = sorted(set(latest) - set(desired.guests))
        result = await self._apply(desired, text, path, emit)
        notes = [f"{n}: not in the inventory of {newest.id}: restore it by name"
                 for n in skipped]
        return {"restored": restored, "applied": result, "notes": notes,
                "inventory": self._keep(text), "seconds": round(time.monotonic() - t0, 2)}

    # ------------------------------------------------------------------ parts
    def _fleet(self, text: str, path: str) -> Fleet:
        return parse_fleet(text, path, HostFacts.probe(), base_dir=Path(path).parent,
                           state_dir=self.runtime.state.root)

    async def _apply(self, desired: Fleet, text: str, path: str,
                     emit: EmitFn) -> dict[str, Any]:
        p = make_plan(desired, self.runtime.observed(), prune=False, purge=False,
                      allow_restart=False)
        result = await self.applier.apply(desired, text, p, purge=False, emit=emit,
                                          inventory_path=path)
        self.after_apply()
        return {k: result[k] for k in ("ok", "failures", "actions")}

    def _keep(self, text: str) -> str:
        """The inventory applied, for the operator to adopt (their file is not touched)."""
        dest = self.runtime.state.root / "restored" / f"inventory-{stamp(time.time())}.yaml"
        atomic_write(dest, text, 0o600)
        return str(dest)

    def _place(self, repo: Repo, b: Backup, intent: GuestIntent, *, keep_id: bool) -> list[str]:
        """Write backup ``b``'s disks as ``intent``'s guest's; what was there is put aside."""
        gdir = self.runtime.state.guest_dir(intent.name)
        gdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(gdir, 0o700)
        base = self._base(repo, b, intent)
        mark = stamp(time.time())
        aside = []
        for label, d in b.disks.items():
            dest = gdir / d["file"]
            if dest.exists():
                moved = dest.with_name(f"{dest.stem}.replaced-{mark}{dest.suffix}")
                os.replace(dest, moved)
                aside.append(str(moved))
            repo.materialize(b, label, dest, base if d.get("base") else None)
        for f in ("efivars.fd",) + (("instance-id",) if keep_id else ()):
            if (b.dir / f).exists():
                if (gdir / f).exists() and f == "efivars.fd":
                    moved = gdir / f"efivars.replaced-{mark}.fd"
                    os.replace(gdir / f, moved)
                    aside.append(str(moved))
                shutil.copyfile(b.dir / f, gdir / f)
                os.chmod(gdir / f, 0o600)
        if not keep_id:
            (gdir / "instance-id").unlink(missing_ok=True)
        for p in gdir.iterdir():          # root's until the launch gives them to the guest
            if p.suffix in (".qcow2", ".fd") and "replaced-" not in p.name:
                own(p, 0, 0)
        log.info("restore.placed", guest=intent.name, backup=b.id, aside=aside)
        return aside

    def _base(self, repo: Repo, b: Backup, intent: GuestIntent) -> Path | None:
        """The image a restored boot disk goes on: the intent's, holding what the backup's
        base held; put back from the backup when it is missing from the image cache."""
        d = b.disks.get("disk")
        if not d or not d.get("base"):
            return None
        if not intent.image_spec.disk:
            raise UsageError(f"{b.id}: its boot disk is an overlay, but guest "
                             f"{intent.name}'s image has no disk")
        want = d["base"]
        path = Path(intent.image_spec.disk)
        if not path.exists():
            cache = self.runtime.state.images_dir.resolve()
            if not str(path.resolve()).startswith(str(cache) + os.sep):
                raise ImageError(f"{b.id}: its base image {path} is missing",
                                 hint=f"put the image there, or copy "
                                      f"{repo.root / want['file']} (a qcow2 of it)")
            path.parent.mkdir(parents=True, exist_ok=True)
            from ..inventory.files import qemu_img
            qemu_img("convert", "-O", want["format"], str(repo.root / want["file"]),
                     str(path), timeout=3600)
        elif not repo.same_base(want, path):
            raise ImageError(f"{b.id}: the image at {path} is not the one the backup was "
                             "taken on (its checksum differs): the restored disk would be "
                             "corrupt on it", hint=f"the backup holds that image: "
                                                   f"{repo.root / want['file']}")
        return path
