"""Pure: the inventory a restore applies, made from the one in force and a backup's.

A backup keeps the inventory's text as it was applied. Restoring a guest the fleet in
force does not have (one removed since, one restored ``--as`` a new name, or any guest
on a fresh host) adds that guest's section, and the images and networks it names that
the fleet lacks, to the inventory in force. Paths in what is added are made absolute
against the directory of the backup's inventory, so they mean what they meant there.

``--as NEW`` gives the copy its own identity: its MACs are left to be derived from its
new name; an address on a network with DHCP is left to be allocated, and any other
address becomes the first free one of its subnet. Its hostname is its name (cloud-init's
meta-data says so), and its disks carry no instance-id, so cloud-init sees a new
instance.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import yaml

from ..errors import UsageError

IMAGE_PATHS = ("kernel", "initrd", "disk", "cdrom")


def _load(text: str, what: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise UsageError(f"{what}: not YAML ({e})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{what}: not an inventory (a mapping)")
    return doc


def _absolute(value: Any, base_dir: str | None) -> Any:
    if isinstance(value, str) and base_dir and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def guest_section(backup_inventory: str, guest: str) -> dict[str, Any]:
    doc = _load(backup_inventory, "the backup's inventory")
    section = (doc.get("guests") or {}).get(guest)
    if not isinstance(section, dict):
        raise UsageError(f"the backup's inventory has no guest {guest!r}")
    return section


def compose(current: str | None, backup_inventory: str, guest: str, target: str, *,
            backup_dir: str | None, fresh_identity: bool) -> tuple[str, list[str]]:
    """The inventory text to apply, and notes for the operator. ``current``: the text in
    force (None on a fresh host: the backup's, with only this guest)."""
    bdoc = _load(backup_inventory, "the backup's inventory")
    section = dict(guest_section(backup_inventory, guest))
    notes: list[str] = []
    if current is None:
        doc = {k: v for k, v in bdoc.items() if k not in ("guests", "images")}
        doc["guests"] = {}
        doc["images"] = {}                # the guest's own is added below, paths absolute
    else:
        doc = _load(current, "the inventory in force")
        doc.setdefault("guests", {})
        if doc["guests"] is None:
            doc["guests"] = {}
    if target in doc["guests"]:
        raise UsageError(f"the inventory in force already has a guest {target!r}",
                         hint="restore into it without --as, or choose another name")
    # what the guest names, from the backup's inventory where the fleet lacks it
    for kind, key in (("images", "image"), ("networks", None)):
        wanted = [section.get(key, "tiny")] if key else \
            [n.get("network") for n in section.get("nics") or [] if isinstance(n, dict)]
        have = doc.setdefault(kind, {}) or {}
        doc[kind] = have
        for name in wanted:
            if not isinstance(name, str) or name in have:
                continue
            spec = (bdoc.get(kind) or {}).get(name)
            if spec is None:
                continue                       # builtin image, or the backup lacks it too
            if kind == "images" and isinstance(spec, dict):
                spec = {k: _absolute(v, backup_dir) if k in IMAGE_PATHS else v
                        for k, v in spec.items()}
            have[name] = spec
            notes.append(f"{kind[:-1]} {name} comes from the backup's inventory")
    if "cdrom" in section:
        section["cdrom"] = _absolute(section["cdrom"], backup_dir)
    ci = section.get("cloud_init")
    if isinstance(ci, dict) and isinstance(ci.get("user_data"), str):
        section["cloud_init"] = {**ci, "user_data": _absolute(ci["user_data"], backup_dir)}
    if fresh_identity:
        section["nics"] = _fresh_nics(section.get("nics") or [], doc, notes)
    doc["guests"][target] = section
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False), notes


def _fresh_nics(nics: list[Any], doc: dict[str, Any], notes: list[str]) -> list[Any]:
    used = {_addr(n.get("ip")) for g in (doc.get("guests") or {}).values()
            if isinstance(g, dict) for n in g.get("nics") or [] if isinstance(n, dict)}
    out = []
    for nic in nics:
        if not isinstance(nic, dict):
            out.append(nic)
            continue
        nic = {k: v for k, v in nic.items() if k != "mac"}
        net = (doc.get("networks") or {}).get(nic.get("network")) or {}
        if "ip" in nic:
            if net.get("dhcp", True):          # the schema's default: DHCP on
                del nic["ip"]
            else:
                ip = free_address(str(net.get("subnet")), used | {_addr(net.get("gateway"))})
                if ip is None:
                    raise UsageError(f"network {nic.get('network')}: no free address for "
                                     "the copy")
                used.add(ip)
                nic["ip"] = ip
                notes.append(f"address {ip} on {nic.get('network')}")
        out.append(nic)
    return out


def _addr(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    try:
        return str(ipaddress.ip_interface(v).ip)
    except ValueError:
        return None


def free_address(subnet: str, used: set[str | None]) -> str | None:
    """The first host address of ``subnet`` not in ``used``."""
    try:
        net = ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        return None
    for host in net.hosts():
        if str(host) not in used:
            return str(host)
    return None
