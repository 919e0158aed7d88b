"""Real operating systems, the pure parts: OS profiles against Debian's real osinfo-db,
the devices and boot order in QEMU's argv, data disks in the plan, the cloud-init seed's
network-config, dnsmasq's command line and the firewall's DHCP rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from consolidator import osinfo
from consolidator.errors import InventoryError, PlanError
from consolidator.hostfacts import HostFacts
from consolidator.model import parse_fleet
from consolidator.net import dhcp, nft
from consolidator.plan import Impact, guest_changes
from consolidator.vm.accel import KvmFacts, KvmKind
from consolidator.vm.launch import VirtHost, launch_spec
from consolidator.vm import storage, throttle
from consolidator.vm.qemu import Boot, DataDisk, DiskLayer, Handles, RunPaths, build_argv
from consolidator.vm.seed import network_config

FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)
PATHS = RunPaths(Path("/s/guests/g/run"), Path("/s/guests/g/serial.log"))
TCG_HOST = VirtHost(KvmFacts(KvmKind.ABSENT, False, None, (), ()), 2_000_000, False)
KVM_HOST = VirtHost(KvmFacts(KvmKind.HARDWARE, True, 12, ("kvm", "kvm_intel"), ("vmx",)),
                    2_000_000, False)
ROOT = Path(__file__).resolve().parents[2]

needs_osinfo = pytest.mark.skipif(not osinfo.available(), reason="osinfo-db not installed")


def fleet(tmp_path: Path, guests: str, images: str = "", networks: str = ""):
    iso = tmp_path / "media.iso"
    iso.write_bytes(b"\0" * 4096)
    text = (f"images:\n  inst: {{cdrom: {iso}}}\n{images}"
            f"networks:\n  lan: {{subnet: 10.5.0.0/24, gateway: 10.5.0.1}}\n{networks}"
            f"guests:\n{guests}")
    return parse_fleet(text, "t.yaml", FACTS, base_dir=tmp_path)


def argv_for(intent, host: VirtHost = TCG_HOST, boot: Boot | None = None) -> str:
    boot = boot or Boot(None, None, cdrom="/m.iso", firmware=intent.firmware,
                        uefi_code="/c.fd", uefi_vars="/v.fd",
                        data=tuple(DataDisk(d.name, f"/d/{d.name}", d.bus)
                                   for d in intent.disks))
    spec = launch_spec(intent, boot, PATHS, host, taps=tuple(f"tap{i}" for i in
                                                             range(len(intent.nics))))
    h = Handles(qmp=3, console=4, agent=5, serial_log=6, uefi_code=7, uefi_vars=8,
                cdrom=9, data=tuple(range(50, 50 + len(intent.disks))),
                taps=tuple(range(20, 20 + len(intent.nics))))
    return " ".join(build_argv(spec, h))


# ------------------------------------------------------------------ profiles

@needs_osinfo
@pytest.mark.parametrize("short, machine, bus, nic, display, rtc, hyperv", [
    ("debian12", "q35", "virtio", "virtio", "none", "utc", False),
    ("centos7", "q35", "virtio", "virtio", "none", "utc", False),
    ("winxp", "pc", "ide", "e1000", "vga", "localtime", True),
])
def test_profiles_from_the_real_database(short, machine, bus, nic, display, rtc, hyperv):
    d = osinfo.device_defaults(osinfo.lookup(short))
    assert (d.machine, d.disk_bus, d.nic_model, d.display, d.rtc, d.hyperv) == \
        (machine, bus, nic, display, rtc, hyperv)


@needs_osinfo
def test_winxp_argv_is_the_hardware_of_its_day(tmp_path):
    f = fleet(tmp_path, "  xp:\n    image: inst\n    os: winxp\n    disks: [{size: 8GiB}]\n"
                        "    nics: [{network: lan, ip: 10.5.0.9}]\n")
    xp = f.guests["xp"]
    argv = argv_for(xp)
    assert "-machine pc " in argv and "-rtc base=localtime" in argv
    assert "-device e1000,netdev=net0" in argv and "virtio-net" not in argv
    assert "ide-hd,bus=ide.0,unit=0,drive=data-data0-io,serial=data0" in argv
    assert "ide-cd,bus=ide.0,unit=1,drive=cd0" in argv
    assert "-device VGA" in argv and "-vnc none" in argv
    assert "hv_relaxed" not in argv                   # Hyper-V enlightenments: KVM only
    assert "hv_relaxed,hv_vapic" in argv_for(xp, KVM_HOST)


@needs_osinfo
def test_debian12_and_centos7_argv_are_virtio_on_q35(tmp_path):
    f = fleet(tmp_path, "  a: {image: inst, os: debian12, firmware: uefi, disks: [{size: 1GiB}],"
                        " nics: [{network: lan, ip: 10.5.0.9}]}\n"
                        "  b: {image: inst, os: centos7, disks: [{size: 1GiB}]}\n")
    a, b = argv_for(f.guests["a"]), argv_for(f.guests["b"])
    assert "-machine q35,pflash0=fw-code,pflash1=fw-vars" in a
    assert "filename=/dev/fdset/2,read-only=on" in a      # OVMF's code: read-only
    assert "virtio-blk-pci,drive=data-data0-io,serial=data0,bootindex=0" in a
    assert "virtio-net-pci,netdev=net0" in a and "-rtc" not in a
    assert "-machine q35 " in b and "pflash" not in b     # centos7: BIOS
    assert "ide-cd,bus=ide.0,drive=cd0,bootindex=1" in b  # the q35's AHCI


@needs_osinfo
def test_an_explicit_key_beats_the_profile(tmp_path):
    f = fleet(tmp_path, "  a: {image: inst, os: winxp, machine: q35, disk_bus: sata, rtc: utc,"
                        " display: none, disks: [{size: 1GiB}],"
                        " nics: [{network: lan, ip: 10.5.0.9, model: rtl8139}]}\n")
    g = f.guests["a"]
    assert (g.machine, g.disk_bus, g.rtc, g.display, g.nics[0].model) == \
        ("q35", "sata", "utc", "none", "rtl8139")


@needs_osinfo
def test_an_unknown_os_says_did_you_mean(tmp_path):
    with pytest.raises(InventoryError) as ei:
        fleet(tmp_path, "  a: {image: inst, os: centos-7}\n")
    (p,) = ei.value.problems
    assert p.code == "I015" and p.path == "guests.a.os"
    assert "did you mean 'centos7'" in (p.hint or "")


def test_the_shipped_debian12_entry_derives_from_the_database(tmp_path):
    extra = Path(osinfo.__file__).with_name("osinfo-extra")
    assert (extra / "debian-12.xml").exists()
    if osinfo.available():
        p = osinfo.lookup("debian12")
        assert p.family == "linux" and osinfo.VIRTIO_BLOCK & p.devices


# --------------------------------------------------------------- boot order

def test_boot_order_and_buses_on_pc(tmp_path):
    f = fleet(tmp_path, "  a: {image: inst, machine: pc, disk_bus: sata, boot: [cdrom, disk],"
                        " disks: [{size: 1GiB}, {size: 2GiB, bus: ide, name: old}]}\n")
    argv = argv_for(f.guests["a"])
    assert "-device ahci,id=ahci0" in argv
    assert "ide-hd,bus=ahci0.0,drive=data-data0-io,serial=data0,bootindex=1" in argv
    assert "ide-hd,bus=ide.0,unit=0,drive=data-old-io,serial=old" in argv
    assert "ide-cd,bus=ide.0,unit=1,drive=cd0,bootindex=0" in argv


def test_a_kernel_boot_has_no_boot_order():
    f = parse_fleet("guests:\n  a: {disks: [{size: 1GiB}]}\n", "t.yaml", FACTS)
    assert f.guests["a"].boot == () and f.guests["a"].firmware is None


# --------------------------------------------------------------- data disks

def test_growing_a_data_disk_is_live_and_shrinking_is_refused(tmp_path):
    def g(size: str):
        return fleet(tmp_path, f"  a: {{image: inst, disks: [{{size: {size}}}]}}\n").guests["a"]
    (c,) = guest_changes(g("1GiB"), g("2GiB"))
    assert (c.field, c.impact) == ("disks.data0.size", Impact.LIVE)
    with pytest.raises(PlanError, match="shrink"):
        guest_changes(g("2GiB"), g("1GiB"))
    more = fleet(tmp_path, "  a: {image: inst, disks: [{size: 1GiB}, {size: 1GiB}]}\n")
    (c,) = guest_changes(g("1GiB"), more.guests["a"])
    assert c.impact is Impact.RESTART


def test_one_list_of_drives_names_each_disk_for_qemu_its_limits_and_backups(tmp_path):
    (tmp_path / "root.raw").write_bytes(b"\0" * 4096)
    intent = fleet(tmp_path, "  a:\n    image: os\n    disk_io: {write_bps: 8MiB/s}\n"
                             "    disks: [{size: 1GiB}, {size: 2GiB, name: logs,"
                             " io: {iops: 300}}]\n",
                   images=f"  os: {{disk: {tmp_path / 'root.raw'}, firmware: bios}}\n"
                   ).guests["a"]
    drives = intent.drives()
    assert [(d.node, d.file, d.label) for d in drives] == [
        ("disk0", "disk.qcow2", "disk"), ("data-data0", "data-data0.qcow2", "data-data0"),
        ("data-logs", "data-logs.qcow2", "data-logs")]
    # QEMU: a qcow2 node and its own throttle group for each drive, by the same name
    boot = Boot(None, None, disk="/s/guests/a/disk.qcow2", firmware="bios",
                data=tuple(DataDisk(d.name, f"/d/{d.name}", d.bus) for d in intent.disks))
    spec = launch_spec(intent, boot, PATHS, TCG_HOST)
    argv = build_argv(spec, Handles(qmp=3, console=4, agent=5, serial_log=6,
                                    disk=(DiskLayer(40, "qcow2"),), data=(50, 51)))
    for d in drives:
        assert f"driver=qcow2,node-name={d.node}," in " ".join(argv), d
        assert f"throttle-group,id=io-{d.node}" in " ".join(argv), d
    assert throttle.guest_limits(intent) == {
        "disk0": throttle.disk_limits(intent.disk_io),
        "data-data0": throttle.disk_limits(None),
        "data-logs": throttle.disk_limits(intent.disks[1].io)}
    assert "x-bps-write=8388608" in " ".join(argv) and "x-iops-total=300" in " ".join(argv)
    # backups and snapshots: the same drives, at their files in the guest's dir
    assert storage.guest_disks(intent, tmp_path / "g") == tuple(
        storage.DiskNode(d.node, tmp_path / "g" / d.file, d.label) for d in drives)


# ----------------------------------------------------------- cloud-init seed

def test_network_config_from_the_inventory(tmp_path):
    f = fleet(tmp_path, "  a:\n    image: inst\n    cloud_init: {user_data: {runcmd: [[true]]}}\n"
                        "    nics: [{network: lan, ip: 10.5.0.9}, {network: back}]\n",
              networks="  back: {subnet: 10.6.0.0/24}\n")
    a = f.guests["a"]
    assert a.cloud_init.startswith("#cloud-config\n")
    cfg = network_config(a.nics, {"lan": "10.5.0.1", "back": "10.6.0.254"})
    eth0, eth1 = cfg["ethernets"]["eth0"], cfg["ethernets"]["eth1"]
    assert eth0["match"]["macaddress"] == a.nics[0].mac
    assert eth0["addresses"] == ["10.5.0.9/24"]
    assert eth0["routes"] == [{"to": "0.0.0.0/0", "via": "10.5.0.1"}]
    assert eth0["nameservers"] == {"addresses": ["10.5.0.1"], "search": ["lan"]}
    # no address declared: consolidator allocated one, and the seed gives it like the other
    assert a.nics[1].allocated and eth1["addresses"] == [f"{a.nics[1].ip}/24"]
    assert "routes" not in eth1


@pytest.mark.skipif(not shutil.which("isoinfo") and not shutil.which("xorriso"),
                    reason="no ISO lister")
def test_the_seed_is_an_iso_labelled_cidata(tmp_path):
    from consolidator.vm.seed import build
    f = fleet(tmp_path, "  a: {image: inst, cloud_init: {user_data: {runcmd: [[true]]}}}\n")
    iso = tmp_path / "seed.iso"
    build(f.guests["a"], "a-1234", {}, iso)
    out = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info", "-find", "/"],
                         capture_output=True, text=True).stdout
    assert "Volume Id    : cidata" in out
    for name in ("meta-data", "network-config", "user-data"):
        assert f"/{name}'" in out


# ---------------------------------------------------------- address allocation

def test_allocated_addresses_stay_put(tmp_path):
    from consolidator.inventory.derive import allocate_addresses
    from consolidator.inventory.schema import GuestSpec, NetworkSpec
    nets = {"lan": NetworkSpec(subnet="10.5.0.0/29", gateway="10.5.0.1"),
            "iso": NetworkSpec(subnet="10.6.0.0/24"), "off": NetworkSpec(
                subnet="10.7.0.0/24", dhcp=False)}

    def guests(*names: str, declare: str | None = None) -> dict[str, GuestSpec]:
        out = {n: GuestSpec(nics=[{"network": "lan"}, {"network": "off"}]) for n in names}
        if declare:
            out["d"] = GuestSpec(nics=[{"network": "lan", "ip": declare}])
        return out
    one = allocate_addresses("t", nets, guests("a", "b"), {})
    assert set(one) == {("a", 0), ("b", 0)}                 # none on a dhcp: false network
    assert {one[("a", 0)], one[("b", 0)]} <= {f"10.5.0.{i}" for i in range(2, 7)}
    # more guests: the first two keep theirs, given what was applied before
    more = allocate_addresses("t", nets, guests("a", "b", "c", "e"), one)
    assert more[("a", 0)] == one[("a", 0)] and more[("b", 0)] == one[("b", 0)]
    assert len(set(more.values())) == 4
    # a declared address wins; the allocated one it collides with moves, nothing else
    taken = one[("a", 0)]
    moved = allocate_addresses("t", nets, guests("a", "b", declare=taken), one)
    assert moved[("a", 0)] != taken and moved[("b", 0)] == one[("b", 0)]
    iso = allocate_addresses("t", nets, {"x": GuestSpec(nics=[{"network": "iso"}])}, {})
    assert iso[("x", 0)] not in ("10.6.0.254", "10.6.0.0", "10.6.0.255")


# ------------------------------------------------------------------ dnsmasq

def test_dnsmasq_serves_static_leases_and_names_only(tmp_path):
    f = fleet(tmp_path, "  web: {nics: [{network: lan, ip: 10.5.0.10}]}\n"
                        "  db: {nics: [{network: back, ip: 10.6.0.30}]}\n",
              networks="  back: {subnet: 10.6.0.0/24}\n")
    hosts = [dhcp.Host("web", f.guests["web"].nics[0].mac, "10.5.0.10")]
    lan = dhcp.service("t", "tfab", "lan", f.networks["lan"], hosts)
    a = dhcp.argv(lan, Path("/s/networks/lan.leases"))
    assert lan.netns == "tfab" and lan.interface == "t-lan" and lan.address == "10.5.0.1"
    assert "--dhcp-range=10.5.0.0,static,255.255.255.0,1h" in a
    assert f"--dhcp-host={hosts[0].mac},10.5.0.10,web,infinite" in a
    assert "--host-record=web.lan,web,10.5.0.10" in a
    assert "--no-resolv" in a and "--dhcp-option=option:router,10.5.0.1" in a
    assert any(x.startswith("--user=") for x in a)
    back = dhcp.service("t", "tfab", "back", f.networks["back"], [])
    b = dhcp.argv(back, Path("/l"))
    # isolated: its own netns, its last address, no default route
    assert back.netns == "t-back.dhcp" and back.address == "10.6.0.254"
    assert "--dhcp-option=option:router" in b and "--listen-address=10.6.0.254" in b


def test_the_guard_lets_a_dhcp_client_through_and_nothing_else_from_zero():
    rules = nft.port_rules(nft.PortRule("t.web.0", "52:54:00:00:00:01", ("10.5.0.10",)))
    text = str(rules)
    assert "'0.0.0.0'" in text and "255.255.255.255" in text
    doc = nft.filter_table("t", [nft.NetRule("lan", "t-lan", "10.5.0.0/24", dhcp=True)])
    assert "served" in str(doc) and "[53, 67]" in str(doc)


# ------------------------------------------------------------------ example

def test_the_real_os_example_validates(tmp_path):
    text = (ROOT / "examples" / "real-os.yaml").read_text()
    for name in ("bookworm-uefi", "bullseye-bios"):
        d = tmp_path / f"debian-{name}-XXXXXXXXXXXX"
        d.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"),
                        "1G"], check=True)
    text = text.replace("/var/lib/consolidator/images", str(tmp_path))
    f = parse_fleet(text, "real-os.yaml", FACTS, base_dir=tmp_path)
    assert f.guests["web"].firmware == "uefi" and f.guests["web"].machine == "q35"
    assert f.guests["old"].nics[0].model == "e1000" and f.guests["old"].disk_bus == "sata"


def test_plan_says_a_user_data_change_waits_for_a_new_instance(tmp_path):
    from consolidator.model import GuestState
    from consolidator.plan import Observed, ObservedGuest, plan

    def f(text: str):
        return fleet(tmp_path, f"  a: {{image: inst, cloud_init: {{user_data: {text}}}}}\n")
    old, new = f("{runcmd: [[a]]}"), f("{runcmd: [[b]]}")
    observed = Observed(instance=old.instance, host=old.host, networks=dict(old.networks),
                        guests={"a": ObservedGuest(old.guests["a"], GuestState.RUNNING)})
    p = plan(new, observed)
    (a,) = p.actions
    assert a.kind == "update" and a.impact is Impact.LIVE
    assert any("takes effect only when the guest is replaced" in n for n in p.notes)


def test_memory_merge_false_reaches_qemu_and_yaml_off_is_off(tmp_path):
    """From the inventory's text to QEMU's argv (a stop lost ``merge`` on the way), and
    YAML 1.1's bare ``off``/``on`` (booleans to PyYAML) read as the words."""
    f = fleet(tmp_path, "  a: {image: inst, memory: {max: 256MiB, merge: false}}\n"
                        "  b: {image: inst}\n")
    assert f.guests["a"].memory.merge is False and f.guests["b"].memory.merge is True
    assert ",mem-merge=off" in argv_for(f.guests["a"])
    assert "mem-merge" not in argv_for(f.guests["b"])
    for word, mode in (("off", "off"), ("on", "on"), ("auto", "auto")):
        g = parse_fleet(f"host: {{ksm: {word}}}\nguests:\n  a: {{}}\n", "t.yaml", FACTS)
        assert g.host.ksm == mode
