"""The floor every product figure is set against: the same QEMU argv, spawned by hand.

:class:`BareFleet` makes a fleet's networks, and each guest's netns, taps, cgroup and
jail, with the product's own executor (untimed); :meth:`BareFleet.spawn` then starts the
very argv the supervisor would, with the same placement, and nothing else: no supervisor,
no QMP client, no dnsmasq. Everything goes at the end, pass or fail.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable


class BareFleet:
    def __init__(self, inventory: Callable[[str, Path], str], prefix: str = "b") -> None:
        from consolidator.daemon.executor import Executor
        from consolidator.hostfacts import HostFacts
        from consolidator.model import parse_fleet
        from consolidator.state import StateDir
        self.inst = prefix + uuid.uuid4().hex[:7]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-bare-"))
        self.fleet = parse_fleet(inventory(self.inst, self.dir), "b.yaml", HostFacts.probe(),
                                 base_dir=self.dir)
        self.ex = Executor(self.fleet, StateDir(self.dir / "state").ensure())
        self.procs: list[subprocess.Popen[bytes]] = []
        for name, spec in self.fleet.networks.items():
            self.ex.create_network(name, spec)

    def prepare(self, names: list[str] | None = None) -> list[tuple[Any, Any, Any, Any]]:
        """(intent, wiring, guest, identity) of each guest, its files made, untimed."""
        out = []
        for name in names or list(self.fleet.guests):
            intent = self.fleet.guests[name]
            wiring, g, ident = self.ex.prepare_guest(intent)
            g.paths.dir.mkdir(parents=True, exist_ok=True)
            g.paths.serial_log.touch()
            out.append((intent, wiring, g, ident))
        return out

    def spawn(self, intent: Any, wiring: Any, g: Any, ident: Any) -> subprocess.Popen[bytes]:
        """QEMU with the product's argv, uid, jail, cgroup and netns."""
        from consolidator.vm.handles import Opened
        from consolidator.vm.qemu import build_argv
        pl = self.ex.placement(intent, wiring, ident)
        opened = Opened(g.spec, pl.tap_fds)
        try:
            p = subprocess.Popen(build_argv(g.spec, opened.handles), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, pass_fds=opened.handles.fds(),
                                 preexec_fn=pl.preexec)
        finally:
            opened.close()
            pl.close()
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.ex.destroy()
        self.ex.ids.release_state(str(self.ex.state.root.resolve()))
        shutil.rmtree(self.dir, ignore_errors=True)
