"""The QEMU argv builder is pure: table tests, no QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.vm.accel import Accel, KvmFacts, KvmKind, choose_accel
from consolidator.vm.qemu import (Boot, LaunchSpec, Machine, RunPaths,
                                  TapNic, build_argv, choose_machine, kernel_cmdline)

PATHS = RunPaths(Path("/s/guests/web/run"), Path("/s/guests/web/serial.log"))
TCG = Accel("tcg", "test")
KVM = Accel("kvm", "test")
BUILTIN = Boot("/img/vmlinuz", "/img/initrd.cpio", builtin=True)


def spec(**kw) -> LaunchSpec:
    base = dict(name="web", vcpus=2, memory_mib=256, boot=BUILTIN, paths=PATHS, accel=TCG,
                machine=Machine("microvm", "test"), tsc_khz=2_100_000)
    base.update(kw)
    return LaunchSpec(**base)


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def kvm(kind: KvmKind, opens: bool = True) -> KvmFacts:
    return KvmFacts(kind, opens, 12 if opens else None, (), ())


@pytest.mark.parametrize("facts,pvm_image,accel_arg,cpu_host", [
    (kvm(KvmKind.HARDWARE), False, "kvm", True),
    (kvm(KvmKind.PVM), False, "tcg,tb-size=64", False),
    (kvm(KvmKind.PVM), True, "kvm", False),          # PVM: -cpu host aborts on MSR 0x10a
    (kvm(KvmKind.ABSENT, opens=False), False, "tcg,tb-size=64", False),
    (kvm(KvmKind.ABSENT, opens=False), True, "tcg,tb-size=64", False),
])
def test_accelerator(facts, pvm_image, accel_arg, cpu_host):
    accel = choose_accel(facts, image_pvm=pvm_image)
    argv = build_argv(spec(accel=accel, pvm_host=facts.kind is KvmKind.PVM))
    assert opt(argv, "-accel") == [accel_arg]
    assert (opt(argv, "-cpu") == ["host"]) is cpu_host


@pytest.mark.parametrize("accel,tsc,firmware,machine", [
    (TCG, 2_100_000, False, "microvm"),
    (TCG, None, False, "pc"),            # microvm under TCG needs the TSC rate
    (KVM, None, False, "microvm"),
    (TCG, 2_100_000, True, "pc"),        # firmware boot from disk
    (KVM, None, True, "pc"),
])
def test_machine_choice(accel, tsc, firmware, machine):
    assert choose_machine(accel, tsc_khz=tsc, firmware_boot=firmware).name == machine


def test_microvm_gets_mmio_devices_and_tsc_hint():
    argv = build_argv(spec())
    assert opt(argv, "-machine")[0].startswith("microvm,acpi=on")
    devices = opt(argv, "-device")
    assert any(d.startswith("virtio-balloon-device,") for d in devices)
    assert any(d.startswith("virtio-serial-device,") for d in devices)
    cmdline = opt(argv, "-append")[0]
    assert "tsc_early_khz=2100000" in cmdline and "pci=off" in cmdline


def test_pc_gets_pci_devices_and_no_tsc_hint():
    argv = build_argv(spec(machine=Machine("pc", "t"), tsc_khz=None))
    assert opt(argv, "-machine") == ["pc"]
    assert any(d.startswith("virtio-balloon-pci,") for d in opt(argv, "-device"))
    assert "tsc_early_khz" not in opt(argv, "-append")[0]


def test_balloon_options():
    (balloon,) = [d for d in opt(build_argv(spec()), "-device") if "balloon" in d]
    assert "deflate-on-oom=on" in balloon and "free-page-reporting=on" in balloon
    assert "id=balloon0" in balloon


def test_basics_and_files():
    argv = build_argv(spec())
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert opt(argv, "-m") == ["256M"] and opt(argv, "-smp") == ["2"]
    assert opt(argv, "-pidfile") == ["/s/guests/web/run/qemu.pid"]
    chardevs = opt(argv, "-chardev")
    assert any("path=/s/guests/web/run/qmp.sock" in c for c in chardevs)
    assert any("logfile=/s/guests/web/serial.log" in c and "console.sock" in c
               for c in chardevs)
    assert any("name=org.consolidator.agent" in d for d in opt(argv, "-device"))
    assert opt(argv, "-action") == ["panic=exit-failure"]


@pytest.mark.parametrize("runas,sandbox", [
    (None, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
    # -runas drops privileges after the filter is in place: set*id must stay allowed
    ("nobody", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"),
])
def test_sandbox_and_runas(runas, sandbox):
    argv = build_argv(spec(runas=runas))
    assert opt(argv, "-sandbox") == [sandbox]
    assert opt(argv, "-runas") == ([runas] if runas else [])


def test_overlay_drive():
    boot = Boot("/img/vmlinuz", "/img/initrd.cpio", disk="/s/guests/web/disk.qcow2",
                builtin=True)
    argv = build_argv(spec(boot=boot))
    (drive,) = opt(argv, "-drive")
    assert drive.startswith("file=/s/guests/web/disk.qcow2,") and "format=qcow2" in drive
    assert any(d.startswith("virtio-blk-device,drive=disk0") for d in opt(argv, "-device"))
    assert "consolidator.root=/dev/vda" in opt(argv, "-append")[0]


def test_nics_and_their_cmdline():
    nics = (TapNic("tap0", "52:54:00:00:00:01", "10.77.0.10/24", "10.77.0.1"),
            TapNic("tap1", "52:54:00:00:00:02", None, None))
    argv = build_argv(spec(nics=nics, accel=KVM, vhost=True))
    netdevs = opt(argv, "-netdev")
    assert netdevs[0].startswith("tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=on")
    assert "mac=52:54:00:00:00:02" in [d for d in opt(argv, "-device") if "net1" in d][0]
    cmd = kernel_cmdline(spec(nics=nics))
    assert "consolidator.net0=52:54:00:00:00:01,10.77.0.10/24,10.77.0.1" in cmd
    assert "consolidator.net1=52:54:00:00:00:02,," in cmd


def test_non_builtin_kernel_keeps_its_cmdline_after_the_serial_console():
    boot = Boot("/k/bzImage", "/k/initrd", cmdline="console=hvc0 root=/dev/vda")
    cmd = kernel_cmdline(spec(boot=boot, machine=Machine("pc", "t")))
    # the user's console comes last, so it is their /dev/console; ttyS0 still logs
    assert cmd == "console=ttyS0 console=hvc0 root=/dev/vda"


def test_a_parameter_that_only_contains_console_keeps_the_serial_console():
    """Regression: 'netconsole=...' contains 'console=', and dropped console=ttyS0."""
    boot = Boot("/k/bzImage", "/k/initrd", cmdline="netconsole=@/,@10.0.0.1/")
    cmd = kernel_cmdline(spec(boot=boot, machine=Machine("pc", "t")))
    assert cmd.split()[0] == "console=ttyS0" and cmd.endswith("netconsole=@/,@10.0.0.1/")


def test_firmware_boot_has_no_kernel():
    boot = Boot(None, None, disk="/d.qcow2")
    argv = build_argv(spec(boot=boot, machine=Machine("pc", "t")))
    assert "-kernel" not in argv and "-append" not in argv


# ------------------------------------------------------------ escaping (property)

def qemu_opts(text: str) -> list[tuple[str, str]]:
    """QEMU's own reading of an option string: split at single commas, ',,' is a comma;
    the first part may be an implied value (no '=')."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return [tuple(p.split("=", 1)) if "=" in p else ("", p) for p in parts]  # type: ignore


OPTION_FLAGS = ("-name", "-chardev", "-netdev", "-device", "-drive", "-mon", "-machine")
anything = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(name=anything, state=anything, mac=anything, tap=anything, disk=anything)
def test_no_value_adds_an_option(name, state, mac, tap, disk):
    clean = build_argv(spec(name="web", boot=Boot("/k", "/i", disk="/d.qcow2", builtin=True),
                            nics=(TapNic("tap0", "52:54:00:00:00:01"),)))
    root = Path("/s") / state
    dirty = build_argv(spec(name=name, boot=Boot("/k", "/i", disk=disk, builtin=True),
                            paths=RunPaths(root / "run", root / "serial.log"),
                            nics=(TapNic(tap, mac),)))
    assert len(dirty) == len(clean)
    for flag in OPTION_FLAGS:
        for a, b in zip(opt(clean, flag), opt(dirty, flag)):
            assert [k for k, _ in qemu_opts(a)] == [k for k, _ in qemu_opts(b)], (a, b)
    # and each value comes back whole
    (named,) = opt(dirty, "-name")
    assert qemu_opts(named)[0] == ("guest", name)
    (drive,) = opt(dirty, "-drive")
    assert dict(qemu_opts(drive))["file"] == disk
