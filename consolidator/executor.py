"""The executor: the only code that turns decisions into kernel objects and processes.

It works per network and per guest, in the order the planner gives, and records in
the state dir every object it is about to create *before* creating it, so that after
a crash ``destroy`` and ``gc`` know what may exist. Its calls are synchronous (netlink,
cgroupfs, nft); the supervisor runs them off its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import structlog

from .errors import ConsolidatorError, HostError
from .inventory.schema import NetworkSpec
from .model import Fleet, GuestIntent
from .net import names
from .net import netns as ns
from .net.fabric import Fabric, GuestWiring, NicWiring
from .sched.cgroup import (PIDS_MAX, CgroupDriver, CgroupSettings, detect, memory_limit,
                           memory_protection)
from .state import StateDir
from .vm.guest import Guest
from .vm.launch import VirtHost, image_cache_dir, launch_spec, prepare_boot
from .vm.placement import GuestPlacement
from .vm.qemu import DEFAULT_TB_SIZE_MIB, RunPaths

log = structlog.get_logger("executor")


def cgroup_settings(intent: GuestIntent, tb_size_mib: int = DEFAULT_TB_SIZE_MIB) -> CgroupSettings:
    """Pure: the static cgroup settings for a guest (the rebalancer adjusts shares later)."""
    return CgroupSettings(
        cpu_shares=intent.cpu.shares, cpu_quota_cores=intent.cpu.limit, cpus=intent.cpu.pin,
        memory_limit=memory_limit(intent.memory.max, tb_size_mib),
        memory_low=memory_protection(intent.memory_min), pids_max=PIDS_MAX)


def nic_wiring(intent: GuestIntent) -> list[NicWiring]:
    return [NicWiring(i, n.network, n.mac, (n.ip,) if n.ip else ())
            for i, n in enumerate(intent.nics)]


def planned_objects(instance: str, fabric_netns: str | None, intent: GuestIntent,
                    cgroup_dirs: list[Path]) -> list[dict[str, Any]]:
    """Pure: what starting this guest creates, for the record written before creating it."""
    objs: list[dict[str, Any]] = [{"kind": "netns", "name": names.guest_netns(instance,
                                                                           intent.name)}]
    for i, _ in enumerate(intent.nics):
        objs.append({"kind": "link", "name": names.guest_port(instance, intent.name, i),
                     "netns": fabric_netns})
        objs.append({"kind": "nft-port", "table": names.nft_guard_table(instance),
                     "name": names.guest_port(instance, intent.name, i),
                     "netns": fabric_netns})
    objs += [{"kind": "cgroup", "path": str(d)} for d in cgroup_dirs]
    return objs


@dataclass
class Executor:
    fleet: Fleet
    state: StateDir
    virt: VirtHost = field(default_factory=VirtHost.probe)
    cgroups: CgroupDriver | None = None

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise HostError("running guests needs root: network namespaces, bridges, taps and "
                            "cgroups", fact="root", fix="run as root (or under the systemd "
                            "unit in tools/consolidator.service)")
        if any(g.nics for g in self.fleet.guests.values()) and \
                not os.path.exists("/dev/net/tun"):
            raise HostError("/dev/net/tun is missing: guests with NICs need tap devices",
                            fact="/dev/net/tun", fix="modprobe tun")
        self.instance = self.fleet.instance
        self.fabric = Fabric(self.instance, self.fleet.host.fabric_netns)
        if self.cgroups is None:
            self.cgroups = CgroupDriver(detect(), self.instance, self.fleet.host.cgroup_parent)
        self.image_cache = image_cache_dir(self.state.images_dir)

    # ---------------------------------------------------------------- networks
    def create_network(self, name: str, spec: NetworkSpec) -> list[str]:
        self.state.write_network_record(name, {
            "spec": spec.model_dump(mode="json"), "instance": self.instance,
            "bridge": names.bridge(self.instance, name), "netns": self.fabric.netns,
            "phase": "creating"})
        if self.fabric.ensure_fabric():
            log.info("fabric.netns_created", netns=self.fabric.netns)
        changed = self.fabric.ensure_network(name, spec)
        self.state.write_network_record(name, {
            "spec": spec.model_dump(mode="json"), "instance": self.instance,
            "bridge": names.bridge(self.instance, name), "netns": self.fabric.netns,
            "phase": "created"})
        if changed:
            log.info("network.ensured", network=name, changes=changed)
        return changed

    def remove_network(self, name: str) -> None:
        self.fabric.remove_network(name)
        with contextlib.suppress(FileNotFoundError):
            self.state.network_record_path(name).unlink()
        log.info("network.removed", network=name)

    # ------------------------------------------------------------------ guests
    def guest_dir(self, name: str) -> Path:
        return self.state.guest_dir(name)

    def define_guest(self, intent: GuestIntent, state: str = "defined") -> None:
        rec = self.state.read_guest_record(intent.name) or {}
        rec.update({"name": intent.name, "instance": self.instance,
                    "intent": intent.model_dump(mode="json"), "spec_hash": intent.spec_hash(),
                    "state": state})
        self.state.write_guest_record(intent.name, rec)

    def update_record(self, name: str, **fields: Any) -> None:
        rec = self.state.read_guest_record(name) or {"name": name, "instance": self.instance}
        rec.update(fields)
        self.state.write_guest_record(name, rec)

    def prepare_guest(self, intent: GuestIntent, progress: Callable[[str], None] | None = None
                      ) -> tuple[GuestWiring, Guest]:
        """Everything but the launch: record, wiring, cgroup, boot files, the Guest object."""
        assert self.cgroups is not None
        gdir = self.guest_dir(intent.name)
        gdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cg_dirs = self.cgroups.unique_dirs("guests", intent.name)
        self.update_record(intent.name, objects=planned_objects(
            self.instance, self.fabric.netns, intent, cg_dirs), phase="wiring")
        wiring = self.fabric.wire_guest(intent.name, nic_wiring(intent))
        if progress is not None:
            progress("cgroup")
        try:
            self.cgroups.create_guest(intent.name)
            self.cgroups.apply(intent.name, cgroup_settings(intent))
            boot = prepare_boot(intent, self.image_cache, gdir)
        except BaseException:
            self.fabric.unwire_guest(intent.name, len(intent.nics))
            with contextlib.suppress(ConsolidatorError):
                self.cgroups.remove_guest(intent.name)
            raise
        spec = launch_spec(intent, boot, RunPaths.for_guest(gdir), self.virt,
                           taps=wiring.taps, runas=self.fleet.host.runas)
        hint_pvm = spec.accel.name == "kvm" and spec.pvm_host
        return wiring, Guest(spec, hint_pvm=hint_pvm)

    async def start_guest(self, intent: GuestIntent, guest: Guest | None = None, *,
                          progress: Callable[[str], None] | None = None,
                          gate: asyncio.Semaphore | None = None) -> Guest:
        """Wire, place and launch ``intent``; on failure leave nothing of it running.

        The blocking parts (netlink, cgroupfs, nft, image build) run in a worker thread:
        pyroute2's synchronous API cannot run inside an event loop, and one guest's
        setup must not stall the others. ``gate`` bounds how many guests are in their
        host-side start work at once (wiring to QMP greeting); it is released when the
        guest starts booting, since a boot is QEMU's own CPU, not ours.
        ``progress`` hears network, cgroup, launch, boot."""
        assert self.cgroups is not None
        say = progress or (lambda phase: None)
        held = False
        if gate is not None:
            await gate.acquire()
            held = True

        def release() -> None:
            nonlocal held
            if held and gate is not None:
                gate.release()
                held = False

        def on_phase(phase: str) -> None:
            say(phase)
            if phase == "boot":
                release()

        try:
            say("network")
            wiring, g = await asyncio.to_thread(self.prepare_guest, intent, say)
            if guest is not None:            # a restart keeps the object (and its history)
                guest.spec = g.spec
                g = guest
            placement = GuestPlacement(self.cgroups.procs_files(intent.name),
                                       ns.path(wiring.netns))
            self.update_record(intent.name, phase="launching", netns=wiring.netns,
                               cgroups=[str(p) for p in self.cgroups.unique_dirs(
                                   "guests", intent.name)])
            try:
                await g.launch(placement, on_phase=on_phase)
            except BaseException:
                await asyncio.to_thread(self.teardown_guest, intent, g)
                self.update_record(intent.name, phase="failed", state="crashed", pid=None)
                raise
            finally:
                placement.close()
        finally:
            release()
        self.update_record(intent.name, phase="running", state="running", pid=g.pid,
                           pid_start=psutil.Process(g.pid).create_time(),
                           qmp=str(g.paths.qmp), machine=g.spec.machine.name,
                           accel=g.spec.accel.name, started_at=time.time())
        return g

    def teardown_guest(self, intent: GuestIntent, g: Guest | None = None) -> None:
        """Undo what starting made (after QEMU is gone): netns, ports, rules, cgroup."""
        assert self.cgroups is not None
        if g is not None:
            g.abandon()
        self.cgroups.kill(intent.name)
        self.fabric.unwire_guest(intent.name, len(intent.nics))
        self.cgroups.remove_guest(intent.name)

    async def stop_guest(self, intent: GuestIntent, g: Guest, timeout: float = 10.0) -> None:
        await g.shutdown(timeout=timeout)
        await asyncio.to_thread(self.teardown_guest, intent, g)
        self.update_record(intent.name, state="stopped", phase="stopped", pid=None)

    def remove_guest(self, name: str, *, purge: bool = False, nics: int | None = None) -> None:
        assert self.cgroups is not None
        self.cgroups.kill(name)
        self.fabric.unwire_guest(name, nics)
        self.cgroups.remove_guest(name)
        gdir = self.guest_dir(name)
        if purge:
            shutil.rmtree(gdir, ignore_errors=True)
        else:
            for p in gdir.iterdir() if gdir.exists() else []:
                if p.suffix != ".qcow2":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            with contextlib.suppress(OSError):
                gdir.rmdir()
        log.info("guest.removed", guest=name, purge=purge)

    def apply_live(self, intent: GuestIntent) -> list[str]:
        assert self.cgroups is not None
        return self.cgroups.apply(intent.name, cgroup_settings(intent))

    # --------------------------------------------------------------- teardown
    def destroy(self) -> list[str]:
        """Remove every kernel object of the instance: processes, netns, links, rules,
        cgroups. Works from the instance prefix, so it also cleans up after a crash."""
        assert self.cgroups is not None
        gone = []
        for name in self.cgroups.guests_present():
            self.cgroups.kill(name)
            gone.append(f"processes of guest {name}")
        gone += self.fabric.destroy(remove_fabric_netns=self._owns_fabric())
        for d in self.cgroups.leftovers():
            gone.append(f"cgroup {d}")
        self.cgroups.remove_instance()
        return gone

    def _owns_fabric(self) -> bool:
        """We remove a named fabric netns only when it carries our instance prefix."""
        return bool(self.fabric.netns) and names.netns_is_ours(self.instance,
                                                               self.fabric.netns or "")
