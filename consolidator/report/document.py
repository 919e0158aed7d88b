"""The capacity report as one document (format 1, docs/REPORT.md).

Built from the state dir alone (the applied fleet, guest records, the history database),
so it works with or without a running supervisor, and with little or no history: then
it says how little there is, and still reports allocations and guarantee-based fits.
Its renderings: JSON here, tables and Prometheus text in :mod:`.text`, HTML in :mod:`.html`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..backup.repo import Repo
from ..errors import StateError, UsageError
from ..inventory.files import QemuImgError, run_qemu_img
from ..hostfacts import HostFacts
from ..model import Fleet
from ..state import StateDir
from ..units import MiB, human_duration, parse_duration, parse_size
from . import capacity as cap
from .history import (choose_source, covered_since, guest_table, host_table, open_db,
                      percentile, thin)

FORMAT = 1
WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}


def parse_shape(text: str) -> cap.Shape:
    """``vcpus=1,memory=512MiB[,min=256MiB][,reserve=0.25][,disk=10GiB]``"""
    kv: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise UsageError(f"--shape {text!r}: expected key=value pairs, got {part!r}")
        kv[k.strip()] = v.strip()
    unknown = set(kv) - {"vcpus", "memory", "min", "reserve", "disk"}
    if unknown:
        raise UsageError(f"--shape: unknown keys {', '.join(sorted(unknown))}",
                         hint="vcpus, memory, min, reserve, disk")
    try:
        mem = parse_size(kv.get("memory", "512MiB"))
        return cap.Shape(int(kv.get("vcpus", "1")), mem, parse_size(kv.get("min", str(mem))),
                         float(kv.get("reserve", "0")), parse_size(kv.get("disk", "0")))
    except ValueError as e:
        raise UsageError(f"--shape {text!r}: {e}") from None


def _p(values: list[float], q: float) -> float | None:
    return None if not values else percentile(values, q)


def build(state_dir: Path, window: str = "1h", shapes: list[cap.Shape] | None = None,
          tiered: bool = False, headroom: float = 0.15, now: float | None = None,
          facts: HostFacts | None = None) -> dict[str, Any]:
    """The report of ``state_dir`` over ``window``. ``facts``: this host's (probed if None)."""
    if window not in WINDOWS:
        try:
            seconds = parse_duration(window)
        except ValueError:
            raise UsageError(f"--window {window!r}: use 1h, 24h, 7d or a duration") from None
    else:
        seconds = WINDOWS[window]
    now = time.time() if now is None else now
    st = StateDir(state_dir)
    applied = st.read_applied() if st.root.exists() else None
    if not applied:
        raise StateError(f"nothing has been applied in {state_dir}",
                         hint="consolidator apply first; the report describes a fleet")
    fleet = Fleet.model_validate(applied["fleet"])
    facts = facts or HostFacts.probe()
    since = now - seconds
    hist_path = st.history_path
    series: dict[str, Any] = {}
    history_s = 0.0
    source = "none"
    if hist_path.exists():
        db = open_db(hist_path, readonly=True)
        try:
            first = covered_since(db)
            if first is not None:
                history_s = max(0.0, now - first)
            source = choose_source(db, since)
            host = host_table(db, ("cpu", "mem_used", "budget", "disk_bps", "io_budget",
                                   "ksm_saved", "ksm_fleet", "ksm_cpu"), since, source)
            guests_t = guest_table(db, ("cpu", "ws", "balloon", "disk_rd", "disk_wr",
                                        "disk_iops", "net_rx", "net_tx", "ksm_saved"),
                                   since, source)
            series = {
                "host_cpu": host["cpu"], "host_mem_used": host["mem_used"],
                "budget": host["budget"],
                "cpu": {g: m["cpu"] for g, m in guests_t.items()},
                "ws": {g: m["ws"] for g, m in guests_t.items()},
                "balloon": {g: m["balloon"] for g, m in guests_t.items()},
                "disk_bps": host["disk_bps"], "io_budget": host["io_budget"],
                "io": {g: {k: m[k] for k in ("disk_rd", "disk_wr", "disk_iops", "net_rx",
                                             "net_tx")} for g, m in guests_t.items()},
                "ksm_host": host["ksm_saved"], "ksm_fleet": host["ksm_fleet"],
                "ksm_cpu": host["ksm_cpu"],
                "ksm": {g: m["ksm_saved"] for g, m in guests_t.items()},
            }
        finally:
            db.close()
    have = bool(series) and bool(series["host_cpu"].points)
    history_s = round(history_s, 1)          # one figure for the header, the note and JSON
    note = None
    if not have:
        note = "no history recorded yet: allocations and guarantee-based fits only"
    elif history_s < seconds * 0.5:
        note = (f"only {human_duration(history_s)} of history for a {window} window: usage "
                "figures are early estimates")

    guests = []
    committed = cap.Committed(0, 0.0, 0, 0)
    records = {n: (st.read_guest_record(n) or {}) for n in st.guest_names()}
    storage = _storage(st, fleet, now)
    for name, g in sorted(fleet.guests.items()):
        disk = storage["guests"][name]
        committed = cap.Committed(committed.vcpus + g.vcpus, committed.reserve + g.cpu.reserve,
                                  committed.memory_max + g.memory.max,
                                  committed.memory_min + g.memory_min,
                                  committed.disk_virtual + disk["virtual_size"],
                                  committed.disk_allocated + disk["allocated"])
        cpu_v = series["cpu"][name].values() if have and name in series["cpu"] else []
        ws_v = series["ws"][name].values() if have and name in series["ws"] else []
        bal_v = series["balloon"][name].values() if have and name in series["balloon"] else []
        ws95 = _p(ws_v, 0.95)
        rmax, rmin, mreason = cap.recommend_memory(g.memory.max, g.memory_min, ws95)
        rec = records.get(name, {})
        guests.append({
            "name": name, "state": rec.get("state", "defined"),
            "vcpus": g.vcpus, "cpu_reserve": g.cpu.reserve, "cpu_limit": g.cpu.limit,
            "cpu_shares": g.cpu.shares, "memory_max": g.memory.max,
            "disk_virtual": disk["virtual_size"], "disk_allocated": disk["allocated"],
            "memory_min": g.memory_min, "restarts": int(rec.get("restarts", 0)),
            "cpu": {"p50": _p(cpu_v, 0.5), "p95": _p(cpu_v, 0.95),
                    "max": max(cpu_v) if cpu_v else None,
                    "mean": sum(cpu_v) / len(cpu_v) if cpu_v else None},
            "working_set": {"p50": _p(ws_v, 0.5), "p95": ws95,
                            "max": max(ws_v) if ws_v else None},
            "balloon": {"min": min(bal_v) if bal_v else None,
                        "max": max(bal_v) if bal_v else None,
                        "mean": sum(bal_v) / len(bal_v) if bal_v else None},
            "recommendation": {"memory_max": rmax, "memory_min": rmin, "memory": mreason,
                               "cpu": cap.recommend_cpu(g.vcpus, g.cpu.reserve,
                                                        _p(cpu_v, 0.95))},
        })

    capacity = cap.Capacity(fleet.usable_cpus, fleet.budget, fleet.host.overcommit.cpus,
                            fleet.host.overcommit.memory, storage["state_fs"]["free"])
    host_cpu_v = series["host_cpu"].values() if have else []
    # what the guests hold: sum of balloon sizes at each instant
    mem_hold = []
    if have:
        per_t: dict[float, float] = {}
        for s in series["balloon"].values():
            for t, v in s.points:
                if v is not None:
                    per_t[t] = per_t.get(t, 0.0) + v
        mem_hold = list(per_t.values())
    guest_cpu_p95 = sum((g["cpu"]["p95"] or 0.0) for g in guests)
    obs = cap.Observed(cpu_p95=guest_cpu_p95,
                       memory_p95=int(_p(mem_hold, 0.95) or committed.memory_max))
    merging = _merging(series, fleet) if have else None
    obs_merged = None
    if merging is not None and merging["fleet_saved"]["max"]:
        # what the host holds for the guests: their sizes less what merging saves, at
        # each instant
        held = _summed(*series["balloon"].values(),
                       *(_negated(sr) for sr in series["ksm"].values()))
        obs_merged = cap.Observed(obs.cpu_p95, int(_p(held, 0.95) or obs.memory_p95))

    if not shapes:
        seen: dict[tuple, cap.Shape] = {}
        for g in fleet.guests.values():
            s = cap.Shape(g.vcpus, g.memory.max, g.memory_min, g.cpu.reserve,
                          storage["guests"][g.name]["virtual_size"])
            seen.setdefault((s.vcpus, s.memory, s.min, s.reserve, s.disk), s)
        shapes = list(seen.values()) or [cap.Shape(1, 512 * MiB, 512 * MiB)]
    fits = []
    for s in shapes:
        same = [g for g in guests if (g["vcpus"], g["memory_max"], g["memory_min"],
                                      g["cpu_reserve"]) == (s.vcpus, s.memory, s.min,
                                                            s.reserve)]
        per_disk = (sum(g["disk_allocated"] for g in same) // len(same)) if same and \
            s.disk else s.disk
        per_cpu = (sum((g["cpu"]["p95"] or 0.0) for g in same) / len(same)
                   if same and have else max(s.reserve, 0.1))
        per_mem = (sum((g["balloon"]["max"] or s.min) for g in same) / len(same)
                   if same and have else s.min)
        g_fit = cap.by_guarantees(s, capacity, committed)
        entry: dict[str, Any] = {"shape": s.label(),
                                 "shape_fields": {"vcpus": s.vcpus, "memory": s.memory,
                                                  "min": s.min, "reserve": s.reserve},
                                 "by_guarantees": _fit_json(g_fit)}
        if have:
            entry["by_observed"] = _fit_json(cap.by_observed(
                s, capacity, committed, obs, per_guest_cpu=per_cpu,
                per_guest_memory=int(per_mem), headroom=headroom, per_guest_disk=per_disk))
            entry["by_observed"]["assumed_per_guest"] = {"cpu": per_cpu,
                                                         "memory": int(per_mem)}
        else:
            entry["by_observed"] = None
        entry["by_observed_merged"] = None
        if obs_merged is not None:
            # a new guest of the shape saves what its like save now (a mean of means)
            saves = [merging["guests"][g["name"]]["mean"] or 0.0 for g in same
                     if g["name"] in merging["guests"]]
            per_merged = max(MiB, per_mem - (sum(saves) / len(saves) if saves else 0.0))
            entry["by_observed_merged"] = _fit_json(cap.by_observed(
                s, capacity, committed, obs_merged, per_guest_cpu=per_cpu,
                per_guest_memory=int(per_merged), headroom=headroom,
                per_guest_disk=per_disk))
            entry["by_observed_merged"]["assumed_per_guest"] = {"cpu": per_cpu,
                                                                "memory": int(per_merged)}
        if tiered:
            entry["tiers"] = [{"shape": t.shape.label(), "count": t.count,
                               "binding": t.binding}
                              for t in cap.tiered(s, capacity, committed)]
        fits.append(entry)

    doc: dict[str, Any] = {
        "format": FORMAT, "generated_at": now, "instance": fleet.instance,
        "window": {"name": window, "seconds": seconds, "since": since, "source": source,
                   "history_seconds": history_s, "note": note},
        "host": {
            "cpus": facts.ncpus, "usable_cpus": fleet.usable_cpus,
            "memory_total": facts.memory_total,
            "reserve": {"cpus": fleet.host.reserve.cpus, "memory": fleet.host.reserve.memory},
            "budget": fleet.budget,
            "committed": {"vcpus": committed.vcpus, "cpu_reserve": committed.reserve,
                          "memory_max": committed.memory_max,
                          "memory_min": committed.memory_min},
            "overcommit": {
                "vcpus_per_usable_core": committed.vcpus / fleet.usable_cpus
                if fleet.usable_cpus else None,
                "memory_max_per_budget": committed.memory_max / fleet.budget
                if fleet.budget else None,
                "limit_cpus": fleet.host.overcommit.cpus,
                "limit_memory": fleet.host.overcommit.memory},
            "usage": {
                "cpu_now": host_cpu_v[-1] if host_cpu_v else None,
                "cpu_p95": _p(host_cpu_v, 0.95),
                "guests_cpu_p95": guest_cpu_p95 if have else None,
                "guest_memory_now": mem_hold[-1] if mem_hold else None,
                "guest_memory_p95": _p(mem_hold, 0.95)},
            "headroom": {
                "cpu": (fleet.usable_cpus - guest_cpu_p95) if have else None,
                "memory": (fleet.budget - (_p(mem_hold, 0.95) or 0)) if have else None},
        },
        "guests": guests,
        "storage": storage,
        "io": _io(series, fleet) if have else None,
        "merging": merging,
        "fits": fits,
        "charts": _chart_data(series, fleet) if have else None,
    }
    return doc


class _negated:
    """A series with its values' signs turned (to subtract it in :func:`_summed`)."""

    def __init__(self, sr: Any) -> None:
        self.points = [(t, None if v is None else -v) for t, v in sr.points]


def _ksm_now(root: Path = Path("/sys/kernel/mm/ksm")) -> dict[str, Any] | None:
    """The kernel's counters as the report is made (None: no KSM here)."""
    try:
        shared = int((root / "pages_shared").read_text())
        sharing = int((root / "pages_sharing").read_text())
        run = int((root / "run").read_text())
    except (OSError, ValueError):
        return None
    return {"run": run, "pages_shared": shared, "pages_sharing": sharing,
            "saved_bytes": sharing * 4096}


def _merging(series: dict[str, Any], fleet: Fleet) -> dict[str, Any]:
    """Memory saved by same-page merging over the window: the fleet's part (each guest's
    merged pages less its share of the pages that hold them), the host's in all, ksmd's
    CPU, and the kernel's counters now."""
    fleet_v = series["ksm_fleet"].values()
    host_v = series["ksm_host"].values()
    per = {n: _stats(series["ksm"][n].values()) for n in sorted(fleet.guests)
           if n in series["ksm"]}
    return {"mode": fleet.host.ksm,
            "fleet_saved": {**_stats(fleet_v), "now": fleet_v[-1] if fleet_v else None},
            "host_saved": {**_stats(host_v), "now": host_v[-1] if host_v else None},
            "ksmd_cpu": _stats(series["ksm_cpu"].values()),
            "guests": per,
            "no_merge": sorted(n for n, g in fleet.guests.items() if not g.memory.merge),
            "kernel_now": _ksm_now(),
            "includes_merging": ["merging.*", "fits[].by_observed_merged"],
            "excludes_merging": ["host.usage.guest_memory_*", "host.headroom.memory",
                                 "fits[].by_observed", "guests[].balloon"]}


def _summed(*series: Any) -> list[float]:
    """The series added sample by sample (a sample missing from one counts as 0)."""
    per_t: dict[float, float] = {}
    for sr in series:
        for t, v in sr.points:
            if v is not None:
                per_t[t] = per_t.get(t, 0.0) + v
    return [per_t[t] for t in sorted(per_t)]


def _moved(*series: Any) -> float:
    """Bytes a rate series adds up to over the window: each raw sample is the rate over
    the interval it ends, an aggregate's mean over its whole bucket."""
    total = 0.0
    for sr in series:
        pts = [(t, v) for t, v in sr.points if v is not None]
        if sr.source != "raw":
            total += sum(v for _, v in pts) * (60 if sr.source == "1m" else 3600)
            continue
        gaps = sorted(b[0] - a[0] for a, b in zip(pts, pts[1:]))
        typical = gaps[len(gaps) // 2] if gaps else 1.0
        for i, (t, v) in enumerate(pts):
            dt = t - pts[i - 1][0] if i else typical
            total += v * min(dt, 3 * typical)     # a gap (supervisor down) is not I/O
    return total


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"p50": _p(values, 0.5), "p95": _p(values, 0.95),
            "max": max(values) if values else None,
            "mean": sum(values) / len(values) if values else None}


def _io(series: dict[str, Any], fleet: Fleet) -> dict[str, Any]:
    """Disk and NIC rates over the window: each guest's p50/p95/max, the top consumers by
    their mean, and how often the guests together filled the host's disk budget."""
    per = {}
    for name in sorted(fleet.guests):
        m = series["io"].get(name)
        if m is None:
            continue
        per[name] = {"disk_bps": _stats(_summed(m["disk_rd"], m["disk_wr"])),
                     "disk_iops": _stats(m["disk_iops"].values()),
                     "net_bps": _stats(_summed(m["net_rx"], m["net_tx"])),
                     "disk_bytes": _moved(m["disk_rd"], m["disk_wr"]),
                     "net_bytes": _moved(m["net_rx"], m["net_tx"])}

    def top(key: str) -> list[dict[str, Any]]:
        ranked = sorted(((v[key]["mean"] or 0.0, n) for n, v in per.items()), reverse=True)
        return [{"guest": n, "mean": mean, "p95": per[n][key]["p95"]}
                for mean, n in ranked[:3] if mean > 0]
    host = series["disk_bps"].points
    budgets = dict((t, v) for t, v in series["io_budget"].points if v)
    full = [t for t, v in host if v is not None and t in budgets and v >= 0.95 * budgets[t]]
    seen = [t for t, v in host if v is not None and t in budgets]
    return {"guests": per, "top_disk": top("disk_bps"), "top_net": top("net_bps"),
            "host_disk_bps": _stats([v for _, v in host if v is not None]),
            "budget_bps": max(budgets.values()) if budgets else None,
            "saturated_fraction": len(full) / len(seen) if seen else None}


def _storage(st: StateDir, fleet: Fleet, now: float) -> dict[str, Any]:
    """Each guest's disks (virtual size, allocated), snapshots and backups; the free
    space of the state dir's and the backup dir's filesystems."""
    repo = Repo(fleet.host.backup.dir or st.root / "backups")
    backups: dict[str, list[Any]] = {}
    if repo.root.exists():
        for b in repo.backups():
            if b.manifest:
                backups.setdefault(b.guest, []).append(b)
    guests = {}
    for name in fleet.guests:
        gdir = st.guest_dir(name)
        disks = []
        for p in sorted(gdir.glob("*.qcow2")) if gdir.is_dir() else []:
            if p.name != "disk.qcow2" and not p.name.startswith("data-"):
                continue
            if ".replaced-" in p.name:
                continue
            try:
                info = json.loads(run_qemu_img("info", "-U", "--output=json", str(p)))
                disks.append({"file": p.name, "virtual_size": int(info["virtual-size"]),
                              "allocated": p.stat().st_blocks * 512})
            except (QemuImgError, OSError, ValueError, KeyError):
                continue
        mine = backups.get(name, [])
        last = mine[-1] if mine else None
        guests[name] = {
            "disks": disks, "virtual_size": sum(d["virtual_size"] for d in disks),
            "allocated": sum(d["allocated"] for d in disks),
            "snapshots": [x["tag"] for x in st.read_snapshots(name)] if gdir.is_dir() else [],
            "backups": {"count": len(mine), "bytes": sum(b.size() for b in mine),
                        "last": last.id if last else None,
                        "last_at": last.taken_at if last else None,
                        "age_s": round(now - last.taken_at, 1) if last else None}}
    return {"state_fs": _fs(st.root), "backup_dir": {**_fs(repo.root),
                                                     "exists": repo.root.exists()},
            "guests": guests}


def _fs(path: Path) -> dict[str, Any]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        v = os.statvfs(probe)
        return {"dir": str(path), "free": v.f_bavail * v.f_frsize,
                "size": v.f_blocks * v.f_frsize}
    except OSError:
        return {"dir": str(path), "free": None, "size": None}


def _fit_json(f: cap.Fit) -> dict[str, Any]:
    return {"count": f.count, "binding": f.binding, "limits": f.limits, "detail": f.detail}


def _chart_data(series: dict[str, Any], fleet: Fleet) -> dict[str, Any]:
    def pts(s: Any) -> list[list[float]]:
        return [[t, v] for t, v in thin(s.points)]
    return {
        "host_cpu": pts(series["host_cpu"]),
        "host_mem_used": pts(series["host_mem_used"]),
        "budget": fleet.budget,
        "guests": {g: {"cpu": pts(series["cpu"][g]) if g in series["cpu"] else [],
                       "ws": pts(series["ws"][g]) if g in series["ws"] else [],
                       "balloon": pts(series["balloon"][g]) if g in series["balloon"] else [],
                       "max": fleet.guests[g].memory.max}
                   for g in sorted(fleet.guests)},
    }


# ================================================================= renderings

def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, default=str)
