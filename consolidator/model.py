"""The desired fleet: a validated inventory, resolved into what the planner compares.

A :class:`Fleet` is what ``apply`` wants to be true. Compared with the inventory it
has every default filled in and every reference resolved: each guest carries
the definition of its image and, per NIC, the prefix, gateway and MAC it will
get. So a change to a network's gateway or an image's kernel shows up as a
change to the guests that use them, which is what it is.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .inventory.schema import CpuSpec, HostSpec, ImageSpec, MemorySpec, NetworkSpec, Size


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NicIntent(_Frozen):
    network: str
    mac: str
    ip: str | None = None          # address only, no prefix
    prefix: int                     # from the network's subnet
    gateway: str | None = None      # the network's gateway, if any

    @property
    def cidr(self) -> str | None:
        return f"{self.ip}/{self.prefix}" if self.ip else None


class GuestIntent(_Frozen):
    name: str
    image: str
    image_spec: ImageSpec
    vcpus: int
    cpu: CpuSpec
    memory: MemorySpec              # memory.min is always set here
    nics: tuple[NicIntent, ...] = ()
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    autostart: bool = True
    labels: dict[str, str] = {}

    @property
    def memory_min(self) -> int:
        assert self.memory.min is not None
        return self.memory.min

    def spec_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))


class Fleet(_Frozen):
    instance: str
    host: HostSpec
    budget: Size                    # guest memory budget in bytes, resolved for this host
    usable_cpus: float              # host cores minus the reserve
    images: dict[str, ImageSpec]
    networks: dict[str, NetworkSpec]
    guests: dict[str, GuestIntent]

    def fleet_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))

    def summary(self) -> str:
        vcpus = sum(g.vcpus for g in self.guests.values())
        mem = sum(g.memory.max for g in self.guests.values())
        from .units import human_size
        return (f"instance {self.instance}: {len(self.guests)} guests, {len(self.networks)} "
                f"networks, {vcpus} vCPUs, {human_size(mem)} max memory, "
                f"budget {human_size(self.budget)}")


def _hash(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def nic_address(ip: str | None) -> str | None:
    """``10.0.0.5/24`` -> ``10.0.0.5``."""
    return str(ipaddress.ip_interface(ip).ip) if ip else None
