from __future__ import annotations

import pytest

from consolidator.vm.accel import KvmFacts, KvmKind, choose_accel, classify


@pytest.mark.parametrize("modules,flags,kind", [
    (("kvm", "kvm_intel"), ("vmx",), KvmKind.HARDWARE),
    (("kvm", "kvm_amd"), ("svm", "hypervisor"), KvmKind.HARDWARE),
    (("kvm", "kvm_pvm"), ("hypervisor",), KvmKind.PVM),
    (("kvm", "kvm_pvm"), (), KvmKind.PVM),
    (("kvm", "kvm_intel"), (), KvmKind.UNKNOWN),        # module without the CPU feature
    ((), (), KvmKind.UNKNOWN),
])
def test_classify(modules, flags, kind):
    assert classify(modules, flags) is kind


def facts(kind: KvmKind, opens: bool = True) -> KvmFacts:
    return KvmFacts(kind, opens, 12 if opens else None, ("kvm",), (), None if opens else "x")


@pytest.mark.parametrize("kind,opens,pvm_image,accel,why", [
    (KvmKind.HARDWARE, True, False, "kvm", "hardware"),
    (KvmKind.HARDWARE, True, True, "kvm", "hardware"),
    (KvmKind.PVM, True, False, "tcg", "PVM"),
    (KvmKind.PVM, True, True, "kvm", "pvm: true"),
    (KvmKind.ABSENT, False, False, "tcg", "no usable /dev/kvm"),
    (KvmKind.ABSENT, False, True, "tcg", "no usable /dev/kvm"),
    (KvmKind.UNKNOWN, True, False, "tcg", "unknown"),
])
def test_choose_accel(kind, opens, pvm_image, accel, why):
    a = choose_accel(facts(kind, opens), image_pvm=pvm_image)
    assert a.name == accel
    assert why in a.reason
