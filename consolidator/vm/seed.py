"""The cloud-init NoCloud seed: an ISO 9660 volume labelled ``cidata``.

cloud-init finds it by its label and reads three files from it:

- ``meta-data``: the ``instance-id`` (cloud-init runs its once-per-instance modules, the
  user-data's among them, when it sees an id it has not seen) and the hostname, the
  guest's name;
- ``network-config`` (version 2): each NIC by its MAC, with its inventory address, the
  network's gateway as default route, and the network's DNS server (its dnsmasq) with
  the network's name as search domain;
- ``user-data``: the inventory's, as given.

The volume is built with pycdlib, a library made for ISO 9660 (with Joliet and Rock
Ridge names, which cloud-init's mount needs for the lowercase, dashed file names).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pycdlib

from ..inventory.derive import service_address
from ..inventory.schema import NetworkSpec
from ..model import GuestIntent, NicIntent


def meta_data(intent: GuestIntent, instance_id: str) -> str:
    return json.dumps({"instance-id": instance_id, "local-hostname": intent.name},
                      indent=2) + "\n"


def network_config(nics: tuple[NicIntent, ...], dns: dict[str, str]) -> dict[str, Any]:
    """Pure: netplan-style version 2, one ethernet per NIC matched by MAC. ``dns``: a
    network's DNS server address by network name."""
    eth: dict[str, Any] = {}
    for i, n in enumerate(nics):
        entry: dict[str, Any] = {"match": {"macaddress": n.mac}, "set-name": f"eth{i}"}
        if n.ip:
            entry["addresses"] = [f"{n.ip}/{n.prefix}"]
            if n.gateway and not any("routes" in e for e in eth.values()):
                entry["routes"] = [{"to": "0.0.0.0/0", "via": n.gateway}]
            if n.network in dns:
                entry["nameservers"] = {"addresses": [dns[n.network]],
                                        "search": [n.network]}
        else:
            entry["dhcp4"] = True
        eth[f"eth{i}"] = entry
    return {"version": 2, "ethernets": eth}


def user_data(text: str | None) -> str:
    return text if text else "#cloud-config\n{}\n"


def build(intent: GuestIntent, instance_id: str, dns: dict[str, str], dest: Path) -> None:
    """Write the seed ISO for ``intent`` to ``dest`` (atomically)."""
    write_volume({
        "meta-data": meta_data(intent, instance_id),
        "network-config": json.dumps(network_config(intent.nics, dns), indent=2) + "\n",
        "user-data": user_data(intent.cloud_init),
    }, dest)


def write_volume(files: dict[str, str], dest: Path) -> None:
    """A ``cidata`` volume holding ``files`` (name -> text), written atomically."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for i, (name, text) in enumerate(sorted(files.items())):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{i};1", rr_name=name,
                   joliet_path=f"/{name}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    iso.write(str(tmp))
    iso.close()
    tmp.replace(dest)


def dns_servers(networks: dict[str, NetworkSpec]) -> dict[str, str]:
    """Each DHCP-served network's DNS address (see :mod:`consolidator.net.dhcp`)."""
    return {name: service_address(spec) for name, spec in networks.items() if spec.dhcp}
