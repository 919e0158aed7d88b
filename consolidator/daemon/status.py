"""The status document (format 1; docs/API.md): what runs, how it is doing, and why.

Built from the runtime and the rebalancer's last snapshot, never from a fresh read:
``status`` costs the daemon nothing but this.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..model import GuestState
from ..sched.rebalancer import Rebalancer
from .runtime import GuestRuntime, Runtime


def _cpu_percent(g: GuestRuntime, rb: Rebalancer | None) -> float | None:
    """From the rebalancer's last snapshot (it observes every running guest each
    interval, also when it only observes), if taken since this run of the guest began."""
    snap = rb.last if rb else None
    o = snap.guests.get(g.name) if snap is not None else None
    if o is None or o.cpu_rate is None or (g.started_at or 0) > snap.t:  # type: ignore[union-attr]
        return None
    return round(o.cpu_rate * 100, 1)


def _backup(name: str, figures: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The guest's newest backup and its age, and why its last attempt failed, if it did."""
    if figures is None:
        return None
    last = figures["last"].get(name)
    failed = figures["failures"].get(name)
    if last is None and failed is None:
        return None
    return {"last": last["id"] if last else None, "at": last["at"] if last else None,
            "age_s": round(now - last["at"], 1) if last else None, "failure": failed}


def _io(o: Any, share: tuple[int | None, int | None] | None) -> dict[str, Any] | None:
    """The last interval's disk and NIC rates, the counters since QEMU started, and the
    guest's part of the host budget in force."""
    if o is None:
        return None

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)
    return {"disk_read_bps": r(o.disk_rd), "disk_write_bps": r(o.disk_wr),
            "disk_iops": r(o.disk_iops), "net_rx_bps": r(o.net_rx), "net_tx_bps": r(o.net_tx),
            "disk_read_bytes": o.disk_bytes[0] if o.disk_bytes else None,
            "disk_written_bytes": o.disk_bytes[1] if o.disk_bytes else None,
            "disk_ops": sum(o.disk_ops) if o.disk_ops else None,
            "net_rx_bytes": o.net_bytes[0] if o.net_bytes else None,
            "net_tx_bytes": o.net_bytes[1] if o.net_bytes else None,
            "share_bps": share[0] if share else None,
            "share_iops": share[1] if share else None}


def _ksm(snap: Any, rb: Rebalancer, explain: bool) -> dict[str, Any] | None:
    """The host's KSM: its counters, what it saves, ksmd's CPU, and (explain) the
    policy's last decision and why."""
    k = snap.host.ksm if snap is not None else None
    if k is None:
        return None
    out: dict[str, Any] = {
        "mode": (rb.ksm_explain or {}).get("mode"), "run": k.run,
        "pages_to_scan": k.pages_to_scan, "sleep_ms": k.sleep_ms,
        "pages_shared": k.pages_shared, "pages_sharing": k.pages_sharing,
        "saved_bytes": k.saved, "full_scans": k.full_scans,
        "fleet_saved_bytes": snap.host.ksm_fleet,
        "cpu": None if snap.host.ksm_cpu is None else round(snap.host.ksm_cpu, 4)}
    if explain:
        out["explain"] = rb.ksm_explain
    return out


def document(runtime: Runtime, rb: Rebalancer | None, *, started: float,
             explain: bool = False, metrics: dict[str, Any] | None = None,
             net_guard: dict[str, Any] | None = None,
             dhcp: dict[str, Any] | None = None,
             backups: dict[str, Any] | None = None,
             history: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    snap = rb.last if rb else None
    guests = []
    for n, g in sorted(runtime.guests.items()):
        q = g.guest
        running = g.state in (GuestState.RUNNING, GuestState.ORPHANED)
        o = snap.guests.get(n) if snap is not None and running else None
        row: dict[str, Any] = {
            "name": n, "state": g.state.value,
            "pid": q.pid if q and running else None,
            "uptime_s": round(now - g.started_at, 1) if running and g.started_at else None,
            "vcpus": g.intent.vcpus,
            "cpu_percent": _cpu_percent(g, rb) if running else None,
            "balloon_bytes": (q.balloon_actual if q else None) if running else None,
            "memory_max_bytes": g.intent.memory.max,
            "memory_min_bytes": g.intent.memory_min,
            "ips": [nic.ip for nic in g.intent.nics if nic.ip],
            "restarts": g.restart_count,
            "last_event": g.last_event,
            "image": g.intent.image,
            "machine": q.spec.machine.name if q and running else None,
            "accel": q.spec.accel.name if q and running else None,
            "uid": (g.facts.get("identity") or {}).get("uid"),
            "errors": list(o.errors) if o is not None else [],
            # QEMU has not answered QMP for this long (a hung or stopped process): the
            # rebalancer leaves it alone until it answers again; null: it answers
            "unresponsive_s": round(o.unresponsive_s, 1) if o is not None and
            o.unresponsive_s is not None else None,
            "os": g.intent.os,
            "firmware": g.intent.firmware,
            "ready": g.intent.ready,
            "agent": g.agent_view if running and g.agent_view else None,
            "backup": _backup(n, backups, now),
            "io": _io(o, rb.io_caps.get(n) if rb else None),
            "memory_merge": g.intent.memory.merge,
            "ksm_merged_bytes": o.ksm_pages * 4096 if o is not None and o.ksm_pages
            is not None else None,
            "ksm_saved_bytes": o.ksm_saved if o is not None else None,
        }
        if explain:
            row["explain"] = rb.explain.get(n) if rb else None
        guests.append(row)
    fleet = runtime.fleet
    return {"format": 1, "instance": runtime.instance, "index": runtime.index,
            "supervisor": {"pid": os.getpid(), "uptime_s": round(now - started, 1)},
            "networks": [{"name": n, "subnet": str(s.subnet), "gateway": s.gateway,
                          "nat": s.nat, "dhcp": (dhcp or {}).get(n)}
                         for n, s in sorted(runtime.networks.items())],
            "metrics": metrics or {"listen": None, "serving": False, "error": None},
            "net_guard": net_guard or {"restores": 0, "last_restore": None, "error": None},
            "history": history,
            "rebalancer": ({"enabled": rb.active, "ticks": rb.ticks,
                            "host_state": rb.host_state.value,
                            "budget_bytes": fleet.budget if fleet else None,
                            "budget_now_bytes": rb.budget_now,
                            "io_budget_bps": getattr(rb.settings(), "io_bps", None),
                            "disk_bps": (round(snap.host.disk_bps, 1) if snap is not None
                                         and snap.host.disk_bps is not None else None),
                            "ksm": _ksm(snap, rb, explain)}
                           if rb else {"enabled": False}),
            "guests": guests}
