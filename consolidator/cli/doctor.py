"""``consolidator doctor``: what this host offers, whether it is usable, and the fix if not."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from ..inventory.schema import HostSpec
from ..sched.cgroup import CgroupLayout, detect
from ..sched import ksmfs
from ..sched.psi import probe as psi_probe
from ..vm.accel import KvmFacts, KvmKind, choose_accel, probe_kvm
from ..vm.image import describe_kernel_source, is_static_elf


@dataclass(frozen=True)
class Fact:
    name: str
    value: str
    ok: bool
    required: bool
    fix: str | None = None


def _version(argv: list[str], pattern: str = r"version ([\w.+~:-]+)") -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m[1] if m else (out.stdout.strip().splitlines() or ["?"])[0]


def kvm_facts(kvm: KvmFacts) -> list[Fact]:
    accel = choose_accel(kvm)
    return [
        Fact("/dev/kvm", f"opens, KVM API {kvm.api_version}" if kvm.opens else
             (kvm.error or "absent"), kvm.opens, False,
             None if kvm.opens else "load kvm_intel or kvm_amd, or accept TCG (slower)"),
        Fact("KVM kind", kvm.explain(), kvm.kind is KvmKind.HARDWARE, False,
             None if kvm.kind is KvmKind.HARDWARE else
             "guests run under TCG; on PVM hosts mark an image pvm: true only if its kernel "
             "boots under PVM"),
        Fact("accelerator", accel.reason, True, True),
    ]


def cgroup_facts(layout: CgroupLayout, instance: str) -> list[Fact]:
    out = []
    if layout.mode.value == "hybrid":
        desc = (f"hybrid: v1 controllers {', '.join(sorted(layout.v1))}; cgroup2 at "
                f"{layout.v2.point if layout.v2 else '?'} with "
                f"[{' '.join(layout.v2_controllers) or 'no controllers'}]")
    elif layout.mode.value == "v2":
        desc = f"v2: controllers [{' '.join(layout.v2_controllers)}]"
    elif layout.mode.value == "v1":
        desc = f"v1: controllers {', '.join(sorted(layout.v1))}"
    else:
        desc = "no cgroup filesystem mounted"
    backend = layout.backend
    out.append(Fact("cgroup mode", desc + f" -> {backend} backend", backend != "none", True,
                    None if backend != "none" else "mount cgroup2 with cpu and memory, or the v1 "
                    "cpu and memory hierarchies"))
    if backend != "none":
        sub = layout.subtree(instance)
        own = layout.own_dirs()
        writable = all(os.access(p, os.W_OK) for p in own.values())
        shown = "; ".join(f"{c}: {p}" for c, p in sub.items())
        out.append(Fact("cgroup subtree", shown, writable, True,
                        None if writable else "run as root, or under systemd with Delegate=yes"))
    return out


def kernel_source_fact(images_dir: Path | None) -> Fact:
    desc, ok, fix = describe_kernel_source(images_dir)
    return Fact("builtin image kernel", desc, ok, True, fix)


def metrics_fact(listen: str) -> Fact:
    """Who holds the metrics port: free, our supervisor, or someone else (then the
    supervisor cannot serve there, and whatever answers is not us)."""
    host, _, port = listen.rpartition(":")
    holder = None
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and \
                    conn.laddr.port == int(port) and conn.pid:
                holder = psutil.Process(conn.pid)
                break
    if holder is None:
        return Fact("metrics port", f"{listen}: free", True, False)
    with contextlib.suppress(psutil.Error):
        argv = holder.cmdline()
        if "consolidator.daemon" in argv or \
                ("supervise" in argv and any("consolidator" in a for a in argv)):
            return Fact("metrics port", f"{listen}: served by the supervisor (pid "
                        f"{holder.pid})", True, False)
        return Fact("metrics port", f"{listen}: held by {holder.name()} (pid {holder.pid})",
                    False, False, "free the port or set host.metrics.listen elsewhere: "
                    "the supervisor cannot serve there")
    return Fact("metrics port", f"{listen}: held by pid {holder.pid}", False, False,
                "free the port or set host.metrics.listen elsewhere")


def gather(instance: str = "cns", images_dir: Path | None = None,
           host: HostSpec | None = None) -> dict[str, Any]:
    kvm = probe_kvm()
    layout = detect()
    facts: list[Fact] = []
    facts.append(Fact("root", "yes" if os.geteuid() == 0 else f"no (uid {os.geteuid()})",
                      os.geteuid() == 0, True, None if os.geteuid() == 0 else "run as root"))
    facts.append(Fact("kernel", platform.release(), True, False))
    facts += kvm_facts(kvm)
    facts += cgroup_facts(layout, instance)
    try:
        st = os.stat("/dev/net/tun")
        tun_ok = stat.S_ISCHR(st.st_mode)
    except OSError:
        tun_ok = False
    facts.append(Fact("/dev/net/tun", "present" if tun_ok else "missing", tun_ok, True,
                      None if tun_ok else "modprobe tun"))
    netns_ok = os.path.exists("/proc/self/ns/net")
    facts.append(Fact("network namespaces", "supported" if netns_ok else "unsupported",
                      netns_ok, True, None if netns_ok else "a kernel with CONFIG_NET_NS"))
    psi = all(os.path.exists(f"/proc/pressure/{r}") for r in ("cpu", "memory", "io"))
    facts.append(Fact("PSI", "/proc/pressure/{cpu,memory,io}" if psi else "absent", psi, False,
                      None if psi else "boot with psi=1; the rebalancer then relies on "
                      "MemAvailable and guest stats only"))
    if psi:
        how = psi_probe()
        facts.append(Fact("memory pressure watch", how, not how.startswith("unreadable"),
                          False, None))
    for binary, pkg, required, pattern in (
            ("qemu-system-x86_64", "qemu-system-x86", True, r"version ([\d.]+)"),
            ("qemu-img", "qemu-utils", True, r"version ([\d.]+)"),
            ("busybox", "busybox-static", True, r"BusyBox v([\d.]+)"),
            ("modinfo", "kmod", True, r"kmod version (\d+)"),
            ("nft", "nftables", True, r"v([\d.]+)")):
        path = shutil.which(binary)
        ver = _version([path, "--version"] if binary != "busybox" else [path], pattern) \
            if path else None
        value = f"{ver} ({path})" if path else "not found"
        ok = path is not None
        if ok and binary == "busybox" and not is_static_elf(path):
            value += ", dynamically linked"
            ok = False
        facts.append(Fact(binary, value, ok, required,
                          None if ok else f"apt-get install {pkg}"))
    facts.append(kernel_source_fact(images_dir))
    host = host or HostSpec()
    facts += realos_facts(host)
    if host.metrics.enabled:
        facts.append(metrics_fact(host.metrics.listen))
    facts.append(qemu_user_fact(host))
    facts.append(ksm_fact(host.ksm))
    facts.append(oom_fact())
    missing = [f.name for f in facts if f.required and not f.ok]
    accel = choose_accel(kvm)
    return {
        "format": 1,
        "ok": not missing,
        "missing": missing,
        "accel": {"name": accel.name, "reason": accel.reason},
        "kvm": {"kind": kvm.kind.value, "opens": kvm.opens, "api_version": kvm.api_version,
                "modules": list(kvm.modules), "cpu_flags": list(kvm.cpu_flags)},
        "cgroup": {"mode": layout.mode.value, "backend": layout.backend,
                   "v1_controllers": sorted(layout.v1),
                   "v2_controllers": list(layout.v2_controllers),
                   "subtree": {c: str(p) for c, p in layout.subtree(instance).items()}
                   if layout.backend != "none" else {}},
        "facts": [asdict(f) for f in facts],
    }


def oom_fact() -> Fact:
    """Whether the supervisor can set the OOM killer's order (lowering oom_score_adj
    needs CAP_SYS_RESOURCE, which containers often drop)."""
    from ..linux import CAP_SYS_RESOURCE, OOM_ADJ_GUEST, OOM_ADJ_SUPERVISOR, has_capability
    if has_capability(CAP_SYS_RESOURCE):
        return Fact("OOM killer order", f"supervisor {OOM_ADJ_SUPERVISOR}, guests "
                    f"{OOM_ADJ_GUEST}: the host's other processes go first", True, False)
    return Fact("OOM killer order", "cannot be set: no CAP_SYS_RESOURCE (lowering "
                "oom_score_adj needs it); the supervisor and its guests are ordinary OOM "
                "victims", False, False,
                "run the supervisor with CAP_SYS_RESOURCE (a container drops it; systemd "
                "keeps it for root services)")


def ksm_fact(mode: str, root: Path = ksmfs.KSM_DIR,
             run_dir: Path = ksmfs.RUN_DIR) -> Fact:
    """KSM: built in or not, what it runs with and saves now, and who tunes it."""
    if not ksmfs.available(root):
        return Fact("KSM (same-page merging)", "not in this kernel", False, False,
                    "a kernel with CONFIG_KSM; guests then hold their identical pages "
                    "each")
    v = {}
    for k in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing"):
        with contextlib.suppress(OSError, ValueError):
            v[k] = int((root / k).read_text())
    state = {0: "stopped", 1: "running", 2: "unmerging"}.get(v.get("run", -1), "unknown")
    value = (f"{state}, {v.get('pages_to_scan')} pages every {v.get('sleep_millisecs')} ms; "
             f"saves {v.get('pages_sharing', 0) * 4096 >> 20} MiB; host.ksm: {mode}")
    owner = ksmfs.read_owner(run_dir / "ksm.owner")
    if owner:
        value += f"; tuned by the supervisor ({owner})"
    elif (run_dir / "ksm-found.json").exists():
        value += "; a supervisor that tuned it died: the next one puts the settings back"
    return Fact("KSM (same-page merging)", value, True, False)


def realos_facts(host: HostSpec) -> list[Fact]:
    """What real operating systems need: none is required for the tiny image."""
    from .. import osinfo
    out = []
    uefi = all(os.path.isfile(p) for p in (host.uefi.code, host.uefi.vars))
    out.append(Fact("UEFI firmware", host.uefi.code if uefi else "not installed", uefi, False,
                    None if uefi else "apt-get install ovmf (guests with firmware: uefi)"))
    n = len(osinfo.short_ids())
    out.append(Fact("OS profiles (libosinfo)", f"{n} OS ids" if n else "no database", n > 0,
                    False, None if n else "apt-get install osinfo-db (guests with os:)"))
    dns = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin")
    out.append(Fact("dnsmasq", dns or "not found", dns is not None, False,
                    None if dns else "apt-get install dnsmasq-base (networks with dhcp)"))
    tools = [t for t in ("debootstrap", "sfdisk", "mkfs.vfat", "mcopy") if not shutil.which(t)]
    out.append(Fact("image builder", "ready" if not tools else "lacks " + ", ".join(tools),
                    not tools, False, None if not tools else
                    "apt-get install debootstrap fdisk dosfstools mtools "
                    "(consolidator image build debian)"))
    return out


def qemu_user_fact(host: HostSpec) -> Fact:
    """Whom QEMU runs as, and whether that is what it should be."""
    if host.runas == "root":
        return Fact("QEMU user", "root (host.runas: root)", False, False,
                    "a guest that escapes QEMU owns the host: remove host.runas")
    if host.runas:
        return Fact("QEMU user", f"{host.runas}, for every guest (host.runas), jailed", False,
                    False, "guests share one uid: one that escapes QEMU can reach the "
                           "others' QEMUs; remove host.runas for a uid per guest")
    ids = host.guest_ids
    return Fact("QEMU user", f"a uid of its own per guest ({ids.first}..."
                             f"{ids.first + ids.count - 1}), jailed", True, False, None)


def measure_disk_io(directory: str, seconds: float = 1.5) -> dict[str, float | str]:
    """What the filesystem under ``directory`` sustains: sequential 1 MiB writes (bytes a
    second) and random 4 KiB writes (operations a second), each for about ``seconds``,
    with O_DIRECT where the filesystem has it (else written through with fdatasync), in
    a scratch file removed after. The default of ``host.io: auto`` (doctor
    --measure-io)."""
    import mmap
    import random
    import tempfile
    import time
    fd, path = tempfile.mkstemp(prefix=".io-probe-", dir=directory)
    os.close(fd)
    span = 64 << 20
    try:
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            how = "O_DIRECT"
        except OSError:
            fd, how = os.open(path, os.O_WRONLY), "fdatasync"
        try:
            big, small = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 4096)  # page-aligned
            big.write(os.urandom(1 << 20))
            small.write(os.urandom(4096))
            sync = how == "fdatasync"

            def run(buf: mmap.mmap, offsets: Any) -> tuple[float, int]:
                n, t0 = 0, time.monotonic()
                while time.monotonic() - t0 < seconds:
                    try:
                        os.pwrite(fd, buf, next(offsets))
                    except OSError:
                        if n:
                            raise
                        raise OSError("the filesystem refuses direct writes") from None
                    n += 1
                    if sync and n % 8 == 0:
                        os.fdatasync(fd)
                if sync:
                    os.fdatasync(fd)
                return time.monotonic() - t0, n

            seq = (i * (1 << 20) % span for i in range(1 << 30))
            t, n = run(big, seq)
            bps = n * (1 << 20) / t
            rnd = (random.randrange(span >> 12) << 12 for _ in range(1 << 30))
            t, n = run(small, rnd)
            return {"bps": round(bps), "iops": round(n / t), "how": how,
                    "measured_at": time.time(), "dir": directory}
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
