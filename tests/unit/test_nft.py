"""The instance's nftables ruleset, rendered from networks and ports (pure), and the
listing comparison the guard runs. The rules' effect on real frames is tested from
inside guests in tests/integration/test_isolation.py."""

from __future__ import annotations

import json

from consolidator.net import nft

WEB = nft.PortRule("cns.web.0", "52:54:00:00:00:01", ("10.0.0.5",))
BARE = nft.PortRule("cns.db.0", "52:54:00:00:00:02")
FRONT = nft.NetRule("front", "cns-front", "10.77.0.0/24", nat=True, out_ifname="eth0",
                    forward_to=("cns-back",))
BACK = nft.NetRule("back", "cns-back", "10.78.0.0/24")


def adds(doc: nft.Doc, kind: str) -> list[dict]:
    return [d["add"][kind] for d in doc if kind in d.get("add", {})]


def rules_of(doc: nft.Doc, chain: str) -> list[list[dict]]:
    return [r["expr"] for r in adds(doc, "rule") if r["chain"] == chain]


def test_a_port_chain_checks_mac_arp_ip_dhcp_and_ethertype_then_accepts():
    rules = nft.port_rules(WEB)
    fields = [r[0]["match"]["left"]["payload"]["field"] for r in rules[:-1]]
    assert fields == ["saddr", "saddr ether", "saddr ip", "saddr", "saddr", "sport", "type"]
    # ARP: its own address, or 0.0.0.0 (a DHCP client's probe)
    assert rules[2][0]["match"]["right"] == {"set": [*WEB.ips, "0.0.0.0"]}
    # the one thing 0.0.0.0 may send: a DHCP request, broadcast, client to server port
    assert [m["match"]["right"] for m in rules[3][:-1]] == ["0.0.0.0", "255.255.255.255",
                                                            68, 67]
    assert rules[3][-1] == nft.ACCEPT
    assert rules[5][0]["match"] == {"op": "==", "left": {"payload": {
        "protocol": "udp", "field": "sport"}}, "right": 67}
    assert rules[6][0]["match"]["right"] == {"set": ["ip", "arp"]}
    assert all(r[-1] == nft.DROP for i, r in enumerate(rules[:-1]) if i != 3)
    assert rules[-1] == [nft.ACCEPT]       # what passed every check leaves the base chain


def test_a_port_without_address_drops_ipv4_and_arp():
    rights = [r[0]["match"]["right"] for r in nft.port_rules(BARE)[:-1]]
    assert "ip" in rights and "arp" in rights


def test_the_guard_drops_what_comes_in_on_an_unmapped_port_of_the_instance():
    doc = nft.guard_table("cns", [WEB, BARE])
    pre = rules_of(doc, "pre")
    assert pre[0] == [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]
    assert pre[1] == [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                 "right": "cns.*"}}, nft.DROP]
    (elem,) = adds(doc, "element")
    assert elem["elem"] == [["cns.db.0", {"jump": {"target": "p_cns_db_0"}}],
                            ["cns.web.0", {"jump": {"target": "p_cns_web_0"}}]]
    # the table is replaced whole: add, delete, add, then its objects
    assert [list(d) for d in doc[:3]] == [["add"], ["delete"], ["add"]]


def test_forwarding_follows_nat_and_forward_to_and_nothing_else():
    doc = nft.filter_table("cns", [FRONT, BACK])
    sets = {e["name"]: e["elem"] for e in adds(doc, "element")}
    assert sets["bridges"] == ["cns-back", "cns-front"]
    assert sets["natted"] == ["cns-front"]
    pairs = [tuple(e["concat"]) for e in sets["routes"]]
    assert pairs == [("cns-back", "cns-back"), ("cns-front", "cns-back"),
                     ("cns-front", "cns-front")]       # back → front is not declared
    forward = rules_of(doc, "forward")
    assert forward[-2:] == [
        [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@bridges"}},
         nft.DROP],
        [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@bridges"}},
         nft.DROP]]
    assert rules_of(doc, "input")[-1][-1] == nft.DROP


def test_no_nat_network_no_nat_table():
    assert [list(d) for d in nft.nat_table("cns", [BACK])] == [["add"], ["delete"]]
    doc = nft.nat_table("cns", [FRONT, BACK])
    (rule,) = adds(doc, "rule")
    assert rule["comment"] == "front"
    assert rule["expr"][0]["match"]["right"] == {"prefix": {"addr": "10.77.0.0", "len": 24}}
    assert rule["expr"][1]["match"] == {"op": "==", "left": {"meta": {"key": "oifname"}},
                                        "right": "eth0"}
    no_route = nft.nat_table("cns", [nft.NetRule("front", "cns-front", "10.77.0.0/24", nat=True)])
    (rule,) = adds(no_route, "rule")
    assert rule["expr"][1]["match"]["op"] == "!="


def _listing(handle: int, elems: list[str]) -> list[dict]:
    return [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": "cns_guard", "handle": handle}},
            {"map": {"family": "bridge", "table": "cns_guard", "name": "ports",
                     "handle": handle + 1, "elem": elems}},
            {"table": {"family": "ip", "name": "other", "handle": 9}}]


def test_listings_compare_without_handles_or_element_order():
    tables = nft.our_tables("cns")
    a = nft.normalise(_listing(1, ["a", "b"]), tables)
    b = nft.normalise(_listing(7, ["b", "a"]), tables)
    assert a == b and list(a) == ["bridge cns_guard"]
    assert json.loads(a["bridge cns_guard"][0]) == {
        "table": {"family": "bridge", "name": "cns_guard"}}
    assert nft.differences(a, b) == {}
    assert nft.differences(a, {}) == {"bridge cns_guard": "removed"}
    c = nft.normalise(_listing(1, ["a"]), tables)
    assert nft.differences(a, c) == {"bridge cns_guard": "changed"}
