"""Real guest images: a bootable Debian disk built from Debian's packages.

``consolidator image build debian --release bookworm --firmware uefi`` gives a disk that
boots like any cloud image a user brings: firmware, a bootloader, a stock Debian kernel
(``linux-image-amd64``: it has the drivers of legacy devices too, e1000, AHCI, IDE,
rtl8139), systemd, cloud-init and the QEMU guest agent. Nothing in it knows consolidator:
it gets its name and addresses from cloud-init or DHCP like on any other hypervisor.

How, step by step (every step a tool made for it; root is needed for the loop device):

1. a sparse raw file; ``sfdisk`` writes the partition table: MBR with one ext4 root for
   BIOS; GPT with a 64 MiB EFI system partition and the root for UEFI;
2. each partition through its own loop device at its offset (``losetup -o``: partition
   nodes of a loop device do not appear on every host);
3. ``debootstrap --variant=minbase`` of the release with the packages below, its .debs
   cached across builds;
4. the bootloader: ``extlinux`` in the root and syslinux's MBR for BIOS; for UEFI
   ``systemd-boot`` as the removable-media loader (``EFI/BOOT/BOOTX64.EFI``) with the
   kernel and initrd on the ESP, so no NVRAM entry and no probing is needed. The ESP is
   written with mtools, never mounted: the build host's kernel may lack vfat (this one
   does);
5. networking: systemd-networkd with DHCP on every ``eth*`` (``net.ifnames=0`` keeps the
   name stable whatever the NIC model), resolved for DNS; cloud-init's own network config,
   when a seed brings one, comes first (``10-cloud-init-*``);
6. the machine-id emptied (each guest makes its own on first boot), caches cleaned;
7. ``qemu-img convert -c`` to a compressed qcow2, and a manifest with every input, the
   package versions and the sha256 of the result.

The result is cached under the image cache by the hash of its inputs, like ``tiny``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ImageError
from .image import cache_lock

BUILDER_VERSION = 1
RELEASES = {"bookworm": "12", "bullseye": "11"}
FIRMWARES = ("bios", "uefi")
DEFAULT_SIZE = 4 << 30
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ESP_MIB = 64
KERNEL_ARGS = "console=tty0 console=ttyS0,115200 net.ifnames=0 quiet"
#: host tools the build runs, and the Debian package each comes from
HOST_TOOLS = {"debootstrap": "debootstrap", "sfdisk": "fdisk", "losetup": "mount",
              "mkfs.ext4": "e2fsprogs", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
              "qemu-img": "qemu-utils"}

Progress = Callable[[str], None]


def packages(release: str, firmware: str) -> list[str]:
    """Pure: what goes into the image besides minbase."""
    pk = ["linux-image-amd64", "systemd-sysv", "udev", "dbus", "kmod", "iproute2",
          "netbase", "cloud-init", "qemu-guest-agent", "python3",
          "ca-certificates", "procps",
          # debootstrap resolves no virtual packages: python3-cryptography (cloud-init)
          # needs python3-cffi-backend-api-*, which this one provides
          "python3-cffi-backend"]
    if release != "bullseye":
        pk.append("systemd-resolved")        # its own package from bookworm on
    pk += ["extlinux", "syslinux-common"] if firmware == "bios" else \
          ["systemd-boot-efi" if release != "bullseye" else "systemd"]
    return pk


def partition_script(firmware: str, size: int) -> str:
    """Pure: the ``sfdisk`` script for the disk."""
    if firmware == "bios":
        return "label: dos\nstart=2048, type=83, bootable\n"
    esp = ESP_MIB * 2048
    return ("label: gpt\n"
            f"start=2048, size={esp}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n"
            f"start={2048 + esp}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n")


def network_units() -> dict[str, str]:
    """Pure: files the image gets under /etc/systemd/network."""
    # the DHCP server's domain is the network's name: as a search domain, a single-label
    # name (``db``) resolves as ``db.<network>`` (resolved sends no single label to DNS)
    return {"90-dhcp.network": "[Match]\nName=eth* en*\n\n[Network]\nDHCP=ipv4\n"
                               "\n[DHCPv4]\nUseHostname=false\nUseDomains=yes\n"}


@dataclass(frozen=True)
class OsImage:
    dir: Path
    disk: Path
    manifest: dict[str, Any]


def _inputs(release: str, firmware: str, size: int, mirror: str) -> dict[str, Any]:
    return {"builder": {"version": BUILDER_VERSION,
                        "sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
            "distro": "debian", "release": release, "firmware": firmware, "size": size,
            "mirror": mirror, "packages": packages(release, firmware),
            "kernel_args": KERNEL_ARGS}


def image_name(release: str, firmware: str, key: str) -> str:
    return f"debian-{release}-{firmware}-{key[:12]}"


def _run(argv: list[str], *, timeout: float = 1800, env: dict[str, str] | None = None,
         input: str | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             input=input, env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed",
                         hint=f"apt-get install {HOST_TOOLS.get(argv[0], argv[0])}") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{' '.join(argv[:3])} timed out after {timeout:g}s") from None
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise ImageError(f"{' '.join(argv[:4])} failed: " + " | ".join(msg[-3:]))
    return res.stdout


def default_mirror() -> str:
    """The host's own Debian mirror (its apt sources name it), else deb.debian.org."""
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            for m in re.finditer(r"(?:^deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(https?://\S+/debian)/?\s",
                                 f.read_text(), re.M):
                return m.group(1)
    return DEFAULT_MIRROR


def check_host() -> None:
    if os.geteuid() != 0:
        raise ImageError("building a disk image needs root (loop devices, debootstrap)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)})
    if missing:
        raise ImageError("the image builder needs " + ", ".join(missing),
                         hint="apt-get install " + " ".join(missing))


def find_built(cache: Path, release: str, firmware: str, size: int = DEFAULT_SIZE,
               mirror: str | None = None) -> OsImage | None:
    inputs = _inputs(release, firmware, size, mirror or default_mirror())
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    d = cache / image_name(release, firmware, key)
    if (d / "manifest.json").exists() and (d / "disk.qcow2").exists():
        return OsImage(d, d / "disk.qcow2", json.loads((d / "manifest.json").read_text()))
    return None


def list_os_images(cache: Path) -> list[OsImage]:
    out = []
    for m in sorted(cache.glob("debian-*/manifest.json")):
        try:
            manifest = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        out.append(OsImage(m.parent, m.parent / "disk.qcow2", manifest))
    return out


def build_debian(cache: Path, release: str, firmware: str, *, size: int = DEFAULT_SIZE,
                 mirror: str | None = None, force: bool = False,
                 progress: Progress = lambda s: None) -> OsImage:
    """Build (or find in ``cache``) a bootable Debian disk. See the module docstring."""
    if release not in RELEASES:
        raise ImageError(f"unknown Debian release {release!r}; choose from "
                         + ", ".join(RELEASES))
    if firmware not in FIRMWARES:
        raise ImageError(f"firmware is bios or uefi, not {firmware!r}")
    if size < 2 << 30:
        raise ImageError("a Debian disk needs at least 2GiB")
    mirror = mirror or default_mirror()
    inputs = _inputs(release, firmware, size, mirror)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    with cache_lock(cache):
        found = None if force else find_built(cache, release, firmware, size, mirror)
        if found:
            progress(f"cached: {found.dir.name}")
            return found
        check_host()
        dest = cache / image_name(release, firmware, key)
        work = cache / f".build-{dest.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        try:
            t0 = time.monotonic()
            versions = _assemble(work, cache / "debs", release, firmware, size, mirror,
                                 progress)
            progress("compressing to qcow2")
            _run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", str(work / "disk.raw"),
                  str(work / "disk.qcow2")])
            (work / "disk.raw").unlink()
            for sub in ("root", "esp"):             # the mount point and the ESP's staging
                shutil.rmtree(work / sub, ignore_errors=True)
            h = hashlib.sha256()
            with open(work / "disk.qcow2", "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            manifest = {"kind": "debian", "name": dest.name, "inputs": inputs,
                        "inputs_sha256": key, "packages": versions,
                        "os": f"debian{RELEASES[release]}", "firmware": firmware,
                        "outputs": {"disk.qcow2": {
                            "sha256": h.hexdigest(),
                            "size": (work / "disk.qcow2").stat().st_size,
                            "virtual_size": size}},
                        "build_seconds": round(time.monotonic() - t0, 1)}
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return OsImage(dest, dest / "disk.qcow2", manifest)


@contextlib.contextmanager
def _loop(image: Path, offset: int, size: int | None) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    dev = _run(argv + [str(image)]).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def _mounted(dev: str, where: Path, *extra: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run(["mount", *extra, dev, str(where)])
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    done: list[Path] = []
    try:
        for src, dst, opts in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--bind"])):
            (root / dst).mkdir(exist_ok=True)
            _run(["mount", *opts, src, str(root / dst)])
            done.append(root / dst)
        yield
    finally:
        for p in reversed(done):
            if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)


def _partitions(raw: Path) -> list[tuple[int, int]]:
    table = json.loads(_run(["sfdisk", "--json", str(raw)]))["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]


def _assemble(work: Path, debs: Path, release: str, firmware: str, size: int, mirror: str,
              progress: Progress) -> dict[str, str]:
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    _run(["sfdisk", "-q", str(raw)], input=partition_script(firmware, size))
    parts = _partitions(raw)
    root_off, root_size = parts[-1]
    with _loop(raw, root_off, root_size) as rootdev:
        # no orphan_file or metadata_csum_seed: bullseye's kernel and e2fsck predate them,
        # and extlinux reads no 64bit ext4
        _run(["mkfs.ext4", "-q", "-L", "root", "-O",
              "^orphan_file,^metadata_csum_seed,^64bit", rootdev])
        mnt = work / "root"
        with _mounted(rootdev, mnt):
            debs.mkdir(parents=True, exist_ok=True)
            progress(f"debootstrap {release} from {mirror} (packages cached in {debs})")
            try:
                _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
                      "--include=" + ",".join(packages(release, firmware)),
                      release, str(mnt), mirror], timeout=3600)
            except ImageError:
                kept = work.parent / f"debootstrap-{release}-{firmware}.log"
                with contextlib.suppress(OSError):
                    shutil.copyfile(mnt / "debootstrap/debootstrap.log", kept)
                    progress(f"debootstrap failed; its log is kept in {kept}")
                raise
            progress("configuring")
            _configure(mnt, release)
            with _chroot_mounts(mnt):
                kver = _kernel_version(mnt)
                if firmware == "bios":
                    progress("extlinux")
                    _bios_boot(mnt, rootdev, raw, kver)
                else:
                    progress("systemd-boot on the EFI system partition")
                    esp_off, esp_size = parts[0]
                    stage = work / "esp"
                    _uefi_boot(mnt, stage, kver)
                    # written with mtools, not mounted: the host kernel may have no vfat
                    with _loop(raw, esp_off, esp_size) as espdev:
                        _run(["mkfs.vfat", "-F", "32", "-n", "ESP", espdev])
                        _run(["mcopy", "-s", "-Q", "-i", espdev,
                              *(str(p) for p in sorted(stage.iterdir())), "::/"])
                versions = _run(["chroot", str(mnt), "dpkg-query", "-W",
                                 "-f", "${Package} ${Version}\\n"])
            _clean(mnt)
    return dict(line.split(" ", 1) for line in versions.splitlines() if " " in line)


def _kernel_version(root: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError("debootstrap installed no kernel")
    return found[-1]


def _configure(root: Path, release: str) -> None:
    (root / "etc/fstab").write_text("LABEL=root / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    for name, text in network_units().items():
        (netdir / name).write_text(text)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("systemd-networkd.service", "systemd-resolved.service"):
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/lib/systemd/system/{unit}")
    resolv = root / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("/run/systemd/resolve/stub-resolv.conf")
    # cloud-init: only the NoCloud seed and nothing to probe for (no metadata servers)
    cfg = root / "etc/cloud/cloud.cfg.d"
    cfg.mkdir(parents=True, exist_ok=True)
    # C.UTF-8 needs no locale-gen (en_US would: seconds under TCG, and an error without
    # the locales package); no SSH server, so no host keys to make
    # bullseye's cloud-init (20.4) has no networkd renderer: there the network comes from
    # DHCP alone, which gives the same inventory address (a static lease)
    network = "network: {config: disabled}\n" if release == "bullseye" else \
        "system_info:\n  network:\n    renderers: [networkd]\n"
    (cfg / "90-consolidator.cfg").write_text(
        "datasource_list: [NoCloud, None]\n"
        "locale: C.UTF-8\n"
        "ssh_genkeytypes: []\n" + network)
    (root / "etc/default").mkdir(exist_ok=True)


def _bios_boot(root: Path, rootdev: str, raw: Path, kver: str) -> None:
    boot = root / "boot/extlinux"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "extlinux.conf").write_text(
        "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\nLABEL debian\n"
        f"  LINUX /boot/vmlinuz-{kver}\n  INITRD /boot/initrd.img-{kver}\n"
        f"  APPEND root=LABEL=root ro {KERNEL_ARGS}\n")
    _run(["chroot", str(root), "extlinux", "--install", "/boot/extlinux"])
    mbr = (root / "usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    with open(raw, "r+b") as f:
        f.write(mbr[:440])


def _uefi_boot(root: Path, esp: Path, kver: str) -> None:
    """Stage the EFI system partition's files in ``esp``."""
    loader = next((p for p in (root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
                               root / "lib/systemd/boot/efi/systemd-bootx64.efi") if p.exists()),
                  None)
    if loader is None:
        raise ImageError("systemd-boot's EFI loader is missing from the image")
    (esp / "EFI/BOOT").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loader, esp / "EFI/BOOT/BOOTX64.EFI")
    (esp / "loader/entries").mkdir(parents=True, exist_ok=True)
    (esp / "loader/loader.conf").write_text("default debian.conf\ntimeout 0\n")
    shutil.copyfile(root / f"boot/vmlinuz-{kver}", esp / "vmlinuz")
    shutil.copyfile(root / f"boot/initrd.img-{kver}", esp / "initrd.img")
    (esp / "loader/entries/debian.conf").write_text(
        f"title Debian\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options root=LABEL=root ro {KERNEL_ARGS}\n")


def _clean(root: Path) -> None:
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    for d in ("var/cache/apt/archives", "var/lib/apt/lists", "var/lib/cloud", "tmp"):
        p = root / d
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name != "lock":
                    child.unlink(missing_ok=True)
    # zeroed free blocks compress away in the qcow2
    subprocess.run(["fstrim", str(root)], capture_output=True)
