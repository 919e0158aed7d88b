"""From a guest's intent and this host's facts to a launch spec (and its boot files)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..hostfacts import host_tsc_khz
from ..inventory.files import disk_problems, inside, regular_file
from ..inventory.schema import NetworkSpec, Uefi
from ..model import GuestIntent, data_node
from . import throttle
from .accel import KvmFacts, KvmKind, choose_accel, probe_kvm
from .disk import own, prepare_data_disk, prepare_overlay, prepare_vars
from .identity import Identity
from .image import BuiltImage, build_tiny
from .seed import build as build_seed
from .seed import dns_servers
from .qemu import Boot, DataDisk, LaunchSpec, RunPaths, TapNic, choose_machine, guest_uuid


@dataclass(frozen=True)
class VirtHost:
    """What the launcher needs to know about this host."""

    kvm: KvmFacts
    tsc_khz: int | None
    vhost_net: bool

    @classmethod
    def probe(cls) -> "VirtHost":
        return cls(probe_kvm(), host_tsc_khz(), os.access("/dev/vhost-net", os.R_OK | os.W_OK))


def image_cache_dir(state_images: Path) -> Path:
    """The image cache: the state dir's, unless CONSOLIDATOR_IMAGE_CACHE names a shared one."""
    env = os.environ.get("CONSOLIDATOR_IMAGE_CACHE")
    return Path(env) if env else state_images


def check_image_files(intent: GuestIntent, roots: tuple[str, ...]) -> None:
    """At launch, what validation checked: every file the image names is still a regular
    file inside the image roots, and a disk's chain stays inside them in its format (a
    file swapped for a link, or a base rewritten, since the inventory was validated)."""
    img = intent.image_spec
    files = [(w, getattr(img, w)) for w in ("kernel", "initrd", "disk")]
    for what, path in files + [("cdrom", intent.cdrom)]:
        if not path:
            continue
        if not regular_file(path) or not inside(path, roots):
            raise ImageError(f"guest {intent.name}: {what} {path} is no longer a regular file "
                             "inside the image roots", hint="apply again to see why")
        if what == "disk":
            problems = disk_problems(path, img.format or "raw", roots)
            if problems:
                raise ImageError(f"guest {intent.name}: disk {path}: "
                                 + "; ".join(m for _, m in problems))


def instance_id(guest_dir: Path, fresh: bool) -> str:
    """cloud-init's instance-id for the guest: kept in its dir, new when its disk is made
    anew (``fresh``), so user-data runs once per disk, as on a cloud."""
    p = guest_dir / "instance-id"
    if not fresh and p.exists():
        return p.read_text().strip()
    iid = f"{guest_dir.name}-{uuid.uuid4().hex[:12]}"
    p.write_text(iid + "\n")
    return iid


def prepare_boot(intent: GuestIntent, cache: Path, guest_dir: Path,
                 built: BuiltImage | None = None, roots: tuple[str, ...] = (),
                 owner: Identity | None = None, uefi: Uefi | None = None,
                 networks: dict[str, NetworkSpec] | None = None) -> Boot:
    """Boot files for the guest: builds the tiny image if needed, makes the disk overlay
    (owned by ``owner``, the uid its QEMU runs as) and reads its chain. With ``roots``,
    the image's files are checked against them first, and the chain below the overlay
    must stay inside them."""
    img = intent.image_spec
    if roots:
        check_image_files(intent, roots)
    disk, chain = None, ()
    fresh = False
    if img.disk:
        overlay = guest_dir / "disk.qcow2"
        before = overlay.stat().st_ino if overlay.exists() else None
        chain = prepare_overlay(Path(img.disk), img.format or "raw", overlay)
        fresh = before != overlay.stat().st_ino
        if owner is not None:
            own(overlay, owner.uid, owner.gid)
        disk = str(overlay)
        outside = [p for p, _ in chain[1:] if roots and not inside(p, roots)]
        if outside:
            raise ImageError(f"guest {intent.name}: its disk's chain reaches "
                             f"{outside[0]}, outside the image roots")
    writable = []
    data = []
    for d in intent.disks:
        path = guest_dir / f"{data_node(d.name)}.qcow2"
        prepare_data_disk(path, d.size)
        writable.append(path)
        data.append(DataDisk(d.name, str(path), d.bus))
    fw: dict[str, Any] = {}
    if intent.firmware:
        fw = {"firmware": intent.firmware, "cdrom": intent.cdrom}
        if intent.firmware == "uefi":
            uefi = uefi or Uefi()
            vars_ = guest_dir / "efivars.fd"
            prepare_vars(Path(uefi.vars), vars_)
            writable.append(vars_)
            fw.update(uefi_code=uefi.code, uefi_vars=str(vars_))
    if intent.cloud_init is not None:
        seed_path = guest_dir / "cidata.iso"
        build_seed(intent, instance_id(guest_dir, fresh), dns_servers(networks or {}),
                   seed_path)
        fw["seed"] = str(seed_path)
    if owner is not None:
        for path in writable:
            own(path, owner.uid, owner.gid)
    if img.builtin:
        built = built or build_tiny(cache, img.kernel)
        return Boot(str(built.kernel), str(built.initrd), img.cmdline or "", disk, "qcow2",
                    builtin=True, chain=chain, data=tuple(data), **fw)
    return Boot(img.kernel, img.initrd, img.cmdline or "", disk, "qcow2", builtin=False,
                chain=chain, data=tuple(data), **fw)


def launch_spec(intent: GuestIntent, boot: Boot, paths: RunPaths, host: VirtHost, *,
                taps: tuple[str, ...] = (), tb_size_mib: int | None = None) -> LaunchSpec:
    """Pure: everything QEMU's argv depends on."""
    accel = choose_accel(host.kvm, image_pvm=intent.image_spec.pvm)
    legacy = (intent.display != "none" or any(n.model != "virtio" for n in intent.nics) or
              any(b != "virtio" for b in [intent.disk_bus if boot.disk else "virtio",
                                           *(d.bus for d in intent.disks)]))
    machine = choose_machine(accel, tsc_khz=host.tsc_khz, firmware_boot=boot.kernel is None,
                             wanted=intent.machine, legacy_devices=legacy)
    nics = tuple(TapNic(tap, n.mac, n.cidr, n.gateway, n.model)
                 for tap, n in zip(taps, intent.nics))
    extra = {"tb_size_mib": tb_size_mib} if tb_size_mib else {}
    return LaunchSpec(
        name=intent.name, vcpus=intent.vcpus, memory_mib=intent.memory.max >> 20, boot=boot,
        paths=paths, accel=accel, machine=machine, nics=nics, tsc_khz=host.tsc_khz,
        pvm_host=host.kvm.kind is KvmKind.PVM, uuid=guest_uuid(paths.dir.parent),
        vhost=accel.name == "kvm" and host.vhost_net, disk_bus=intent.disk_bus,
        display=intent.display, rtc=intent.rtc, cpu_model=intent.cpu.model,
        hyperv=intent.hyperv, boot_order=intent.boot, mem_merge=intent.memory.merge,
        limits=tuple((k, tuple(v.items())) for k, v in
                     throttle.guest_limits(intent).items()), **extra)
