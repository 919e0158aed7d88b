"""The QEMU argv builder is pure: table tests, no QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consolidator.vm.accel import Accel, KvmFacts, KvmKind, choose_accel
from consolidator.vm.qemu import (Boot, DiskLayer, Handles, LaunchSpec, Machine, RunPaths,
                                  TapNic, build_argv, choose_machine, guest_uuid,
                                  kernel_cmdline)

PATHS = RunPaths(Path("/s/guests/web/run"), Path("/s/guests/web/serial.log"))
TCG = Accel("tcg", "test")
KVM = Accel("kvm", "test")
BUILTIN = Boot("/img/vmlinuz", "/img/initrd.cpio", builtin=True)


H = Handles(qmp=3, console=4, agent=5, serial_log=6, kernel=7, initrd=8)


def handles(spec: LaunchSpec, **kw) -> Handles:
    """Descriptors as the supervisor would open them for ``spec``."""
    from dataclasses import replace
    n = len(spec.nics)
    base = dict(taps=tuple(range(20, 20 + n)),
                vhost=tuple(range(30, 30 + n)) if spec.vhost else (),
                disk=(DiskLayer(40, "qcow2"), DiskLayer(41, "raw")) if spec.boot.disk else ())
    base.update(kw)
    return replace(H, **base)


def argv_of(s: LaunchSpec, **kw) -> list[str]:
    return build_argv(s, handles(s, **kw))


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
    argv = argv_of(spec(accel=accel, pvm_host=facts.kind is KvmKind.PVM))
    assert opt(argv, "-accel") == [accel_arg]
    assert opt(argv, "-cpu") == (["host"] if cpu_host else ["qemu64,+arat"])


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
    argv = argv_of(spec())
    assert opt(argv, "-machine")[0].startswith("microvm,acpi=on")
    devices = opt(argv, "-device")
    assert any(d.startswith("virtio-balloon-device,") for d in devices)
    assert any(d.startswith("virtio-serial-device,") for d in devices)
    cmdline = opt(argv, "-append")[0]
    assert "tsc_early_khz=2100000" in cmdline and "pci=off" in cmdline
    assert "tsc=reliable" in cmdline.split()


def test_pc_gets_pci_devices_and_no_tsc_hint():
    argv = argv_of(spec(machine=Machine("pc", "t"), tsc_khz=None))
    assert opt(argv, "-machine") == ["pc"]
    assert "tsc_early_khz" not in opt(argv, "-append")[0]
    assert "tsc=reliable" not in opt(argv, "-append")[0]
    assert "tsc_early_khz" not in opt(argv, "-append")[0]


def test_balloon_options():
    (balloon,) = [d for d in opt(argv_of(spec()), "-device") if "balloon" in d]
    assert "deflate-on-oom=on" in balloon and "free-page-reporting=on" in balloon
    assert "id=balloon0" in balloon


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_memory_merge_off_keeps_guest_ram_away_from_ksm(machine):
    m = Machine(machine, "test")
    assert "mem-merge" not in opt(argv_of(spec(machine=m)), "-machine")[0]
    (arg,) = opt(argv_of(spec(machine=m, mem_merge=False)), "-machine")
    assert arg.startswith(machine) and arg.endswith(",mem-merge=off")


def test_basics_and_files():
    argv = argv_of(spec(uuid=guest_uuid(Path("/s/guests/web"))))
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert opt(argv, "-m") == ["256M"] and opt(argv, "-smp") == ["2"]
    assert opt(argv, "-uuid") == [guest_uuid(Path("/s/guests/web"))]
    assert "-pidfile" not in argv and "-runas" not in argv
    assert opt(argv, "-action") == ["panic=exit-failure"]
    assert any("name=org.consolidator.agent" in d for d in opt(argv, "-device"))


def test_qemu_is_handed_descriptors_and_names_no_path():
    """Every file and socket comes as a descriptor: the argv holds no host path at all."""
    argv = argv_of(spec(boot=Boot("/img/vmlinuz", "/img/initrd.cpio", disk="/s/d.qcow2",
                                  builtin=True),
                        nics=(TapNic("tap0", "52:54:00:00:00:01"),)))
    chardevs = opt(argv, "-chardev")
    assert "socket,id=qmp,fd=3,server=on,wait=off" in chardevs
    assert "socket,id=agent,fd=5,server=on,wait=off" in chardevs
    assert "socket,id=ser0,fd=4,server=on,wait=off,logfile=/dev/fdset/1,logappend=on" \
        in chardevs
    assert opt(argv, "-kernel") == ["/proc/self/fd/7"]
    assert opt(argv, "-initrd") == ["/proc/self/fd/8"]
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=20,vhost=off"]
    assert "fd=6,set=1" in opt(argv, "-add-fd")
    assert not [a for a in argv if "/s/" in a or "/img/" in a]


def test_the_disk_chain_is_spelt_out_base_first_and_read_only_below_the_top():
    boot = Boot("/img/vmlinuz", "/img/initrd.cpio", disk="/s/guests/web/disk.qcow2",
                builtin=True)
    argv = argv_of(spec(boot=boot), disk=(DiskLayer(40, "qcow2"), DiskLayer(41, "qcow2"),
                                          DiskLayer(42, "raw")))
    assert opt(argv, "-add-fd")[1:] == ["fd=42,set=12", "fd=41,set=11", "fd=40,set=10"]
    nodes = opt(argv, "-blockdev")
    assert nodes == [
        "driver=file,node-name=disk0-b2-file,filename=/dev/fdset/12,read-only=on",
        "driver=raw,node-name=disk0-b2,file=disk0-b2-file,read-only=on",
        "driver=file,node-name=disk0-b1-file,filename=/dev/fdset/11,read-only=on",
        "driver=qcow2,node-name=disk0-b1,file=disk0-b1-file,read-only=on,backing=disk0-b2",
        "driver=file,node-name=disk0-file,filename=/dev/fdset/10,discard=unmap",
        "driver=qcow2,node-name=disk0,file=disk0-file,discard=unmap,backing=disk0-b1",
        # two throttle filters over it: the guest's part of the host budget, then its own
        "driver=throttle,node-name=disk0-share,throttle-group=io-guest,file=disk0",
        "driver=throttle,node-name=disk0-io,throttle-group=io-disk0,file=disk0-share"]
    assert opt(argv, "-object")[-2:] == ["throttle-group,id=io-guest",
                                         "throttle-group,id=io-disk0"]
    assert "-drive" not in argv
    assert any(d.startswith("virtio-blk-device,drive=disk0-io") for d in opt(argv, "-device"))
    assert "consolidator.root=/dev/vda" in opt(argv, "-append")[0]


def test_sandbox_denies_privileges_always():
    argv = argv_of(spec())
    assert opt(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


@pytest.mark.parametrize("missing", [{"kernel": None}, {"initrd": None}, {"taps": ()},
                                     {"disk": ()}])
def test_a_missing_descriptor_is_an_error_not_a_path(missing):
    s = spec(boot=Boot("/k", "/i", disk="/d.qcow2", builtin=True),
             nics=(TapNic("tap0", "52:54:00:00:00:01"),))
    with pytest.raises(ValueError):
        build_argv(s, handles(s, **missing))


def test_the_uuid_stands_for_the_guests_directory():
    assert guest_uuid(Path("/s/guests/web")) == guest_uuid(Path("/s/guests/web"))
    assert guest_uuid(Path("/s/guests/web")) != guest_uuid(Path("/t/guests/web"))


def test_nics_and_their_cmdline():
    nics = (TapNic("tap0", "52:54:00:00:00:01", "10.77.0.10/24", "10.77.0.1"),
            TapNic("tap1", "52:54:00:00:00:02", None, None))
    argv = argv_of(spec(nics=nics, accel=KVM, vhost=True))
    netdevs = opt(argv, "-netdev")
    assert netdevs == ["tap,id=net0,fd=20,vhost=on,vhostfd=30",
                       "tap,id=net1,fd=21,vhost=on,vhostfd=31"]
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
    argv = argv_of(spec(boot=boot, machine=Machine("pc", "t")))
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


OPTION_FLAGS = ("-name", "-chardev", "-netdev", "-device", "-blockdev", "-mon", "-machine")
anything = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(name=anything, mac=anything, fmt=anything)
def test_no_value_adds_an_option(name, mac, fmt):
    """What is left in the argv of the guest's own values: its name, its MACs, and the
    formats of its disk layers. None of them can add an option, whatever its bytes."""
    boot = Boot("/k", "/i", disk="/d.qcow2", builtin=True)
    layers = (DiskLayer(40, "qcow2"), DiskLayer(41, "raw"))
    clean = argv_of(spec(name="web", boot=boot, nics=(TapNic("tap0", "52:54:00:00:00:01"),)),
                    disk=layers)
    dirty = argv_of(spec(name=name, boot=boot, nics=(TapNic("tap0", mac),)),
                    disk=(DiskLayer(40, "qcow2"), DiskLayer(41, fmt)))
    assert len(dirty) == len(clean)
    for flag in OPTION_FLAGS:
        for a, b in zip(opt(clean, flag), opt(dirty, flag)):
            assert [k for k, _ in qemu_opts(a)] == [k for k, _ in qemu_opts(b)], (a, b)
    # and each value comes back whole
    (named,) = opt(dirty, "-name")
    assert qemu_opts(named)[0] == ("guest", name)
    assert dict(qemu_opts(opt(dirty, "-blockdev")[1]))["driver"] == fmt


def test_a_disk_s_limits_are_its_group_s_and_none_leaves_the_filters_out():
    from consolidator.inventory.schema import DiskIo
    from consolidator.vm import throttle
    lim = throttle.disk_limits(DiskIo(write_bps="10MiB/s", iops=200, burst="40MiB"))
    assert {k: v for k, v in lim.items() if v and not k.endswith("-length")} == {
        "bps-write": 10 << 20, "bps-write-max": 40 << 20,
        "iops-total": 200, "iops-total-max": 800}
    assert all(lim[k] == 0 for k in ("bps-total", "bps-read", "iops-read", "bps-total-max"))
    boot = Boot("/img/vmlinuz", "/img/initrd.cpio", disk="/s/guests/web/disk.qcow2",
                builtin=True)
    argv = argv_of(spec(boot=boot, limits=(("disk0", tuple(lim.items())),)),
                   disk=(DiskLayer(40, "qcow2"),))
    assert ("throttle-group,id=io-disk0,x-bps-write=10485760,x-bps-write-max=41943040,"
            "x-iops-total=200,x-iops-total-max=800") in opt(argv, "-object")
    bare = argv_of(spec(boot=boot, limits=None), disk=(DiskLayer(40, "qcow2"),))
    assert not any("throttle" in a for a in bare)
    assert any(d.startswith("virtio-blk-device,drive=disk0,") or d.endswith("drive=disk0")
               for d in opt(bare, "-device"))
