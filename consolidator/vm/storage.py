"""A guest's disks as QEMU holds them: internal snapshots, dirty bitmaps, backup jobs.

Live operations go through QMP on the nodes :mod:`consolidator.vm.qemu` names (the
overlay ``disk0``, each data disk ``data-<name>``); the same operations on a stopped
guest go through ``qemu-img`` on its files. What QEMU 7.2 does, measured here:

- ``blockdev-snapshot-internal-sync`` in one ``transaction`` snapshots every disk of a
  guest at one instant, without pausing it (a disk-only snapshot).
- ``snapshot-save`` (a job) writes RAM and device state into one qcow2 node and
  snapshots the listed nodes; ``snapshot-load`` puts it all back. Both pause the guest
  for their duration. A raw node (the UEFI variable store) cannot hold a snapshot: the
  caller keeps a copy of that file beside the snapshot.
- A snapshot cannot be applied (live or offline) while the disk has a dirty bitmap:
  a revert therefore drops the bitmaps first, and the next backup is full.
- A backup target reaches QEMU as a descriptor (``add-fd``), never by path: QEMU runs
  jailed and opens nothing. The target is a qcow2 the caller made, added with
  ``backing: null`` so QEMU writes it without reading what it is based on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConflictError, QMPError
from ..inventory.files import qemu_img
from ..model import GuestIntent
from . import throttle
from .qmp import QMP

BACKUP_FDSET = 70
BITMAP_PREFIX = "consolidator-"


@dataclass(frozen=True)
class DiskNode:
    """One disk of a guest: its QEMU node, its file, and its name in manifests."""

    node: str                  # disk0, data-<name>
    path: Path
    label: str                 # "disk", or "data-<name>"


def guest_disks(intent: GuestIntent, guest_dir: Path) -> tuple[DiskNode, ...]:
    """Pure: the writable qcow2 disks of a guest (its overlay first), as launched."""
    return tuple(DiskNode(d.node, guest_dir / d.file, d.label) for d in intent.drives())




# ------------------------------------------------------------------------ offline
def image_info(path: Path) -> dict[str, Any]:
    """qemu-img's view of one file (``-U``: also while QEMU holds it)."""
    return json.loads(qemu_img("info", "--output=json", "-U", str(path)))


def snapshots_of(path: Path) -> list[dict[str, Any]]:
    return list(image_info(path).get("snapshots") or [])


def bitmaps_of(path: Path) -> list[str]:
    spec = image_info(path).get("format-specific", {}).get("data", {})
    return [str(b["name"]) for b in spec.get("bitmaps") or []]


def snapshot_offline(path: Path, op: str, tag: str) -> None:
    """``op``: create (-c), apply (-a) or delete (-d) the internal snapshot ``tag``."""
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}[op]
    qemu_img("snapshot", flag, tag, str(path))


def remove_bitmaps_offline(path: Path, keep: str | None = None) -> list[str]:
    gone = [b for b in bitmaps_of(path) if b != keep]
    for b in gone:
        qemu_img("bitmap", "--remove", str(path), b)
    return gone


def add_bitmap_offline(path: Path, name: str) -> None:
    qemu_img("bitmap", "--add", "--enable", str(path), name)


# ------------------------------------------------------------------------- live
async def run_job(qmp: QMP, command: str, args: dict[str, Any], job_id: str, *,
                  timeout: float) -> None:
    """Start a job and wait for it to conclude (:func:`wait_job`)."""
    await qmp.execute(command, {"job-id": job_id, **args}, timeout=30.0)
    await wait_job(qmp, job_id, command, timeout=timeout)


async def wait_job(qmp: QMP, job_id: str, command: str, *, timeout: float) -> None:
    """Wait for a job to conclude; its error is a QMPError. The job is dismissed either
    way (and cancelled first when the wait times out)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    try:
        while True:
            job = next((j for j in await qmp.execute("query-jobs") if j["id"] == job_id),
                       None)
            if job is None:
                raise QMPError(f"{qmp.name}: job {job_id} vanished", error_class="JobLost")
            if job["status"] == "concluded":
                if job.get("error"):
                    raise QMPError(f"{qmp.name}: {command}: {job['error']}",
                                   error_class="JobFailed", command=command)
                return
            if loop.time() > deadline:
                with contextlib.suppress(QMPError):
                    await qmp.execute("job-cancel", {"id": job_id})
                raise QMPError(f"{qmp.name}: {command} did not finish in {timeout:g}s",
                               error_class="Timeout", command=command)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
    finally:
        for _ in range(50):
            try:
                await qmp.execute("job-dismiss", {"id": job_id})
                break
            except QMPError as e:
                if "not found" in str(e).lower() or e.error_class == "Disconnected":
                    break
                await asyncio.sleep(0.05)      # cancelled, not yet concluded


async def nodes(qmp: QMP) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes",
                                                           {"flat": True})}


async def check_snapshottable(qmp: QMP, disks: tuple[DiskNode, ...]) -> None:
    """Internal snapshots live in qcow2: refuse any other format, naming the disk."""
    have = await nodes(qmp)
    for d in disks:
        n = have.get(d.node)
        if n is None:
            raise ConflictError(f"{qmp.name}: disk {d.label} is not attached (node {d.node})")
        if n.get("drv") != "qcow2":
            raise ConflictError(f"{qmp.name}: disk {d.label} is {n.get('drv')}: internal "
                                "snapshots need qcow2")


def root_node(node: str, have: dict[str, Any]) -> str:
    """The node a disk's device is attached to: the top of its throttle filters
    (vm/throttle.py), or the format node itself for a guest started without them."""
    top = throttle.top_node(node)
    return top if top in have else node


async def snapshot_disks(qmp: QMP, disks: tuple[DiskNode, ...], tag: str) -> None:
    """Every disk at one instant, the guest running on. QEMU takes an internal snapshot
    only through the root node; the filters above the qcow2 pass it down."""
    have = await nodes(qmp)
    await qmp.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync",
         "data": {"device": root_node(d.node, have), "name": tag}}
        for d in disks]}, timeout=60.0)


async def save_vm(qmp: QMP, disks: tuple[DiskNode, ...], tag: str, *,
                  timeout: float = 600.0) -> None:
    """RAM and device state into the first disk, with every disk, in one snapshot."""
    names = [d.node for d in disks]
    await run_job(qmp, "snapshot-save", {"tag": tag, "vmstate": names[0], "devices": names},
                  f"save-{tag}", timeout=timeout)


async def load_vm(qmp: QMP, disks: tuple[DiskNode, ...], tag: str, *,
                  timeout: float = 600.0) -> None:
    names = [d.node for d in disks]
    await run_job(qmp, "snapshot-load", {"tag": tag, "vmstate": names[0], "devices": names},
                  f"load-{tag}", timeout=timeout)


async def delete_snapshot(qmp: QMP, disks: tuple[DiskNode, ...], tag: str) -> None:
    await run_job(qmp, "snapshot-delete", {"tag": tag, "devices": [d.node for d in disks]},
                  f"delete-{tag}", timeout=300.0)


async def bitmaps(qmp: QMP, node: str) -> list[dict[str, Any]]:
    """The dirty bitmaps QEMU holds on ``node`` (name, persistent, inconsistent...)."""
    return list((await nodes(qmp)).get(node, {}).get("dirty-bitmaps") or [])


async def remove_bitmaps(qmp: QMP, node: str, keep: str | None = None) -> list[str]:
    gone = []
    for b in await bitmaps(qmp, node):
        if b["name"] != keep:
            await qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": b["name"]})
            gone.append(b["name"])
    return gone


@dataclass(frozen=True)
class BackupJob:
    node: str
    target_fd: int                 # a qcow2 the caller made, open read-write
    since: str | None              # the bitmap of the last backup; None: a full copy
    new_bitmap: str                # starts recording at this backup's instant


async def start_backup(qmp: QMP, jobs: list[BackupJob], tag: str) -> list[str]:
    """Attach each target (by fd) and start every disk's backup job in one transaction:
    one instant for all of a guest's disks. With ``since``, the job copies the clusters
    written since that bitmap was made; else every cluster of the node's own layer.
    In the same transaction a persistent bitmap starts recording for each disk, so the
    next backup starts exactly where this one did; ``since`` stays as it was
    (``bitmap-mode: never``) until the caller drops it, once the backup is kept.
    Returns the job ids, for :func:`finish_backup` (call it whatever happens)."""
    await clear_stale(qmp)
    actions: list[dict[str, Any]] = []
    ids = []
    for i, j in enumerate(jobs):
        fdset, target = BACKUP_FDSET + i, f"bk-{j.node}"
        await qmp.send_fd(j.target_fd, fdset)
        await qmp.execute("blockdev-add", {"driver": "file", "node-name": f"{target}-file",
                                           "filename": f"/dev/fdset/{fdset}"})
        await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": target,
                                           "file": f"{target}-file", "backing": None})
        job: dict[str, Any] = {"job-id": f"backup-{tag}-{i}", "device": j.node,
                               "target": target, "auto-dismiss": False}
        if j.since:
            job.update({"sync": "bitmap", "bitmap": j.since, "bitmap-mode": "never"})
        else:
            job["sync"] = "top"
        actions += [{"type": "block-dirty-bitmap-add",
                     "data": {"node": j.node, "name": j.new_bitmap, "persistent": True}},
                    {"type": "blockdev-backup", "data": job}]
        ids.append(job["job-id"])
    await qmp.execute("transaction", {"actions": actions}, timeout=30.0)
    return ids


async def finish_backup(qmp: QMP, jobs: list[BackupJob], ids: list[str], *, ok: bool,
                        timeout: float = 3600.0) -> None:
    """Wait for the jobs (when ``ok``: the transaction ran), then detach the targets. On
    any failure the new bitmaps go too, so nothing records from an instant no kept
    backup starts at."""
    try:
        if ok:
            for jid in ids:
                await wait_job(qmp, jid, "blockdev-backup", timeout=timeout)
    except BaseException:
        ok = False
        raise
    finally:
        with contextlib.suppress(QMPError):
            if not ok:
                for jid in ids:
                    with contextlib.suppress(QMPError):
                        await qmp.execute("job-cancel", {"id": jid})
                for j in jobs:
                    with contextlib.suppress(QMPError):
                        await qmp.execute("block-dirty-bitmap-remove",
                                          {"node": j.node, "name": j.new_bitmap})
            await clear_stale(qmp)


async def clear_stale(qmp: QMP) -> None:
    """What a backup left attached (a supervisor killed in the middle of one): its jobs,
    its target nodes, its fd sets."""
    for j in await qmp.execute("query-jobs"):
        if j["id"].startswith("backup-"):
            with contextlib.suppress(QMPError):
                if j["status"] not in ("concluded", "null"):
                    await qmp.execute("job-cancel", {"id": j["id"], "force": True})
                    await wait_job(qmp, j["id"], "blockdev-backup", timeout=30.0)
                else:
                    await qmp.execute("job-dismiss", {"id": j["id"]})
    have = await nodes(qmp)
    for name in sorted(have, key=lambda n: n.endswith("-file")):
        if name.startswith("bk-"):
            with contextlib.suppress(QMPError):
                await qmp.execute("blockdev-del", {"node-name": name})
    fdsets = await qmp.execute("query-fdsets")
    for fs in fdsets:
        if BACKUP_FDSET <= fs["fdset-id"] < BACKUP_FDSET + 20:
            with contextlib.suppress(QMPError):
                await qmp.execute("remove-fd", {"fdset-id": fs["fdset-id"]})
