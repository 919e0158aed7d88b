"""A real fleet for tests: unique instance, fabric in its own netns, guaranteed cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil

from consolidator.daemon.executor import Executor
from consolidator.hostfacts import HostFacts
from consolidator.model import parse_fleet
from consolidator.model import Fleet
from consolidator.net import names
from consolidator.net import netns as ns
from consolidator.net import nft
from consolidator.sched.cgroup import detect
from consolidator.state import StateDir
from consolidator.vm.guest import Guest
from tools.fleetdir import IMAGE_CACHE, ROOT, FleetDir


THREE_GUESTS = """
instance: {inst}
host: {{fabric_netns: {inst}-fab}}
networks:
  front: {{subnet: 10.77.0.0/24, gateway: 10.77.0.1}}
  back: {{subnet: 10.78.0.0/24}}
guests:
  web:
    cpu: {{shares: 1024, limit: 0.75}}
    memory: {{max: 256MiB, min: 128MiB}}
    nics: [{{network: front, ip: 10.77.0.10}}]
  app:
    cpu: {{shares: 2048}}
    nics: [{{network: front, ip: 10.77.0.20}}, {{network: back, ip: 10.78.0.20}}]
  db:
    nics: [{{network: back, ip: 10.78.0.30}}]
"""


def unique_instance() -> str:
    return "i" + uuid.uuid4().hex[:7]


@dataclass
class Env:
    instance: str
    fleet: Fleet
    executor: Executor
    loop: asyncio.AbstractEventLoop
    guests: dict[str, Guest] = field(default_factory=dict)

    @property
    def fabric(self) -> str:
        return f"{self.instance}-fab"

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def start(self, *names_: str) -> None:
        async def go() -> None:
            for n, s in self.fleet.networks.items():
                await asyncio.to_thread(self.executor.create_network, n, s)
            started = await asyncio.gather(*(self.executor.start_guest(self.fleet.guests[n])
                                             for n in names_))
            self.guests.update(zip(names_, started))
        self.run(go())

    def sh(self, guest: str, command: str, timeout: float = 30) -> tuple[int, str]:
        async def go() -> tuple[int, str]:
            return await (await self.guests[guest].agent()).sh(command, timeout)
        return self.run(go())

    def stop_all(self) -> None:
        async def go() -> None:
            for n, g in list(self.guests.items()):
                with contextlib.suppress(Exception):
                    await self.executor.stop_guest(self.fleet.guests[n], g, timeout=5)
        self.run(go())


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    """``pred()``'s first true value within ``timeout`` seconds (polled every 0.2 s)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def leftovers(instance: str) -> list[str]:
    """Everything with the instance prefix that still exists anywhere on the host."""
    found = [f"netns {n}" for n in ns.listing() if names.netns_is_ours(instance, n)]
    with ns.iproute(None) as ipr:
        found += [f"link {l.get_attr('IFLA_IFNAME')}" for l in ipr.get_links()
                  if names.link_is_ours(instance, l.get_attr("IFLA_IFNAME"))]
    found += [f"nft {f} {t}" for f, t in nft.tables(None) if names.nft_table_is_ours(instance, t)]
    layout = detect()
    for ctrl, base in layout.subtree(instance).items():
        if base.exists():
            found.append(f"cgroup {base}")
    pattern = re.compile(rf"/{instance}/")
    for p in psutil.process_iter(["pid", "name"]):
        try:
            cg = Path(f"/proc/{p.pid}/cgroup").read_text()
        except OSError:
            continue
        if pattern.search(cg):
            found.append(f"process {p.pid} {p.info['name']}")
    return found


@contextlib.contextmanager
def fleet_env(tmp_path: Path, template: str = THREE_GUESTS) -> Iterator[Env]:
    inst = unique_instance()
    os.environ["CONSOLIDATOR_IMAGE_CACHE"] = str(IMAGE_CACHE)
    fleet = parse_fleet(template.format(inst=inst), "test.yaml", HostFacts.probe())
    state = StateDir(tmp_path / f"state-{inst}").ensure()
    env = Env(inst, fleet, Executor(fleet, state), asyncio.new_event_loop())
    try:
        yield env
    finally:
        with contextlib.suppress(Exception):
            env.stop_all()
        for g in env.guests.values():
            with contextlib.suppress(Exception):
                env.run(g.cleanup())          # QMP and agent close in their own loop
            g.abandon()
        env.executor.destroy()
        env.executor.ids.release_state(str(state.root.resolve()))
        env.loop.close()


# -------------------------------------------------------------- the real CLI

import json as _json  # noqa: E402
import signal as _signal  # noqa: E402

SHIPPED = ROOT / "inventory.yaml"


def shipped_inventory(instance: str, metrics_port: int | None = None) -> str:
    """The shipped inventory, with a unique instance and the fabric in its own netns.

    Its metrics endpoint is off unless a port is given: parallel test fleets must not
    compete for the default port."""
    text = SHIPPED.read_text()
    text = text.replace("instance: cns ", f"instance: {instance} ", 1)
    text = text.replace("fabric_netns: null ", f"fabric_netns: {instance}-fab ", 1)
    block = re.compile(r"(?m)^(  metrics:[^\n]*\n    enabled: )true( *(?:#[^\n]*)?\n"
                       r"    listen: )127\.0\.0\.1:9477\b")
    assert block.search(text), "the shipped inventory's metrics block moved"
    text = block.sub((lambda m: f"{m[1]}true{m[2]}127.0.0.1:{metrics_port}") if metrics_port
                     else (lambda m: f"{m[1]}false{m[2]}127.0.0.1:9477"), text, count=1)
    assert f"instance: {instance}" in text and f"{instance}-fab" in text
    return text


@dataclass
class CliFleet(FleetDir):
    """A fleet's directory under a unique instance, its fabric in a netns of its own."""
    instance: str = ""

    @property
    def fabric(self) -> str:
        return f"{self.instance}-fab"

    def guests(self) -> dict[str, dict]:
        return {g["name"]: g for g in self.status()["guests"]}

    def balloons(self) -> dict[str, int]:
        """Each guest's balloon size (bytes the guest may use), as status shows it."""
        return {n: g["balloon_bytes"] for n, g in self.guests().items()}

    def log(self, guest: str) -> list[dict]:
        p = self.state / "guests" / guest / "log.jsonl"
        return [_json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def events(self, guest: str) -> list[str]:
        return [e["event"] for e in self.log(guest) if e.get("kind") == "event"]


@contextlib.contextmanager
def cli_fleet(tmp_path: Path, text: str | None = None) -> Iterator[CliFleet]:
    inst = unique_instance()
    f = CliFleet(tmp_path / inst, inst)
    f.root.mkdir(parents=True)
    f.write(text.format(inst=inst) if text else shipped_inventory(inst))
    try:
        yield f
    finally:
        with contextlib.suppress(Exception):
            f.cli("destroy", "--yes", "--purge", check=False, timeout=120)
        pid = f.supervisor_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGKILL)
        from consolidator.daemon import teardown
        from consolidator.vm.identity import Registry
        teardown.collect(teardown.Scope(inst, f.fabric))
        Registry().release_state(str(f.state.resolve()))
