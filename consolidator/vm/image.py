"""The builtin guest image ``tiny``: a Linux kernel and an initramfs with static busybox.

The kernel comes from, in order:

1. the path the inventory gives (``images.<name>.kernel`` on a ``builtin: tiny`` image);
2. the host's ``/boot/vmlinuz-$(uname -r)`` with its modules from ``/lib/modules``;
3. Debian's cloud kernel, fetched with ``apt-get download`` and unpacked with
   ``dpkg-deb -x`` into the image cache (never installed on the host).

The initramfs is a newc cpio written here, byte for byte reproducible: entries
sorted, mtimes 0, owner root, inodes numbered in order. It holds static busybox,
the init and agent from ``guestfs/``, and the virtio modules in the order
``modinfo -F depends`` gives. The cache directory is named by the hash of every
input, and the manifest records sources, versions and sha256s.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import ImageError

BUILDER_VERSION = 1
CLOUD_KERNEL_META = "linux-image-cloud-amd64"
#: Modules the guest needs; (name, required). Order here does not matter: deps decide.
GUEST_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", True), ("virtio_mmio", False), ("virtio_net", True),
    ("virtio_balloon", True), ("virtio_blk", True), ("virtio_console", True),
    ("button", False), ("evdev", False),
)
GUESTFS_FILES = ("init", "consolidator-agent", "index.cgi", "acpi-power", "httpd.conf",
                 "profile")

Progress = Callable[[str], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host_kernel() -> tuple[Path, Path]:
    rel = platform.release()
    return Path(f"/boot/vmlinuz-{rel}"), Path(f"/lib/modules/{rel}")


def kernel_version_of(vmlinuz: Path) -> str | None:
    """Read the version string from a bzImage's setup header (offset given at 0x20e)."""
    try:
        with open(vmlinuz, "rb") as f:
            head = f.read(0x4000 + 0x200)
    except OSError:
        return None
    if head[0x202:0x206] != b"HdrS":
        return None
    off = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    with open(vmlinuz, "rb") as f:
        f.seek(off)
        text = f.read(256).split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split()[0] if text else None


# --------------------------------------------------------------------------- kernel

@dataclass(frozen=True)
class KernelSource:
    origin: str                  # "inventory", "host" or "debian-cloud"
    vmlinuz: Path
    modules_dir: Path | None     # .../lib/modules/<version>, or None (all built in)
    version: str
    detail: str

    def describe(self) -> str:
        return f"{self.origin}: {self.detail}"


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise OSError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise OSError(f"{' '.join(argv)} timed out after {timeout:g}s") from None
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise OSError(f"{' '.join(argv[:3])} failed: {msg[-1] if msg else res.returncode}")
    return res.stdout


def unpacked_kernels(root: Path) -> list[Path]:
    """The kernels unpacked under ``root``, oldest version first; never one in a
    ".<pkg>.tmp" that an interrupted unpack left behind, which may be half written."""
    def version_order(p: Path) -> list[tuple[int, str]]:      # 6.1.0-10 after 6.1.0-9
        return [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", p.name)]
    return sorted((p for p in root.glob("*/boot/vmlinuz-*")
                   if not p.parent.parent.name.startswith(".")), key=version_order)


def _debian_cloud_kernel(cache: Path, refresh: bool, progress: Progress) -> KernelSource:
    root = cache / "debian-cloud"
    if not refresh:
        found = unpacked_kernels(root)
        if found:
            vmlinuz = found[-1]
            unpacked = vmlinuz.parent.parent
            version = vmlinuz.name.removeprefix("vmlinuz-")
            meta = json.loads((unpacked / "package.json").read_text()) \
                if (unpacked / "package.json").exists() else {}
            return KernelSource("debian-cloud", vmlinuz, unpacked / "lib/modules" / version,
                                version, f"{meta.get('package', unpacked.name)} "
                                         f"{meta.get('version', '')}".strip())
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise OSError("apt-get and dpkg-deb are needed to fetch it")
    deps = _run(["apt-cache", "depends", CLOUD_KERNEL_META])
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)", deps)
    if not m:
        raise OSError(f"apt knows no {CLOUD_KERNEL_META} (run apt-get update)")
    pkg = m[1]
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    progress(f"apt-get download {pkg}")
    _run(["apt-get", "download", "-q", pkg], cwd=debs)
    deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
    version = deb.name.split("_")[1]
    unpacked = root / pkg
    tmp = root / f".{pkg}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    progress(f"dpkg-deb -x {deb.name}")
    _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    (tmp / "package.json").write_text(json.dumps(
        {"package": pkg, "version": version, "deb": deb.name, "deb_sha256": _sha256(deb)}))
    shutil.rmtree(unpacked, ignore_errors=True)
    os.replace(tmp, unpacked)
    vmlinuz = sorted(unpacked.glob("boot/vmlinuz-*"))[-1]
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    return KernelSource("debian-cloud", vmlinuz, unpacked / "lib/modules" / kver, kver,
                        f"{pkg} {version}")


def find_kernel(cache: Path, override: str | Path | None = None, *, refresh: bool = False,
                progress: Progress = lambda s: None) -> KernelSource:
    """The first kernel source that works, or ImageError naming each one tried and why not."""
    tried: list[tuple[str, str]] = []
    if override:
        p = Path(override)
        if not os.access(p, os.R_OK):
            tried.append((f"inventory kernel {p}", "not readable"))
        else:
            ver = kernel_version_of(p) or "unknown"
            mods = Path(f"/lib/modules/{ver}")
            return KernelSource("inventory", p, mods if mods.is_dir() else None, ver,
                                f"{p}" + (f" with {mods}" if mods.is_dir() else
                                          " (no module tree: virtio must be built in)"))
    vmlinuz, mods = host_kernel()
    if not vmlinuz.exists():
        tried.append((f"host kernel {vmlinuz}", "absent"))
    elif not os.access(vmlinuz, os.R_OK):
        tried.append((f"host kernel {vmlinuz}", "not readable"))
    elif not mods.is_dir():
        tried.append((f"host kernel {vmlinuz}", f"no module tree {mods}"))
    else:
        return KernelSource("host", vmlinuz, mods, platform.release(), f"{vmlinuz} with {mods}")
    try:
        return _debian_cloud_kernel(cache, refresh, progress)
    except OSError as e:
        tried.append((f"Debian cloud kernel ({CLOUD_KERNEL_META})", str(e)))
    raise ImageError("no kernel for the builtin image", tried=tried,
                     hint="set images.<name>.kernel in the inventory to a bzImage with virtio "
                          "built in, or make apt-get download work")


# -------------------------------------------------------------------------- modules

def _module_files(modules_dir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in (modules_dir / "kernel").rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        out.setdefault(name, p)
    return out


def _builtin_modules(modules_dir: Path) -> set[str]:
    try:
        lines = (modules_dir / "modules.builtin").read_text().split()
    except OSError:
        return set()
    return {Path(x).name.split(".ko")[0].replace("-", "_") for x in lines}


def resolve_modules(modules_dir: Path | None,
                    wanted: Iterable[tuple[str, bool]] = GUEST_MODULES) -> list[tuple[str, Path]]:
    """Wanted modules and their dependencies, dependencies first (``modinfo -F depends``)."""
    if modules_dir is None:
        return []
    files = _module_files(modules_dir)
    builtin = _builtin_modules(modules_dir)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()
    missing: list[str] = []

    def visit(name: str, required: bool, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path = files.get(name)
        if path is None:
            if required:
                missing.append(name)
            return
        deps = _run(["modinfo", "-F", "depends", str(path)]).strip()
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"), True, chain + (name,))
        seen.add(name)
        order.append((name, path))

    for name, required in sorted(wanted):
        visit(name, required, ())
    if missing:
        raise ImageError(f"kernel modules not found in {modules_dir}: {', '.join(missing)}")
    return order


def module_bytes(path: Path) -> bytes:
    """A module's ELF, decompressed from .ko.xz / .ko.gz / .ko.zst when needed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if not shutil.which("zstd"):
            raise ImageError(f"{path} is zstd-compressed and zstd is not installed",
                             hint="apt-get install zstd")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return data


# ----------------------------------------------------------------------------- cpio

@dataclass
class Tree:
    """A file tree to write as a cpio archive or into a directory."""

    entries: dict[str, tuple[str, Any, int]] = field(default_factory=dict)

    def dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir", None, mode))

    def _put(self, path: str, entry: tuple[str, Any, int]) -> None:
        """Add an entry and its parent directories (the kernel's unpacker makes none)."""
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = entry

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, ("file", data, mode))

    def symlink(self, path: str, target: str) -> None:
        self._put(path, ("symlink", target, 0o777))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, ("chr", (major, minor), mode))

    def cpio(self) -> bytes:
        out = bytearray()

        def entry(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0),
                  nlink: int = 1) -> None:
            fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                      len(name) + 1, 0)
            out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
            out.extend(name.encode() + b"\0")
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))

        for ino, path in enumerate(sorted(self.entries), start=1):
            kind, payload, perm = self.entries[path]
            if kind == "dir":
                entry(ino, path, stat.S_IFDIR | perm, b"", nlink=2)
            elif kind == "file":
                entry(ino, path, stat.S_IFREG | perm, payload)
            elif kind == "symlink":
                entry(ino, path, stat.S_IFLNK | perm, payload.encode())
            else:
                entry(ino, path, stat.S_IFCHR | perm, b"", rdev=payload)
        entry(0, "TRAILER!!!", 0, b"")
        out.extend(b"\0" * (-len(out) % 512))
        return bytes(out)

    def write_dir(self, dest: Path) -> None:
        """Materialise into ``dest`` (device nodes are skipped: devtmpfs provides them)."""
        for path in sorted(self.entries):
            kind, payload, perm = self.entries[path]
            p = dest / path
            if kind == "dir":
                p.mkdir(parents=True, exist_ok=True)
                p.chmod(perm)
            elif kind == "file":
                p.write_bytes(payload)
                p.chmod(perm)
            elif kind == "symlink":
                if p.is_symlink() or p.exists():
                    p.unlink()
                p.symlink_to(payload)


def _guestfs(name: str) -> bytes:
    return resources.files("consolidator.vm").joinpath("guestfs", name).read_bytes()


def is_static_elf(path: str) -> bool:
    """True when the ELF has no PT_INTERP program header (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        return not any(int.from_bytes(table[i:i + 4], "little") == 3
                       for i in range(0, len(table), phentsize))
    except OSError:
        return False


def busybox_path() -> Path:
    p = shutil.which("busybox")
    if not p:
        raise ImageError("busybox is not installed", hint="apt-get install busybox-static")
    real = Path(p).resolve()
    if not is_static_elf(str(real)):
        raise ImageError(f"{real} is dynamically linked; the guest needs a static busybox",
                         hint="apt-get install busybox-static")
    return real


def guest_tree(busybox: Path, modules: list[tuple[str, Path]]) -> Tree:
    t = Tree()
    for d in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "run", "tmp", "root", "var/log",
              "www/cgi-bin", "newroot", "mnt"):
        t.dir(d)
    t.chardev("dev/console", 5, 1)
    t.chardev("dev/null", 1, 3, 0o666)
    t.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list"]).split()
    for a in sorted(set(applets) - {"busybox"}):
        t.symlink(f"bin/{a}", "busybox")
    t.symlink("sbin", "bin")
    t.symlink("usr/bin", "../bin")
    t.symlink("usr/sbin", "../bin")
    t.file("init", _guestfs("init"), 0o755)
    t.file("bin/consolidator-agent", _guestfs("consolidator-agent"), 0o755)
    t.file("www/cgi-bin/index.cgi", _guestfs("index.cgi"), 0o755)
    t.file("www/health", b"ok\n")
    # busybox acpid runs /etc/acpi/<action> for the power button's action PWRF/00000080
    t.file("etc/acpi/PWRF/00000080", _guestfs("acpi-power"), 0o755)
    t.file("etc/httpd.conf", _guestfs("httpd.conf"))
    t.file("etc/profile", _guestfs("profile"))
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    t.file("etc/group", b"root:x:0:\n")
    t.file("etc/modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, path in modules:
        t.file(f"lib/modules/{name}.ko", module_bytes(path))
    return t


# ---------------------------------------------------------------------------- build

@dataclass(frozen=True)
class BuiltImage:
    dir: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["inputs_sha256"]


def _inputs(src: KernelSource, busybox: Path, modules: list[tuple[str, Path]]) -> dict[str, Any]:
    bb_version = _run([str(busybox)]).splitlines()[0] if busybox else ""
    return {
        # the builder's own code is an input: change how images are made, and the key changes
        "builder": {"version": BUILDER_VERSION,
                    "sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
        "kernel": {"origin": src.origin, "version": src.version, "detail": src.detail,
                   "sha256": _sha256(src.vmlinuz)},
        "busybox": {"version": bb_version, "sha256": _sha256(busybox)},
        "modules": [{"name": n, "sha256": hashlib.sha256(module_bytes(p)).hexdigest()}
                    for n, p in modules],
        "guestfs": {f: hashlib.sha256(_guestfs(f)).hexdigest() for f in GUESTFS_FILES},
    }


# Inputs by the files' fingerprints: resolving modules runs modinfo once per module and
# hashing reads the kernel, about 100 ms, which every guest start paid to find the image
# it already had. A changed file (a new kernel, busybox, module set or builder) changes
# its fingerprint, so the inputs are computed again.
_INPUTS_MEMO: dict[tuple[Any, ...], tuple[list[tuple[str, Path]], dict[str, Any]]] = {}


def _fingerprint(src: KernelSource, busybox: Path) -> tuple[Any, ...]:
    paths = [src.vmlinuz, busybox, Path(__file__)]
    if src.modules_dir is not None:
        paths += [src.modules_dir / "modules.dep", src.modules_dir / "modules.builtin"]
    guestfs = resources.files("consolidator.vm").joinpath("guestfs")
    paths += [Path(str(guestfs.joinpath(f))) for f in GUESTFS_FILES]
    out: list[Any] = [src.origin, src.version, src.detail, str(src.modules_dir)]
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), None))
    return tuple(out)


def _inputs_of(src: KernelSource, busybox: Path
               ) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    fp = _fingerprint(src, busybox)
    if fp not in _INPUTS_MEMO:
        modules = resolve_modules(src.modules_dir)
        _INPUTS_MEMO[fp] = (modules, _inputs(src, busybox, modules))
    return _INPUTS_MEMO[fp]


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Exclusive use of the image cache: apply starts guests in parallel, and each may find
    the image missing; `image build` and `image rm` may run beside a supervisor. The first
    builds, the others wait and then find its result. flock, so a crash releases it."""
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_tiny(cache: Path, kernel: str | Path | None = None, *, force: bool = False,
               refresh: bool = False, progress: Progress = lambda s: None) -> BuiltImage:
    """Build (or reuse) the tiny image for these inputs. Reproducible: same inputs, same bytes."""
    with cache_lock(cache):
        return _build_tiny(cache, kernel, force=force, refresh=refresh, progress=progress)


def _build_tiny(cache: Path, kernel: str | Path | None, *, force: bool, refresh: bool,
                progress: Progress) -> BuiltImage:
    src = find_kernel(cache, kernel, refresh=refresh, progress=progress)
    busybox = busybox_path()
    modules, inputs = _inputs_of(src, busybox)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    out = cache / f"tiny-{key[:12]}"
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if m.get("inputs_sha256") == key and (out / "vmlinuz").exists() \
                and (out / "initrd.cpio").exists():
            return BuiltImage(out, out / "vmlinuz", out / "initrd.cpio", m)
    progress(f"building tiny image from {src.describe()}")
    tmp = cache / f".tiny-{key[:12]}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    shutil.copyfile(src.vmlinuz, tmp / "vmlinuz")
    initrd = guest_tree(busybox, modules).cpio()
    (tmp / "initrd.cpio").write_bytes(initrd)
    manifest = {
        "format": 1, "name": "tiny", "inputs_sha256": key, "inputs": inputs,
        "kernel": {"source": src.describe(), "version": src.version},
        "modules_order": [n for n, _ in modules],
        "outputs": {"vmlinuz": {"sha256": _sha256(tmp / "vmlinuz"),
                                "size": (tmp / "vmlinuz").stat().st_size},
                    "initrd.cpio": {"sha256": hashlib.sha256(initrd).hexdigest(),
                                    "size": len(initrd)}},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return BuiltImage(out, out / "vmlinuz", out / "initrd.cpio", manifest)


def list_images(cache: Path) -> list[BuiltImage]:
    out = []
    for m in sorted(cache.glob("tiny-*/manifest.json")):
        try:
            manifest = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        out.append(BuiltImage(m.parent, m.parent / "vmlinuz", m.parent / "initrd.cpio",
                              manifest))
    return out


def describe_kernel_source(images_dir: Path | None) -> tuple[str, bool, str | None]:
    """Where the builtin image's kernel comes (or would come) from: (text, usable, fix)."""
    if images_dir is not None:
        built = list_images(images_dir)
        if built:
            return f"cached in {built[-1].dir}: {built[-1].manifest['kernel']['source']}", \
                True, None
    vmlinuz, modules = host_kernel()
    if os.access(vmlinuz, os.R_OK) and modules.is_dir():
        return f"the host's kernel {vmlinuz} with {modules}", True, None
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        return (f"Debian's cloud kernel ({CLOUD_KERNEL_META}) via apt-get download, unpacked "
                f"into the image cache, not installed (no {vmlinuz} here)", True, None)
    return (f"none: no {vmlinuz} and no apt-get", False,
            "set images.<name>.kernel in the inventory, or install a kernel in /boot")
