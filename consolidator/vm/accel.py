"""Which accelerator a guest gets, and why.

Probing (:func:`probe_kvm`) reads the host; choosing (:func:`choose_accel`) is
pure. The rule: KVM only when ``/dev/kvm`` opens **and** it is hardware KVM
(``kvm_intel``/``kvm_amd``, vmx/svm in /proc/cpuinfo). On PVM hosts
(``kvm_pvm``) stock guest kernels hang before their first printk under
``-accel kvm``, so guests get TCG unless their image is marked ``pvm: true``.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

from .. import linux

KVM_GET_API_VERSION = 0xAE00


class KvmKind(enum.StrEnum):
    HARDWARE = "hardware"    # kvm_intel / kvm_amd with vmx / svm
    PVM = "pvm"              # kvm_pvm: paravirtual KVM nested in a VM without vmx/svm
    ABSENT = "absent"        # no /dev/kvm, or it does not open
    UNKNOWN = "unknown"      # opens, but neither hardware modules nor PVM are visible


@dataclass(frozen=True)
class KvmFacts:
    kind: KvmKind
    opens: bool
    api_version: int | None
    modules: tuple[str, ...]          # kvm modules loaded: kvm, kvm_intel, kvm_amd, kvm_pvm
    cpu_flags: tuple[str, ...]        # vmx / svm / hypervisor as seen in /proc/cpuinfo
    error: str | None = None          # why /dev/kvm did not open

    def explain(self) -> str:
        if self.kind is KvmKind.HARDWARE:
            return (f"hardware KVM ({', '.join(m for m in self.modules if m != 'kvm')}, "
                    f"{'/'.join(f for f in self.cpu_flags if f in ('vmx', 'svm'))}), "
                    f"API {self.api_version}")
        if self.kind is KvmKind.PVM:
            return (f"PVM KVM (kvm_pvm, no vmx/svm in /proc/cpuinfo), API {self.api_version}: "
                    "stock guest kernels hang under -accel kvm here")
        if self.kind is KvmKind.ABSENT:
            return f"no usable /dev/kvm ({self.error or 'absent'})"
        return f"/dev/kvm opens (API {self.api_version}) but the KVM flavour is unknown"


def _modules() -> tuple[str, ...]:
    found = []
    for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{m}"):
            found.append(m)
    return tuple(found)


def _cpu_flags() -> tuple[str, ...]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return tuple(sorted(flags & {"vmx", "svm", "hypervisor"}))


def probe_kvm(dev: str = "/dev/kvm") -> KvmFacts:
    mods, flags = _modules(), _cpu_flags()
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        reason = {errno.ENOENT: "no such device", errno.EACCES: "permission denied"}.get(
            e.errno, e.strerror)
        return KvmFacts(KvmKind.ABSENT, False, None, mods, flags, f"{dev}: {reason}")
    try:
        api = linux.ioctl_int(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return KvmFacts(KvmKind.ABSENT, True, None, mods, flags,
                        f"KVM_GET_API_VERSION failed: {e.strerror}")
    finally:
        os.close(fd)
    return KvmFacts(classify(mods, flags), True, api, mods, flags)


def classify(modules: tuple[str, ...], cpu_flags: tuple[str, ...]) -> KvmKind:
    """Pure: what kind of KVM the loaded modules and CPU flags indicate."""
    if "kvm_pvm" in modules and not ({"kvm_intel", "kvm_amd"} & set(modules)):
        return KvmKind.PVM
    if ({"kvm_intel", "kvm_amd"} & set(modules)) and ({"vmx", "svm"} & set(cpu_flags)):
        return KvmKind.HARDWARE
    if "kvm_pvm" in modules:
        return KvmKind.PVM
    return KvmKind.UNKNOWN


@dataclass(frozen=True)
class Accel:
    name: str        # "kvm" or "tcg"
    reason: str


def choose_accel(kvm: KvmFacts, *, image_pvm: bool = False) -> Accel:
    """Pure: KVM on hardware KVM, or on PVM for images marked ``pvm: true``; TCG otherwise."""
    if not kvm.opens:
        return Accel("tcg", f"TCG: {kvm.explain()}")
    if kvm.kind is KvmKind.HARDWARE:
        return Accel("kvm", f"KVM: {kvm.explain()}")
    if kvm.kind is KvmKind.PVM:
        if image_pvm:
            return Accel("kvm", "KVM: PVM host, and the image is marked pvm: true")
        return Accel("tcg", "TCG: this host's KVM is PVM (kvm_pvm, no vmx/svm), under which "
                            "stock guest kernels hang; mark an image pvm: true if its kernel "
                            "supports PVM")
    return Accel("tcg", f"TCG: {kvm.explain()}; not trusting it with guests")
