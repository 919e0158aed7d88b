"""The executor: the only code that turns decisions into kernel objects and processes.

It works per network and per guest, in the order the planner gives. Every object it is
about to create is noted *before* it is created (networks in their record, guests
through the ``note`` callback the runtime persists), so that after a crash ``destroy``
and ``gc`` know what may exist. Its calls are synchronous (netlink, cgroupfs, nft); the
supervisor runs them off its event loop. Removing a whole instance is
:mod:`.teardown`'s, the one teardown path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from ..backup.repo import Repo
from ..backup.templates import make_template
from ..errors import ConsolidatorError, HostError, LaunchError
from ..inventory.schema import NetworkSpec
from ..model import Fleet, GuestIntent
from ..net import names
from ..net import netns as ns
from ..net.fabric import Fabric, GuestWiring, NicShape, NicWiring
from ..sched.cgroup import (PIDS_MAX, CgroupDriver, CgroupSettings, detect, memory_limit,
                            memory_protection)
from ..state import StateDir
from ..vm.guest import Guest
from ..vm.identity import Identity, Owner, Registry, named_user
from ..vm.jail import Jail, plan_jail
from ..vm.launch import VirtHost, image_cache_dir, launch_spec, prepare_boot
from ..vm.placement import GuestPlacement
from ..vm.qemu import DEFAULT_TB_SIZE_MIB, RunPaths
from . import teardown

Note = Callable[..., None]

log = structlog.get_logger("executor")


def cgroup_settings(intent: GuestIntent, tb_size_mib: int = DEFAULT_TB_SIZE_MIB, *,
                    weight: bool = True) -> CgroupSettings:
    """Pure: the static cgroup settings for a guest. ``weight`` false leaves the CPU
    weight out: the rebalancer owns it while it runs the guest."""
    return CgroupSettings(
        cpu_shares=intent.cpu.shares if weight else None, cpu_quota_cores=intent.cpu.limit,
        cpus=intent.cpu.pin,
        memory_limit=memory_limit(intent.memory.max, tb_size_mib),
        memory_low=memory_protection(intent.memory_min), pids_max=PIDS_MAX)


def nic_wiring(intent: GuestIntent) -> list[NicWiring]:
    return [NicWiring(i, n.network, n.mac, (n.ip,) if n.ip else ())
            for i, n in enumerate(intent.nics)]


def nic_shapes(intent: GuestIntent) -> list[NicShape]:
    return [NicShape(i, n.rate, n.burst) for i, n in enumerate(intent.nics)]


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
    ids: Registry = field(default_factory=Registry)

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
        self._jail: Jail | None = None

    # --------------------------------------------------------------- identity
    def identity(self, name: str) -> Identity:
        """Whom ``name``'s QEMU runs as: a uid of its own from ``host.guest_ids`` (the one
        its record names, while that is still its own), every guest the same named user
        (``host.runas: <user>``), or root (``host.runas: root``, warned about)."""
        runas = self.fleet.host.runas
        if runas == "root":
            return Identity(0, 0)
        if runas:
            return named_user(runas)
        facts = (self.state.read_guest_record(name) or {}).get("facts")
        want = ((facts if isinstance(facts, dict) else {}).get("identity") or {}).get("uid")
        ids = self.fleet.host.guest_ids
        uid = self.ids.claim(self.owner(name), ids.first, ids.count,
                             want=want if isinstance(want, int) else None)
        return Identity(uid, uid)

    def owner(self, name: str) -> Owner:
        return Owner(str(self.state.root.resolve()), name)

    def release_identity(self, name: str) -> None:
        """``name`` is gone: its uid may go to another guest."""
        freed = self.ids.release(self.owner(name))
        if freed:
            log.info("guest.uid_released", guest=name, uids=freed)

    @property
    def jail(self) -> Jail:
        if self._jail is None:
            self._jail = plan_jail("qemu-system-x86_64")
        return self._jail

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
        self.state.remove_network_record(name)
        log.info("network.removed", network=name)

    # ------------------------------------------------------------------ guests
    def backup_repo(self) -> Repo:
        return Repo(self.fleet.host.backup.dir or self.state.root / "backups")

    def guest_dir(self, name: str) -> Path:
        return self.state.guest_dir(name)

    def prepare_guest(self, intent: GuestIntent, progress: Callable[[str], None] | None = None,
                      note: Note | None = None) -> tuple[GuestWiring, Guest, Identity]:
        """Everything but the launch: identity, wiring, cgroup, boot files, the Guest
        object. ``note`` hears the objects it is about to make, before it makes them."""
        assert self.cgroups is not None
        gdir = self.guest_dir(intent.name)
        gdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(gdir, 0o700)
        ident = self.identity(intent.name)
        cg_dirs = self.cgroups.unique_dirs("guests", intent.name)
        if note is not None:
            note(identity=ident.to_json(),
                 objects=planned_objects(self.instance, self.fabric.netns, intent, cg_dirs))
        wiring = self.fabric.wire_guest(intent.name, nic_wiring(intent))
        if progress is not None:
            progress("cgroup")
        try:
            if any(n.rate for n in intent.nics):
                self.fabric.shape_guest(intent.name, nic_shapes(intent))
            self.cgroups.create_guest(intent.name)
            self.cgroups.apply(intent.name, cgroup_settings(intent))
            if intent.image_spec.from_ and intent.image_spec.disk:
                if make_template(intent.image_spec.from_, Path(intent.image_spec.disk),
                                 guests_dir=self.state.guests_dir, repo=self.backup_repo()):
                    log.info("template.made", ref=intent.image_spec.from_,
                             path=intent.image_spec.disk)
            boot = prepare_boot(intent, self.image_cache, gdir,
                                roots=self.fleet.image_roots, owner=ident,
                                uefi=self.fleet.host.uefi, networks=self.fleet.networks)
        except BaseException:
            self.fabric.unwire_guest(intent.name, len(intent.nics))
            with contextlib.suppress(ConsolidatorError):
                self.cgroups.remove_guest(intent.name)
            raise
        spec = launch_spec(intent, boot, RunPaths.for_guest(gdir), self.virt,
                           taps=wiring.taps)
        hint_pvm = spec.accel.name == "kvm" and spec.pvm_host
        return wiring, Guest(spec, hint_pvm=hint_pvm, ready_probe=intent.ready,
                             ready_timeout=intent.ready_timeout,
                             tcp_probe=self.tcp_probe(intent)), ident

    def tcp_probe(self, intent: GuestIntent) -> Callable[[int], bool] | None:
        """Connects to the guest's first address from the fabric netns (its networks'
        gateways are there): blocking, for a worker thread."""
        ip = next((n.ip for n in intent.nics if n.ip and n.gateway), None)
        if ip is None:
            return None
        where = self.fabric.netns

        def probe(port: int) -> bool:
            with ns.entered(where):
                try:
                    with socket.create_connection((ip, port), timeout=1.0):
                        return True
                except OSError:
                    return False
        return probe

    def placement(self, intent: GuestIntent, wiring: GuestWiring,
                  ident: Identity) -> GuestPlacement:
        """Where and as whom the guest's QEMU runs; holds its taps. Blocking."""
        assert self.cgroups is not None
        try:
            return GuestPlacement(self.cgroups.procs_files(intent.name),
                                  ns.path(wiring.netns), identity=ident, jail=self.jail,
                                  taps=wiring.taps)
        except OSError as e:
            raise LaunchError(f"guest {intent.name}: cannot place its QEMU: {e}") from e

    async def start_guest(self, intent: GuestIntent, guest: Guest | None = None, *,
                          progress: Callable[[str], None] | None = None,
                          gate: asyncio.Semaphore | None = None,
                          note: Note | None = None) -> Guest:
        """Wire, place and launch ``intent``; on failure leave nothing of it running.

        The blocking parts (netlink, cgroupfs, nft, image build) run in a worker thread:
        pyroute2's synchronous API cannot run inside an event loop, and one guest's
        setup must not stall the others. ``gate`` bounds how many guests are in their
        host-side start work at once (wiring, cgroup, boot files, spawn); it is released
        as soon as QEMU runs, since its initialisation and boot are its own CPU, not ours
        (held until the QMP greeting, it spawned QEMUs two at a time on two cores).
        ``progress`` hears network, cgroup, launch, boot; ``note`` the objects made."""
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
            if phase == "spawned":
                release()           # the rest (QEMU's init, its greeting) is QEMU's CPU
                return
            say(phase)

        try:
            say("network")
            wiring, g, ident = await asyncio.to_thread(self.prepare_guest, intent, say, note)
            if guest is not None:            # a restart keeps the object (and its history)
                guest.spec = g.spec
                g = guest
            try:
                placement = await asyncio.to_thread(self.placement, intent, wiring, ident)
            except BaseException:
                await asyncio.to_thread(self.teardown_guest, intent, None)
                raise
            if note is not None:
                note(netns=wiring.netns, cgroups=[
                    str(p) for p in self.cgroups.unique_dirs("guests", intent.name)])
            try:
                await g.launch(placement, on_phase=on_phase)
            except BaseException:
                await asyncio.to_thread(self.teardown_guest, intent, g)
                raise
            finally:
                placement.close()
        finally:
            release()
        return g

    def teardown_guest(self, intent: GuestIntent, g: Guest | None = None) -> None:
        """Undo what starting made (after QEMU is gone): netns, ports, rules, cgroup."""
        assert self.cgroups is not None
        if g is not None:
            g.abandon()
        self.cgroups.kill(intent.name)
        self.fabric.unwire_guest(intent.name, len(intent.nics))
        self.cgroups.remove_guest(intent.name)

    async def stop_guest(self, intent: GuestIntent, g: Guest, timeout: float = 10.0,
                         undo: bool = True) -> None:
        await g.shutdown(timeout=timeout)
        if undo:
            await asyncio.to_thread(self.teardown_guest, intent, g)
        else:
            g.abandon()

    def remove_guest(self, name: str, nics: int | None = None) -> None:
        """The kernel objects of a guest that goes (its files are the state dir's)."""
        assert self.cgroups is not None
        self.cgroups.kill(name)
        self.fabric.unwire_guest(name, nics)
        self.cgroups.remove_guest(name)

    def apply_live(self, intent: GuestIntent, *, weight: bool = True,
                   nics: bool = False) -> list[str]:
        """The cgroup knobs of a running guest, and with ``nics`` its NICs' rates;
        ``weight`` false leaves its CPU weight to the rebalancer. Returns what it wrote."""
        assert self.cgroups is not None
        written = self.cgroups.apply(intent.name, cgroup_settings(intent, weight=weight))
        if nics:
            written += self.fabric.shape_guest(intent.name, nic_shapes(intent))
        return written

    @property
    def scope(self) -> teardown.Scope:
        return teardown.Scope(self.instance, self.fleet.host.fabric_netns,
                              self.fleet.host.cgroup_parent)

    def destroy(self) -> list[str]:
        """Every kernel object of the instance: see :func:`.teardown.collect`."""
        return teardown.collect(self.scope)
