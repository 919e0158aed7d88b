"""nftables through the ``nft`` tool with JSON input (pyroute2's nftables support is thin).

The instance's whole ruleset is rendered from two lists, the networks and the guest
ports, by :func:`ruleset`, and loaded in one transaction that replaces its tables: there
is never a moment with half of it. Three tables, in the fabric netns:

- ``bridge {inst}_guard``: anti-spoofing. A base chain on the bridge prerouting hook
  jumps, through the verdict map ``ports`` keyed by input port, to one chain per guest
  NIC: frames whose source MAC, ARP sender or IPv4 source is not the guest's are
  dropped, and so are DHCP server replies (UDP source port 67) and every ethertype but
  IPv4 and ARP (no VLAN-tagged or IPv6 way around the checks, no router advertisements).
  A port of the instance that is not in the map drops everything: the guard fails
  closed. The base chain's policy stays accept because the hook sees every bridge of the
  netns, the host's own included.
- ``inet {inst}_filter``: what crosses the host. Forwarding out of a network is allowed
  only with ``nat: true`` (to interfaces that are not the instance's bridges) or to the
  networks it lists in ``forward_to``; replies come back; nothing else enters or leaves
  the instance's bridges through the host. Towards the host itself a guest may ping
  its gateway, ask its DHCP and DNS server (where the network has ``dhcp``) and answer
  what the host opened, nothing more.
- ``ip {inst}_nat``: one masquerade rule per ``nat: true`` network (no table without one).

The builders are pure (they return JSON documents); :func:`apply` runs them.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, NFT_MSG_NEWGEN, nft_gen_msg

from . import netns as ns
from .names import nft_filter_table, nft_guard_table, nft_nat_table

Doc = list[dict[str, Any]]


@dataclass(frozen=True)
class NetRule:
    """What the ruleset needs to know of one network."""
    network: str
    bridge: str
    subnet: str
    nat: bool = False
    out_ifname: str | None = None            # the default route's device, for nat
    forward_to: tuple[str, ...] = ()         # bridges this network may route to
    dhcp: bool = False                       # the host serves DHCP and DNS on it


@dataclass(frozen=True)
class PortRule:
    """One guest NIC's fabric-side port and what it may send from."""
    port: str
    mac: str
    ips: tuple[str, ...] = ()


def _port_chain(port: str) -> str:
    return "p_" + port.replace(".", "_").replace("-", "_")


def _match(proto: str, field: str, op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}},
                      "right": right}}


def _meta(key: str, op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": right}}


DROP: dict[str, Any] = {"drop": None}
ACCEPT: dict[str, Any] = {"accept": None}


def _replace(family: str, name: str) -> Doc:
    """Add-then-delete-then-add: the table is new whether it existed or not (one
    transaction with what follows, so nothing sees it empty)."""
    t = {"family": family, "name": name}
    return [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]


def port_rules(port: PortRule) -> list[list[dict[str, Any]]]:
    drop = DROP
    rules = [[_match("ether", "saddr", "!=", port.mac), drop],
             [_match("arp", "saddr ether", "!=", port.mac), drop]]
    if port.ips:
        ips = {"set": list(port.ips)}
        # a DHCP client has no address yet: its ARP probes (RFC 5227) and its requests
        # come from 0.0.0.0, and only those may
        rules += [[_match("arp", "saddr ip", "!=", {"set": [*port.ips, "0.0.0.0"]}), drop],
                  [_match("ip", "saddr", "==", "0.0.0.0"),
                   _match("ip", "daddr", "==", "255.255.255.255"),
                   _match("udp", "sport", "==", 68), _match("udp", "dport", "==", 67), ACCEPT],
                  [_match("ip", "saddr", "!=", ips), drop]]
    else:  # a NIC without an address may not speak IPv4 at all
        rules += [[_match("ether", "type", "==", "ip"), drop],
                  [_match("ether", "type", "==", "arp"), drop]]
    rules += [[_match("udp", "sport", "==", 67), drop],           # no rogue DHCP server
              [_match("ether", "type", "!=", {"set": ["ip", "arp"]}), drop],
              [ACCEPT]]
    return rules


def guard_table(instance: str, ports: list[PortRule]) -> Doc:
    t = {"family": "bridge", "table": nft_guard_table(instance)}
    doc = _replace("bridge", t["table"])
    doc.append({"add": {"map": {**t, "name": "ports", "type": "ifname", "map": "verdict"}}})
    for p in sorted(ports, key=lambda p: p.port):
        chain = _port_chain(p.port)
        doc.append({"add": {"chain": {**t, "name": chain}}})
        doc += [{"add": {"rule": {**t, "chain": chain, "expr": r}}} for r in port_rules(p)]
    if ports:
        doc.append({"add": {"element": {**t, "name": "ports", "elem": [
            [p.port, {"jump": {"target": _port_chain(p.port)}}]
            for p in sorted(ports, key=lambda p: p.port)]}}})
    doc.append({"add": {"chain": {**t, "name": "pre", "type": "filter", "hook": "prerouting",
                                  "prio": -300, "policy": "accept"}}})
    doc += [{"add": {"rule": {**t, "chain": "pre", "expr": e}}} for e in (
        [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}],
        [_meta("iifname", "==", f"{instance}.*"), DROP])]      # an unmapped port of ours
    return doc


def filter_table(instance: str, nets: list[NetRule]) -> Doc:
    t = {"family": "inet", "table": nft_filter_table(instance)}
    bridges = sorted(n.bridge for n in nets)
    natted = sorted(n.bridge for n in nets if n.nat)
    pairs = sorted({(n.bridge, n.bridge) for n in nets} |   # same bridge: br_netfilter
                   {(n.bridge, o) for n in nets for o in n.forward_to})
    doc = _replace("inet", t["table"])

    def set_(name: str, type_: Any, elems: list[Any]) -> None:
        doc.append({"add": {"set": {**t, "name": name, "type": type_}}})
        if elems:
            doc.append({"add": {"element": {**t, "name": name, "elem": elems}}})
    set_("bridges", "ifname", bridges)
    set_("natted", "ifname", natted)
    set_("served", "ifname", sorted(n.bridge for n in nets if n.dhcp))
    set_("routes", ["ifname", "ifname"], [{"concat": list(p)} for p in pairs])
    established = {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                             "right": ["established", "related"]}}
    routes = {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}},
                                                        {"meta": {"key": "oifname"}}]},
                        "right": "@routes"}}
    forward = [
        [_meta("oifname", "==", "@bridges"), established, ACCEPT],  # replies
        [routes, ACCEPT],
        [_meta("iifname", "==", "@natted"), _meta("oifname", "!=", "@bridges"), ACCEPT],
        [_meta("iifname", "==", "@bridges"), DROP],
        [_meta("oifname", "==", "@bridges"), DROP],
    ]
    to_host = [
        [_meta("iifname", "==", "@bridges"), established, ACCEPT],
        [_meta("iifname", "==", "@bridges"), _meta("l4proto", "==", "icmp"), ACCEPT],
        # DHCP and DNS where the host serves them (dnsmasq on the gateway address)
        [_meta("iifname", "==", "@served"), _match("udp", "dport", "==", {"set": [53, 67]}),
         ACCEPT],
        [_meta("iifname", "==", "@served"), _match("tcp", "dport", "==", 53), ACCEPT],
        [_meta("iifname", "==", "@bridges"), DROP],
    ]
    for chain, hook, rules in (("forward", "forward", forward), ("input", "input", to_host)):
        doc.append({"add": {"chain": {**t, "name": chain, "type": "filter", "hook": hook,
                                      "prio": -10, "policy": "accept"}}})
        doc += [{"add": {"rule": {**t, "chain": chain, "expr": r}}} for r in rules]
    return doc


def nat_table(instance: str, nets: list[NetRule]) -> Doc:
    """Masquerade each natted subnet leaving towards its ``out_ifname`` (the default
    route's device), or, with no default route, leaving by anything but its own bridge."""
    t = {"family": "ip", "table": nft_nat_table(instance)}
    doc = _replace("ip", t["table"])
    if not any(n.nat for n in nets):
        return doc[:2]       # no nat: no nat table (and no nat hook in the netns)
    doc.append({"add": {"chain": {**t, "name": "post", "type": "nat", "hook": "postrouting",
                                  "prio": 100, "policy": "accept"}}})
    for n in sorted(nets, key=lambda n: n.bridge):
        if not n.nat:
            continue
        addr, plen = n.subnet.split("/")
        oif = _meta("oifname", "==", n.out_ifname) if n.out_ifname else \
            _meta("oifname", "!=", n.bridge)
        doc.append({"add": {"rule": {**t, "chain": "post", "comment": n.network, "expr": [
            _match("ip", "saddr", "==", {"prefix": {"addr": addr, "len": int(plen)}}),
            oif, {"masquerade": None}]}}})
    return doc


def ruleset(instance: str, nets: list[NetRule], ports: list[PortRule]) -> Doc:
    """The instance's tables, whole: one document, one transaction."""
    return guard_table(instance, ports) + filter_table(instance, nets) + \
        nat_table(instance, nets)


def our_tables(instance: str) -> list[tuple[str, str]]:
    return [("bridge", nft_guard_table(instance)), ("inet", nft_filter_table(instance)),
            ("ip", nft_nat_table(instance))]


# --------------------------------------------------------------------- listings

def normalise(listing: list[dict[str, Any]], tables: list[tuple[str, str]]
              ) -> dict[str, list[str]]:
    """The objects of ``tables`` in a ``nft -j list ruleset`` listing, comparable across
    listings: handles dropped, set elements sorted, one JSON string per object, keyed by
    ``family table``. A table that is missing has no key."""
    wanted = set(tables)
    out: dict[str, list[str]] = {}
    for item in listing:
        (kind, body), = item.items()
        if kind == "metainfo" or not isinstance(body, dict):
            continue
        key = (body.get("family"), body.get("table") if kind != "table" else body.get("name"))
        if key not in wanted:
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if isinstance(body.get("elem"), list):
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        out.setdefault(f"{key[0]} {key[1]}", []).append(
            json.dumps({kind: body}, sort_keys=True))
    return out


def differences(want: dict[str, list[str]], have: dict[str, list[str]]) -> dict[str, str]:
    """Tables of ``want`` that ``have`` lacks ("removed") or holds otherwise ("changed")."""
    return {t: ("removed" if t not in have else "changed")
            for t, items in want.items() if have.get(t) != items}


# ------------------------------------------------------------------------ running

class Generation:
    """The ruleset generation of a netns: a counter the kernel bumps on every change
    to any table. Reading it is one netlink round trip on a socket opened in the netns
    (it stays bound there), so it can be polled every second for next to nothing."""

    def __init__(self, netns_name: str | None) -> None:
        with ns.entered(netns_name):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(2)
        self._lock = threading.Lock()
        self._seq = 0

    def read(self) -> int:
        msg = nft_gen_msg()
        with self._lock:
            self._seq += 1
            msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
            msg["header"]["flags"] = NLM_F_REQUEST
            msg["header"]["sequence_number"] = self._seq
            msg["nfgen_family"] = 0
            msg.encode()
            self._sock.send(msg.data)
            while True:
                reply = nft_gen_msg(self._sock.recv(65536))
                reply.decode()
                if reply["header"]["sequence_number"] == self._seq:
                    break
        if reply["header"]["type"] != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            raise OSError(f"nftables generation: unexpected reply {reply['header']['type']}")
        return int(reply.get_attr("NFTA_GEN_ID"))

    def close(self) -> None:
        self._sock.close()


NFNLGRP_NFTABLES = 7     # the nftables multicast group: a message for every committed change


class Changes:
    """The nftables change notifications of a netns: a netlink socket opened in the netns
    and joined to its nftables group. It becomes readable when anyone commits a change to
    any table there, so a guard can sleep until something happens instead of polling.
    A lost notification (the socket's buffer overran) reads as a change."""

    def __init__(self, netns_name: str | None) -> None:
        with ns.entered(netns_name):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read what is queued; whether anything (or an overrun) was."""
        changed = False
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return changed
            except OSError:               # ENOBUFS: notifications were lost
                pass
            changed = True

    def close(self) -> None:
        self._sock.close()


def apply(netns_name: str | None, doc: Doc) -> None:
    if doc:
        ns.run(netns_name, ["nft", "-j", "-f", "-"], input=json.dumps({"nftables": doc}))


def list_ruleset(netns_name: str | None) -> list[dict[str, Any]]:
    res = ns.run(netns_name, ["nft", "-j", "list", "ruleset"])
    return json.loads(res.stdout)["nftables"] if res.stdout.strip() else []


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
