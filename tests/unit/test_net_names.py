from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consolidator.inventory.derive import derive_mac
from consolidator.net import names, nft

instances = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@given(instances, labels, st.integers(0, 15))
def test_interface_names_fit_15_bytes_and_keep_the_prefix(inst, guest, i):
    for n in (names.bridge(inst, guest), names.guest_port(inst, guest, i)):
        assert len(n.encode()) <= 15
        assert names.link_is_ours(inst, n)


@given(instances, instances, labels, st.integers(0, 15))
def test_no_instance_owns_another_instances_names(a, b, name, i):
    """gc of instance b never takes a's objects: instance names hold no '-' or '.', so a
    prefix never matches another instance's, even when one name starts the other."""
    if a == b:
        return
    assert names.bridge(a, name) != names.bridge(b, name)
    for ifname in (names.bridge(a, name), names.guest_port(a, name, i)):
        assert not names.link_is_ours(b, ifname)
    assert not names.netns_is_ours(b, names.guest_netns(a, name))
    assert not names.nft_table_is_ours(b, names.nft_guard_table(a))


def test_a_prefix_instance_does_not_own_the_longer_ones():
    assert not names.link_is_ours("cn", names.bridge("cns", "front"))
    assert not names.link_is_ours("cns", names.bridge("cn", "s-front"))
    assert not names.netns_is_ours("cn", names.guest_netns("cns", "web"))


def test_prefix_match_is_exact():
    assert names.link_is_ours("cns", "cns-front")
    assert not names.link_is_ours("cns", "cns2-front")     # another instance
    assert not names.link_is_ours("cns", "cnsfront")
    assert names.nft_table_is_ours("cns", "cns_guard")
    assert not names.nft_table_is_ours("cns", "cns2_guard")


def test_long_names_are_hashed_deterministically():
    a = names.guest_port("instance", "a-very-long-guest-name", 0)
    assert a == names.guest_port("instance", "a-very-long-guest-name", 0)
    assert a != names.guest_port("instance", "a-very-long-guest-name", 1)
    assert len(a) == 15 and a.startswith("instance.a-")


@given(instances, labels, st.integers(0, 7))
def test_mac_is_unicast_local_and_stable(inst, guest, i):
    mac = derive_mac(inst, guest, i)
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert mac == derive_mac(inst, guest, i)


def test_guard_port_rules():
    doc = nft.guard_port("cns", "cns.web.0", "52:54:00:00:00:01", ["10.0.0.5"])
    rules = [d["add"]["rule"]["expr"] for d in doc if "rule" in d.get("add", {})]
    fields = [r[0]["match"]["left"]["payload"]["field"] for r in rules]
    assert fields == ["saddr", "saddr ether", "saddr ip", "saddr", "type"]
    assert rules[-1][0]["match"]["right"] == {"set": ["ip", "arp"]}
    (elem,) = [d for d in doc if "element" in d.get("add", {})]
    assert elem["add"]["element"]["elem"] == [["cns.web.0", {"jump": {"target": "p_cns_web_0"}}]]


def test_guard_port_without_address_drops_ipv4_and_arp():
    doc = nft.guard_port("cns", "cns.web.0", "52:54:00:00:00:01", [])
    rights = [d["add"]["rule"]["expr"][0]["match"]["right"] for d in doc
              if "rule" in d.get("add", {})]
    assert "ip" in rights and "arp" in rights


def test_nat_rule_targets_the_default_route_or_anything_but_the_bridge():
    with_route = nft.nat_rule("cns", "front", "10.77.0.0/24", "cns-front", "eth0")
    expr = with_route[0]["add"]["rule"]["expr"]
    assert expr[1]["match"] == {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}
    assert expr[0]["match"]["right"] == {"prefix": {"addr": "10.77.0.0", "len": 24}}
    assert with_route[0]["add"]["rule"]["comment"] == "front"
    no_route = nft.nat_rule("cns", "front", "10.77.0.0/24", "cns-front", None)
    assert no_route[0]["add"]["rule"]["expr"][1]["match"]["op"] == "!="
