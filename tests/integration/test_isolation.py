"""Isolation with real kernel objects: cgroups, netns, bridges, taps, nftables, QEMU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from consolidator.daemon.executor import nic_wiring
from consolidator.errors import NetError
from consolidator.net import names
from consolidator.net import netns as ns
from consolidator.net import nft

from .env import Env, fleet_env, leftovers

pytestmark = pytest.mark.usefixtures("need_root", "tiny_image")


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Env:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with fleet_env(tmp_path_factory.mktemp("three")) as env:
        env.start("web", "app", "db")
        yield env
    assert leftovers(env.instance) == []


def ping(env: Env, guest: str, ip: str) -> bool:
    return env.sh(guest, f"ping -c 1 -W 3 {ip}")[0] == 0


def fetch(env: Env, guest: str, url: str) -> str | None:
    rc, out = env.sh(guest, f"timeout 5 wget -q -O - {url}")
    return out if rc == 0 else None


# ---------------------------------------------------------------------- wiring

def test_guests_on_one_network_reach_each_other(three):
    assert ping(three, "web", "10.77.0.20")
    assert ping(three, "app", "10.77.0.10")
    assert fetch(three, "web", "http://10.77.0.20/health") == "ok"
    assert "name=web" in fetch(three, "app", "http://10.77.0.10/")
    assert ping(three, "app", "10.78.0.30") and ping(three, "db", "10.78.0.20")


def test_isolated_network_reaches_neither_the_other_network_nor_the_fabric(three):
    for target in ("10.77.0.10", "10.77.0.20", "10.77.0.1"):
        assert not ping(three, "db", target), target
    # nothing on the isolated bridge answers for the host: no address, IPv6 off
    with ns.iproute(three.fabric) as ipr:
        br = ipr.link_lookup(ifname=names.bridge(three.instance, "back"))[0]
        assert ipr.get_addr(index=br) == ()


def test_gateway_reaches_guests_on_its_network(three):
    r = ns.run(three.fabric, ["busybox", "ping", "-c", "1", "-W", "3", "10.77.0.10"],
               check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    r = ns.run(three.fabric, ["busybox", "wget", "-q", "-O", "-", "http://10.77.0.20/health"],
               check=False)
    assert r.stdout == "ok\n"
    assert ping(three, "web", "10.77.0.1")


# --------------------------------------------------------------- where QEMU runs

def test_every_qemu_thread_is_in_its_guest_cgroup_and_its_own_netns(three):
    host_ns = os.stat("/proc/self/ns/net").st_ino
    seen_ns = set()
    for name, g in three.guests.items():
        want = {str(p) for p in three.executor.cgroups.unique_dirs("guests", name)}
        tasks = list(Path(f"/proc/{g.pid}/task").iterdir())
        assert len(tasks) > 3            # main loop, vCPU, RCU, workers...
        for task in tasks:
            lines = (task / "cgroup").read_text().splitlines()
            for line in lines:
                _, ctrls, path = line.split(":", 2)
                if ctrls in ("cpu", "cpuacct", "cpuset", "memory", "pids"):
                    assert any(w.endswith(path) for w in want), (task, line)
        net = os.stat(f"/proc/{g.pid}/ns/net").st_ino
        assert net != host_ns
        seen_ns.add(net)
        # the QEMU netns holds only its taps and their veth ends
        with ns.iproute(names.guest_netns(three.instance, name)) as ipr:
            ifs = sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links())
        n = len(three.fleet.guests[name].nics)
        assert ifs == sorted(["lo"] + [f"tap{i}" for i in range(n)] +
                             [f"vnic{i}" for i in range(n)] + [f"br{i}" for i in range(n)])
    assert len(seen_ns) == 3


# --------------------------------------------------------------- anti-spoofing

def _fabric_neigh(env: Env, ip: str) -> str | None:
    with ns.iproute(env.fabric) as ipr:
        for n in ipr.get_neighbours(family=2):
            if n.get_attr("NDA_DST") == ip:
                return n.get_attr("NDA_LLADDR")
    return None


def test_a_guest_with_another_guests_ip_or_a_forged_mac_reaches_no_one(three):
    nic = "$(grep -l 52:54 /sys/class/net/*/address | head -1 | cut -d/ -f5)"
    web_mac = three.fleet.guests["web"].nics[0].mac
    app_mac = three.fleet.guests["app"].nics[0].mac

    def readdress(ip: str) -> None:
        rc, out = three.sh("web", f"ip addr flush dev {nic} && ip addr add {ip}/24 dev {nic} "
                                  f"&& ip route add default via 10.77.0.1")
        assert rc == 0, out

    assert ping(three, "web", "10.77.0.1")
    try:
        readdress("10.77.0.20")                      # app's address
        assert not ping(three, "web", "10.77.0.1")
        assert _fabric_neigh(three, "10.77.0.20") in (None, app_mac)   # no ARP poisoning
        readdress("10.77.0.99")                      # an address no one declared
        assert not ping(three, "web", "10.77.0.1")
        assert not ping(three, "web", "10.77.0.20")
    finally:
        readdress("10.77.0.10")
    assert ping(three, "web", "10.77.0.1")
    rc, _ = three.sh("web", f"ip link set {nic} address 52:54:de:ad:be:ef")
    assert rc == 0
    try:
        assert not ping(three, "web", "10.77.0.1")
        assert not ping(three, "web", "10.77.0.20")
    finally:
        three.sh("web", f"ip link set {nic} address {web_mac}")
    assert ping(three, "web", "10.77.0.20") and ping(three, "web", "10.77.0.1")
    # the rules are there, one chain per port
    table = nft.list_table(three.fabric, "bridge", names.nft_guard_table(three.instance))
    chains = {x["chain"]["name"] for x in table if "chain" in x}
    assert {"pre", "p_" + names.guest_port(three.instance, "web", 0).replace(".", "_")} <= chains


NIC_OF = "$(grep -l {mac} /sys/class/net/*/address | head -1 | cut -d/ -f5)"


@contextlib.contextmanager
def side_netns(env: Env, suffix: str, ifname: str, inner: str, ip: str,
               wire: Callable[[Any, int], None]) -> Iterator[str]:
    """A netns of the test's own (the instance's prefix: gc finds it if we fail), joined
    to the fabric by a veth: ``inner`` at ``ip``/24 inside, ``ifname`` in the fabric,
    which ``wire(fabric, index)`` connects."""
    netns = f"{env.instance}-{suffix}"
    ns.create(netns)
    try:
        with ns.iproute(env.fabric) as fab:
            fab.link("add", ifname=ifname, kind="veth",
                     peer={"ifname": inner, "net_ns_fd": netns})
            wire(fab, fab.link_lookup(ifname=ifname)[0])
        with ns.iproute(netns) as ipr:
            idx = ipr.link_lookup(ifname=inner)[0]
            ipr.addr("add", index=idx, address=ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
        yield netns
    finally:
        with ns.iproute(env.fabric) as fab:
            for idx in fab.link_lookup(ifname=ifname):
                fab.link("del", index=idx)
        ns.remove(netns)


def scratch_port(env: Env, ifname: str, ip: str) -> contextlib.AbstractContextManager[str]:
    """Something on the front network that is not a guest: a port of the front bridge
    named ``ifname``, outside the guard's map."""
    def wire(fab: Any, idx: int) -> None:
        br = fab.link_lookup(ifname=names.bridge(env.instance, "front"))[0]
        fab.link("set", index=idx, master=br, state="up")
    return side_netns(env, "x", ifname, "x0", ip, wire)


def _dhcp_offer_reaches_the_fabric(env: Env) -> bool:
    """udhcpc on the front bridge, in the fabric netns: does any server answer?"""
    r = ns.run(env.fabric, ["busybox", "udhcpc", "-i", names.bridge(env.instance, "front"),
                            "-n", "-q", "-f", "-t", "2", "-T", "1", "-A", "1",
                            "-s", "/bin/true"], check=False, timeout=30)
    return r.returncode == 0


def udhcpd_conf(nic: str, me: str) -> list[str]:
    return [f"interface {nic}", "start 10.77.0.100", "end 10.77.0.110",
            "lease_file /tmp/udhcpd.leases", f"option router {me}"]


def test_a_guest_cannot_answer_dhcp(three):
    # The method works: a DHCP server on the network that is not a guest is heard.
    with scratch_port(three, f"h{three.instance[1:]}", "10.77.0.250") as scratch:
        path = Path(f"/tmp/{scratch}-udhcpd.conf")
        path.write_text("\n".join(udhcpd_conf("x0", "10.77.0.250")) + "\n")
        server = subprocess.Popen(["ip", "netns", "exec", scratch, "busybox", "udhcpd", "-f",
                                   str(path)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            assert _dhcp_offer_reaches_the_fabric(three)
        finally:
            server.kill()
            server.wait()
            path.unlink()
    # A guest running the same server is not: its replies (UDP source port 67) drop.
    nic = NIC_OF.format(mac=three.fleet.guests["web"].nics[0].mac)
    lines = " ".join(f'"{x}"' for x in udhcpd_conf(nic, "10.77.0.10"))   # $(...) expands
    rc, out = three.sh("web", f"printf '%s\\n' {lines} > /tmp/udhcpd.conf && "
                              "touch /tmp/udhcpd.leases && "
                              "(udhcpd -f /tmp/udhcpd.conf >/dev/null 2>&1 &) && sleep 1 && "
                              "pidof udhcpd")
    assert rc == 0, out
    try:
        assert not _dhcp_offer_reaches_the_fabric(three)
    finally:
        three.sh("web", "killall udhcpd")


def test_a_spoofed_arp_sender_does_not_poison_the_gateway(three):
    nic = NIC_OF.format(mac=three.fleet.guests["web"].nics[0].mac)
    web_mac = three.fleet.guests["web"].nics[0].mac
    rc, out = three.sh("web", f"arping -U -c 2 -I {nic} -s 10.77.0.20 10.77.0.1; "
                              f"arping -A -c 2 -I {nic} -s 10.77.0.20 10.77.0.1; true")
    assert rc == 0, out
    assert _fabric_neigh(three, "10.77.0.20") != web_mac
    assert ping(three, "app", "10.77.0.1")


def test_a_port_joins_its_bridge_only_after_its_rules_are_in(three):
    """The rules go in first. Here they cannot (an address nft refuses, which validation
    would have caught): the port was made, but never joined its bridge nor came up, not
    for an instant, as the fabric's own netlink events show."""
    import select
    import socket
    import struct

    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    from consolidator.net.fabric import NicWiring
    from consolidator.vm.placement import in_netns

    RTMGRP_LINK, RTM_NEWLINK = 1, 16

    def monitor() -> socket.socket:                     # made in, and so of, the fabric netns
        m = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)      # NETLINK_ROUTE
        m.bind((0, RTMGRP_LINK))
        return m

    port = names.guest_port(three.instance, "late", 0)
    seen = []
    with in_netns(ns.path(three.fabric), monitor) as mon:
        with pytest.raises(NetError, match="nft"):
            three.executor.fabric.wire_guest("late", [NicWiring(0, "front", "52:54:00:0a:0b:0c",
                                                                ("999.0.0.1",))])
        while select.select([mon], [], [], 0.5)[0]:
            data, off = mon.recv(1 << 20), 0
            while off < len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == RTM_NEWLINK:
                    msg = ifinfmsg(data[off:off + length])
                    msg.decode()
                    if msg.get_attr("IFLA_IFNAME") == port:
                        seen.append((msg.get_attr("IFLA_MASTER"), msg["flags"] & 1))
                off += (length + 3) & ~3
    assert seen, "the monitor saw the port made (the positive control)"
    assert all(master is None and not up for master, up in seen), seen
    with ns.iproute(three.fabric) as fab:
        assert not fab.link_lookup(ifname=port), "and the half-made port is gone"
    # what the other guests have is untouched
    assert ping(three, "web", "10.77.0.20")


def test_a_port_of_the_instance_without_rules_drops_everything(three):
    # a port named like a guest's that the guard does not know: nothing gets through
    with scratch_port(three, names.guest_port(three.instance, "rogue", 9), "10.77.0.240") \
            as scratch:
        r = ns.run(scratch, ["busybox", "ping", "-c", "2", "-W", "2", "10.77.0.1"],
                   check=False)
        assert r.returncode != 0
    # the same wiring under a name that is not the instance's passes (not our port)
    with scratch_port(three, f"h{three.instance[1:]}", "10.77.0.240") as scratch:
        r = ns.run(scratch, ["busybox", "ping", "-c", "2", "-W", "2", "10.77.0.1"],
                   check=False)
        assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------- settings

def test_cgroup_settings_read_back_and_change_live(three):
    cg = three.executor.cgroups
    web = three.fleet.guests["web"]
    assert cg.read("web", "cpu", "cpu.shares") == "1024"
    assert cg.read("web", "cpu", "cpu.cfs_quota_us") == "75000"
    assert cg.read("web", "cpu", "cpu.cfs_period_us") == "100000"
    # 256 MiB + 96 MiB QEMU + 64 MiB tb-size + 2 %, page aligned (test_cgroup_settings)
    assert int(cg.read("web", "memory", "memory.limit_in_bytes")) == 441573376
    assert cg.read("app", "cpu", "cpu.shares") == "2048"
    assert cg.read("app", "cpu", "cpu.cfs_quota_us") == "-1"
    pid = three.guests["web"].pid
    from consolidator.inventory.schema import CpuSpec
    changed = three.executor.apply_live(web.model_copy(update={"cpu": CpuSpec(shares=4096)}))
    assert "cpu/cpu.shares=4096" in changed
    assert cg.read("web", "cpu", "cpu.shares") == "4096"
    assert three.guests["web"].pid == pid
    assert three.executor.apply_live(web) != []        # and back
    assert three.executor.apply_live(web) == []        # idempotent
    st = cg.usage("web")
    assert st.cpu_usage_ns > 0 and st.memory_current > 64 << 20


def test_ensuring_a_network_again_changes_nothing(three):
    for n, spec in three.fleet.networks.items():
        assert three.executor.fabric.ensure_network(n, spec) == []


NAT = """
instance: {inst}
host: {{fabric_netns: {inst}-fab}}
networks:
  out: {{subnet: 10.79.0.0/24, gateway: 10.79.0.1, nat: true}}
"""


def test_nat_rule_exists_with_the_network_and_goes_with_it(tmp_path):
    with fleet_env(tmp_path, NAT) as env:
        ex = env.executor
        ex.create_network("out", env.fleet.networks["out"])
        rules = [x["rule"] for x in nft.list_table(env.fabric, "ip",
                                                   names.nft_nat_table(env.instance))
                 if "rule" in x]
        assert [r["comment"] for r in rules] == ["out"]
        assert any("masquerade" in e for e in rules[0]["expr"])
        r = ns.run(env.fabric, ["cat", "/proc/sys/net/ipv4/ip_forward"])
        assert r.stdout.strip() == "1"
        assert ex.fabric.ensure_network("out", env.fleet.networks["out"]) == []   # idempotent
        ex.remove_network("out")
        table = nft.list_table(env.fabric, "ip", names.nft_nat_table(env.instance))
        assert not [x for x in table or [] if "rule" in x]


ROUTED = """
instance: {inst}
host: {{fabric_netns: {inst}-fab}}
networks:
  a: {{subnet: 10.81.0.0/24, gateway: 10.81.0.1, nat: true, forward_to: [c]}}
  b: {{subnet: 10.82.0.0/24, gateway: 10.82.0.1}}
  c: {{subnet: 10.83.0.0/24, gateway: 10.83.0.1}}
guests:
  ga: {{nics: [{{network: a, ip: 10.81.0.10}}]}}
  gb: {{nics: [{{network: b, ip: 10.82.0.10}}]}}
  gc: {{nics: [{{network: c, ip: 10.83.0.10}}]}}
"""


@contextlib.contextmanager
def uplink(env: Env) -> Iterator[str]:
    """An "outside" netns at 192.0.2.2, the fabric's default route (so nat has a way out)."""
    env.executor.fabric.ensure_fabric()

    def wire(fab: Any, idx: int) -> None:
        fab.addr("add", index=idx, address="192.0.2.1", prefixlen=24)
        fab.link("set", index=idx, state="up")
        fab.route("add", dst="0.0.0.0/0", gateway="192.0.2.2")
    with side_netns(env, "out", f"{env.instance}-up", "o0", "192.0.2.2", wire) as outside:
        with ns.iproute(outside) as ipr:
            ipr.route("add", dst="10.80.0.0/12", gateway="192.0.2.1")   # as a LAN router might
        yield outside


@pytest.mark.long
def test_forwarding_only_where_the_inventory_allows_it(tmp_path):
    with fleet_env(tmp_path, ROUTED) as env, uplink(env) as outside:
        env.start("ga", "gb", "gc")
        # a → c is declared; the replies come back, but c may not open towards a
        assert ping(env, "ga", "10.83.0.10")
        assert not ping(env, "gc", "10.81.0.10")
        # nothing between a and b, either way, though the host routes both
        assert not ping(env, "ga", "10.82.0.10")
        assert not ping(env, "gb", "10.81.0.10")
        # a goes out masqueraded; b (no nat) does not go out at all
        assert ping(env, "ga", "192.0.2.2")
        assert not ping(env, "gb", "192.0.2.2")
        # the outside cannot open towards any guest
        for ip in ("10.81.0.10", "10.82.0.10", "10.83.0.10"):
            r = ns.run(outside, ["busybox", "ping", "-c", "1", "-W", "2", ip], check=False)
            assert r.returncode != 0, ip
        # towards the host: the gateway answers pings, and nothing else it listens on
        listener = subprocess.Popen(["ip", "netns", "exec", env.fabric, "busybox", "nc",
                                     "-l", "-p", "8081", "-e", "echo", "hello"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert ping(env, "gb", "10.82.0.1")
            rc, out = env.sh("gb", "echo | nc -w 2 10.82.0.1 8081")
            assert "hello" not in out
            r = ns.run(env.fabric, ["busybox", "nc", "-w", "2", "127.0.0.1", "8081"],
                       check=False, input="")
            assert "hello" in r.stdout        # the listener was there all along
        finally:
            listener.kill()
            listener.wait()


def test_gateway_address_already_in_use_is_refused(tmp_path):
    with fleet_env(tmp_path) as env:
        env.executor.fabric.ensure_fabric()
        with ns.iproute(env.fabric) as ipr:
            ipr.link("add", ifname="other0", kind="veth", peer={"ifname": "other1"})
            ipr.addr("add", index=ipr.link_lookup(ifname="other0")[0], address="10.77.0.1",
                     prefixlen=24)
        with pytest.raises(NetError, match="10.77.0.1 is already in use on other0"):
            env.executor.create_network("front", env.fleet.networks["front"])


# ------------------------------------------------------------ cleanup, rollback

def test_destroy_leaves_nothing(tmp_path):
    with fleet_env(tmp_path) as env:
        env.start("web")
        assert leftovers(env.instance)          # it made things
        pid = env.guests["web"].pid
        gone = env.executor.destroy()
        assert any("netns" in g for g in gone)
        assert leftovers(env.instance) == []
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_half_made_guest_network_is_rolled_back(tmp_path):
    with fleet_env(tmp_path) as env:
        ex = env.executor
        ex.create_network("front", env.fleet.networks["front"])   # "back" is never made
        app = env.fleet.guests["app"]                               # on front and back
        with pytest.raises(NetError, match="no bridge"):
            ex.fabric.wire_guest("app", nic_wiring(app))
        assert not ns.exists(names.guest_netns(env.instance, "app"))
        assert ex.fabric.links() == [names.bridge(env.instance, "front")]


def test_name_collision_with_a_foreign_interface_is_an_error(tmp_path):
    with fleet_env(tmp_path) as env:
        env.executor.fabric.ensure_fabric()
        with ns.iproute(env.fabric) as ipr:        # someone else's veth takes our name
            ipr.link("add", ifname=names.bridge(env.instance, "front"), kind="veth",
                     peer={"ifname": "foreign0"})
        with pytest.raises(NetError, match="is a veth, not our bridge"):
            env.executor.create_network("front", env.fleet.networks["front"])


def test_a_test_that_fails_on_purpose_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from tests.integration.env import fleet_env
        with fleet_env(Path({str(tmp_path)!r})) as env:
            print(env.instance, flush=True)
            env.start("web")
            raise RuntimeError("failing on purpose")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode != 0 and "failing on purpose" in res.stderr
    instance = res.stdout.split()[0]
    assert leftovers(instance) == []


def test_gc_finds_leftovers_by_prefix_with_an_empty_state_dir(tmp_path):
    with fleet_env(tmp_path) as env:
        env.start("web")
        inv = tmp_path / "inv.yaml"
        from tests.integration.env import THREE_GUESTS
        inv.write_text(THREE_GUESTS.format(inst=env.instance))
        empty = tmp_path / "empty-state"
        base = [sys.executable, "-m", "consolidator", "--state-dir", str(empty), "-f", str(inv),
                "gc"]
        # an inventory in reach is no licence: with nothing recorded, name the instance
        guess = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert guess.returncode == 2 and "records no fleet" in guess.stderr, guess.stderr
        assert names.guest_netns(env.instance, "web") in " ".join(leftovers(env.instance))
        cmd = base + ["--instance", env.instance, "--fabric-netns", env.fabric]
        dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        assert names.guest_netns(env.instance, "web") in dry.stdout
        assert leftovers(env.instance)            # dry run removed nothing
        g = env.guests.pop("web")                 # as after a supervisor crash: our handles
        env.run(g.cleanup())                      # go, QEMU keeps running in its cgroup
        assert g.alive()
        real = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert real.returncode == 0, real.stderr
        assert leftovers(env.instance) == []
