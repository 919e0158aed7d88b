"""nftables through the ``nft`` tool with JSON input (pyroute2's nftables support is thin).

Two tables per instance, in the fabric netns:

- ``bridge {inst}_guard``: anti-spoofing. A base chain on the bridge prerouting hook
  jumps, through the verdict map ``ports`` keyed by input port, to one chain per guest
  NIC: frames whose source MAC, ARP sender or IPv4 source is not the guest's are
  dropped, and so is every ethertype but IPv4 and ARP (no VLAN-tagged or IPv6 way
  around the checks). Adding or removing a port is one atomic transaction.
- ``ip {inst}_nat``: one masquerade rule per ``nat: true`` network (comment = network).

The builders are pure (they return JSON documents); :func:`apply` runs them.
"""

from __future__ import annotations

import json
from typing import Any

from . import netns as ns
from .names import nft_guard_table, nft_nat_table

Doc = list[dict[str, Any]]


def _port_chain(port: str) -> str:
    return "p_" + port.replace(".", "_").replace("-", "_")


def guard_base(instance: str) -> Doc:
    t = {"family": "bridge", "table": nft_guard_table(instance)}
    return [
        {"add": {"table": {"family": "bridge", "name": t["table"]}}},
        {"add": {"map": {**t, "name": "ports", "type": "ifname", "map": "verdict"}}},
        {"add": {"chain": {**t, "name": "pre", "type": "filter", "hook": "prerouting",
                           "prio": -300, "policy": "accept"}}},
        {"flush": {"chain": {**t, "name": "pre"}}},
        {"add": {"rule": {**t, "chain": "pre", "expr": [
            {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]}}},
    ]


def _match(proto: str, field: str, op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}},
                      "right": right}}


def guard_port(instance: str, port: str, mac: str, ips: list[str]) -> Doc:
    """Rules for one guest NIC's bridge port. Idempotent: the chain is flushed first."""
    t = {"family": "bridge", "table": nft_guard_table(instance)}
    chain = _port_chain(port)
    drop = {"drop": None}
    rules = [
        [_match("ether", "saddr", "!=", mac), drop],
        [_match("arp", "saddr ether", "!=", mac), drop],
        [_match("ether", "type", "!=", {"set": ["ip", "arp"]}), drop],
    ]
    if ips:
        rules.insert(2, [_match("arp", "saddr ip", "!=", {"set": ips}), drop])
        rules.insert(3, [_match("ip", "saddr", "!=", {"set": ips}), drop])
    else:  # a NIC without an address may not speak IPv4 at all
        rules.insert(2, [_match("ether", "type", "==", "ip"), drop])
        rules.insert(3, [_match("ether", "type", "==", "arp"), drop])
    doc: Doc = [{"add": {"chain": {**t, "name": chain}}},
                {"flush": {"chain": {**t, "name": chain}}}]
    doc += [{"add": {"rule": {**t, "chain": chain, "expr": r}}} for r in rules]
    doc.append({"add": {"element": {**t, "name": "ports",
                                    "elem": [[port, {"jump": {"target": chain}}]]}}})
    return doc


def unguard_port(instance: str, port: str) -> Doc:
    t = {"family": "bridge", "table": nft_guard_table(instance)}
    return [{"delete": {"element": {**t, "name": "ports", "elem": [port]}}},
            {"delete": {"chain": {**t, "name": _port_chain(port)}}}]


def nat_base(instance: str) -> Doc:
    t = {"family": "ip", "table": nft_nat_table(instance)}
    return [{"add": {"table": {"family": "ip", "name": t["table"]}}},
            {"add": {"chain": {**t, "name": "post", "type": "nat", "hook": "postrouting",
                               "prio": 100, "policy": "accept"}}}]


def nat_rule(instance: str, network: str, subnet: str, bridge: str,
             out_ifname: str | None) -> Doc:
    """Masquerade ``subnet`` leaving towards ``out_ifname`` (the default route's device),
    or, with no default route, leaving by anything but its own bridge."""
    t = {"family": "ip", "table": nft_nat_table(instance)}
    addr, plen = subnet.split("/")
    oif = ({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": out_ifname}}
           if out_ifname else
           {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": bridge}})
    return [{"add": {"rule": {**t, "chain": "post", "comment": network, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": addr, "len": int(plen)}}}},
        oif, {"masquerade": None}]}}}]


def apply(netns_name: str | None, doc: Doc) -> None:
    if doc:
        ns.run(netns_name, ["nft", "-j", "-f", "-"], input=json.dumps({"nftables": doc}))


def list_table(netns_name: str | None, family: str, table: str) -> list[dict[str, Any]] | None:
    res = ns.run(netns_name, ["nft", "-j", "list", "table", family, table], check=False)
    if res.returncode != 0:
        return None
    return [x for x in json.loads(res.stdout)["nftables"] if "metainfo" not in x]


def tables(netns_name: str | None) -> list[tuple[str, str]]:
    res = ns.run(netns_name, ["nft", "-j", "list", "tables"], check=False)
    if res.returncode != 0:
        return []
    return [(x["table"]["family"], x["table"]["name"])
            for x in json.loads(res.stdout)["nftables"] if "table" in x]


def delete_table(netns_name: str | None, family: str, table: str) -> None:
    ns.run(netns_name, ["nft", "delete", "table", family, table], check=False)


def nat_rule_handles(netns_name: str | None, instance: str, network: str) -> list[int]:
    items = list_table(netns_name, "ip", nft_nat_table(instance)) or []
    return [x["rule"]["handle"] for x in items
            if "rule" in x and x["rule"].get("comment") == network]
