"""The networks' DHCP and DNS servers: one dnsmasq per network, following the fleet.

:meth:`DhcpServers.sync` makes the running servers match the fleet (the applier calls it
once the networks exist and before guests start, and again at the end; the supervisor
at startup). A server whose configuration (:class:`consolidator.net.dhcp.Service`) is
unchanged is left alone. A server that dies is started again, after 1, 2, 4 ... 30 s,
and ``status`` shows its restarts. Each runs in a cgroup of the instance (``guests/dhcp.<network>``), emptied before a start:
dnsmasq drops to its own user, which clears ``PR_SET_PDEATHSIG``, so one whose supervisor
died is still there, holding its address, until a new supervisor, ``destroy`` or ``gc``
clears it. (It is spawned from the event loop's thread anyway: the signal covers the
moment before the drop, and it follows the spawning *thread*.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..files import rotate_log
from ..linux import OOM_ADJ_GUEST, set_oom_score_adj
from ..net import dhcp
from .lifecycle import Lifecycle
from .runtime import Runtime

log = structlog.get_logger("dhcp")

LOG_CAP = 1 << 20
BACKOFF_MAX = 30.0


@dataclass
class _Server:
    service: dhcp.Service
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    started: float = 0.0
    restarts: int = 0
    error: str | None = None
    retry: asyncio.TimerHandle | None = None
    history: list[float] = field(default_factory=list)


def _stopped(pid: int) -> str | None:
    """Why a live dnsmasq cannot answer, as its process state says: stopped by a signal
    (SIGSTOP, a debugger). It is not restarted for it: after SIGCONT it answers again."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(512).rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return {b"T": "stopped by a signal", b"t": "stopped by a tracer"}.get(state)


class DhcpServers:
    def __init__(self, runtime: Runtime, lifecycle: Lifecycle) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.servers: dict[str, _Server] = {}
        self._lock = asyncio.Lock()

    def wanted(self) -> dict[str, dhcp.Service]:
        """Pure over the runtime's fleet: the server each network should have."""
        fleet = self.runtime.fleet
        ex = self.lifecycle.executor
        if fleet is None or ex is None:
            return {}
        out = {}
        for name, spec in fleet.networks.items():
            if not spec.dhcp:
                continue
            hosts = [dhcp.Host(g.name, n.mac, n.ip) for g in fleet.guests.values()
                     for n in g.nics if n.network == name and n.ip]
            out[name] = dhcp.service(fleet.instance, ex.fabric.netns, name, spec, hosts)
        return out

    async def sync(self) -> None:
        async with self._lock:
            wanted = self.wanted()
            for name in sorted(set(self.servers) - set(wanted)):
                await self._stop(name)
            for name, svc in sorted(wanted.items()):
                have = self.servers.get(name)
                if have is not None and have.service == svc and self._alive(have):
                    continue
                if have is not None:
                    await self._stop(name)
                self.servers[name] = srv = _Server(svc)
                await self._start(name, srv)

    async def _start(self, name: str, srv: _Server) -> None:
        ex = self.lifecycle.executor
        if ex is None:
            return
        svc = srv.service
        try:
            if svc.netns != ex.fabric.netns:            # an isolated network's own netns
                await asyncio.to_thread(ex.fabric.ensure_service, name, self._spec(name))
            leases, logf = self._paths(name)
            rotate_log(logf, LOG_CAP)
            procs = await asyncio.to_thread(self._cgroup, name)
            srv.proc = dhcp.spawn(svc, leases, logf, procs)   # this thread: see docstring
            set_oom_score_adj(srv.proc.pid, OOM_ADJ_GUEST)    # not the supervisor's
        except Exception as e:  # noqa: BLE001 - reported in status, retried
            srv.error = f"{type(e).__name__}: {e}"
            log.warning("dhcp.start_failed", network=name, error=srv.error)
            self._retry(name, srv)
            return
        srv.started = time.monotonic()
        srv.error = None
        srv.pidfd = os.pidfd_open(srv.proc.pid)
        asyncio.get_running_loop().add_reader(srv.pidfd, self._exited, name, srv)
        log.info("dhcp.started", network=name, pid=srv.proc.pid, address=svc.address,
                 hosts=len(svc.hosts), netns=svc.netns)

    def _cgroup(self, name: str) -> list[Any]:
        """The server's cgroup, emptied first: a dnsmasq an earlier supervisor left there
        (it outlives its parent once it has dropped to its user) holds the address."""
        ex = self.lifecycle.executor
        assert ex is not None and ex.cgroups is not None
        cg = dhcp.cgroup_name(name)
        ex.cgroups.create_guest(cg)
        ex.cgroups.kill(cg)
        return ex.cgroups.procs_files(cg)

    def _spec(self, name: str) -> Any:
        fleet = self.runtime.fleet
        assert fleet is not None
        return fleet.networks[name]

    def _paths(self, name: str) -> tuple[Any, Any]:
        d = self.runtime.state.networks_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d / f"{name}.leases", d / f"{name}.dnsmasq.log"

    @staticmethod
    def _alive(srv: _Server) -> bool:
        return srv.proc is not None and srv.proc.poll() is None

    def _unwatch(self, srv: _Server) -> None:
        if srv.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(srv.pidfd)
            os.close(srv.pidfd)
            srv.pidfd = None

    def _exited(self, name: str, srv: _Server) -> None:
        self._unwatch(srv)
        code = srv.proc.poll() if srv.proc else None
        if self.servers.get(name) is not srv:
            return
        srv.error = f"dnsmasq exited ({code})"
        log.warning("dhcp.exited", network=name, status=code)
        self._retry(name, srv)

    def _retry(self, name: str, srv: _Server) -> None:
        now = time.monotonic()
        srv.history = [t for t in srv.history if now - t < 300] + [now]
        delay = min(BACKOFF_MAX, 2.0 ** (len(srv.history) - 1))

        def again() -> None:
            srv.retry = None
            if self.servers.get(name) is srv:
                srv.restarts += 1
                asyncio.ensure_future(self._start(name, srv))
        srv.retry = asyncio.get_running_loop().call_later(delay, again)

    async def _stop(self, name: str, keep_netns: bool = False) -> None:
        srv = self.servers.pop(name, None)
        if srv is None:
            return
        if srv.retry is not None:
            srv.retry.cancel()
        self._unwatch(srv)
        if srv.proc is not None and srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(srv.proc.wait), 5)
            except asyncio.TimeoutError:
                srv.proc.kill()
                await asyncio.to_thread(srv.proc.wait)
        ex = self.lifecycle.executor
        if ex is not None and ex.cgroups is not None:
            cg = dhcp.cgroup_name(name)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ex.cgroups.kill, cg)
                await asyncio.to_thread(ex.cgroups.remove_guest, cg)
        if ex is not None and srv.service.netns != ex.fabric.netns and not keep_netns:
            await asyncio.to_thread(ex.fabric.remove_service, name)
        log.info("dhcp.stopped", network=name)

    async def close(self, *, keep_netns: bool = False) -> None:
        """Stop every server: at destroy; at shutdown keeping the isolated networks'
        service netns, which the next supervisor's servers use again."""
        async with self._lock:
            for name in sorted(self.servers):
                await self._stop(name, keep_netns=keep_netns)

    def state(self) -> dict[str, Any]:
        return {n: {"pid": s.proc.pid if self._alive(s) else None,
                    "address": s.service.address, "hosts": len(s.service.hosts),
                    "restarts": s.restarts, "error": s.error,
                    "unresponsive": _stopped(s.proc.pid) if self._alive(s) and s.proc
                    else None}
                for n, s in sorted(self.servers.items())}
