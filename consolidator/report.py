"""The capacity report: one document (format 1, docs/REPORT.md), four renderings.

Built from the state dir alone (the applied fleet, guest records, the history database),
so it works with or without a running supervisor, and with little or no history: then
it says how little there is, and still reports allocations and guarantee-based fits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .errors import StateError, UsageError
from .hostfacts import HostFacts
from .model import Fleet
from .sched import capacity as cap
from .sched.history import (choose_source, covered_since, guest_table, host_table, open_db,
                            percentile, thin)
from .state import StateDir
from .units import human_duration, human_size, parse_duration, parse_size

FORMAT = 1
WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
MiB = 1 << 20


def parse_shape(text: str) -> cap.Shape:
    """``vcpus=1,memory=512MiB[,min=256MiB][,reserve=0.25]``"""
    kv: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise UsageError(f"--shape {text!r}: expected key=value pairs, got {part!r}")
        kv[k.strip()] = v.strip()
    unknown = set(kv) - {"vcpus", "memory", "min", "reserve"}
    if unknown:
        raise UsageError(f"--shape: unknown keys {', '.join(sorted(unknown))}",
                         hint="vcpus, memory, min, reserve")
    try:
        mem = parse_size(kv.get("memory", "512MiB"))
        return cap.Shape(int(kv.get("vcpus", "1")), mem, parse_size(kv.get("min", str(mem))),
                         float(kv.get("reserve", "0")))
    except ValueError as e:
        raise UsageError(f"--shape {text!r}: {e}") from None


def _p(values: list[float], q: float) -> float | None:
    return None if not values else percentile(values, q)


def build(state_dir: Path, window: str = "1h", shapes: list[cap.Shape] | None = None,
          tiered: bool = False, headroom: float = 0.15, now: float | None = None
          ) -> dict[str, Any]:
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
    facts = HostFacts.probe()
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
            host = host_table(db, ("cpu", "mem_used", "budget"), since, source)
            guests_t = guest_table(db, ("cpu", "ws", "balloon"), since, source)
            series = {
                "host_cpu": host["cpu"], "host_mem_used": host["mem_used"],
                "budget": host["budget"],
                "cpu": {g: m["cpu"] for g, m in guests_t.items()},
                "ws": {g: m["ws"] for g, m in guests_t.items()},
                "balloon": {g: m["balloon"] for g, m in guests_t.items()},
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
    for name, g in sorted(fleet.guests.items()):
        committed = cap.Committed(committed.vcpus + g.vcpus, committed.reserve + g.cpu.reserve,
                                  committed.memory_max + g.memory.max,
                                  committed.memory_min + g.memory_min)
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
                            fleet.host.overcommit.memory)
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

    if not shapes:
        seen: dict[tuple, cap.Shape] = {}
        for g in fleet.guests.values():
            s = cap.Shape(g.vcpus, g.memory.max, g.memory_min, g.cpu.reserve)
            seen.setdefault((s.vcpus, s.memory, s.min, s.reserve), s)
        shapes = list(seen.values()) or [cap.Shape(1, 512 * MiB, 512 * MiB)]
    fits = []
    for s in shapes:
        same = [g for g in guests if (g["vcpus"], g["memory_max"], g["memory_min"],
                                      g["cpu_reserve"]) == (s.vcpus, s.memory, s.min,
                                                            s.reserve)]
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
                per_guest_memory=int(per_mem), headroom=headroom))
            entry["by_observed"]["assumed_per_guest"] = {"cpu": per_cpu,
                                                         "memory": int(per_mem)}
        else:
            entry["by_observed"] = None
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
        "fits": fits,
        "charts": _chart_data(series, fleet) if have else None,
    }
    return doc


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


def to_prom(doc: dict[str, Any]) -> str:
    """Prometheus text exposition of the report's current figures."""
    lines: list[str] = []

    def metric(name: str, help_: str, kind: str, samples: list[tuple[dict[str, str], Any]]
               ) -> None:
        samples = [(l, v) for l, v in samples if v is not None]
        if not samples:
            return
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
            lines.append(f"{name}{{{lab}}} {float(v):g}" if lab else f"{name} {float(v):g}")

    h = doc["host"]
    inst = {"fleet": doc["instance"]}   # "instance" is Prometheus' own target label
    metric("consolidator_host_budget_bytes", "Guest memory budget.", "gauge",
           [(inst, h["budget"])])
    metric("consolidator_host_usable_cpus", "Host cores minus the host reserve.", "gauge",
           [(inst, h["usable_cpus"])])
    metric("consolidator_host_committed_vcpus", "Sum of guests' vCPUs.", "gauge",
           [(inst, h["committed"]["vcpus"])])
    metric("consolidator_host_committed_memory_max_bytes", "Sum of guests' memory.max.",
           "gauge", [(inst, h["committed"]["memory_max"])])
    metric("consolidator_host_committed_memory_min_bytes", "Sum of guests' memory.min.",
           "gauge", [(inst, h["committed"]["memory_min"])])
    metric("consolidator_host_cpu_busy_cores_p95", "Host CPU busy, p95 over the window.",
           "gauge", [(inst, h["usage"]["cpu_p95"])])
    for key, name in (("vcpus", "vcpus"), ("memory_max", "memory_max_bytes"),
                      ("memory_min", "memory_min_bytes")):
        metric(f"consolidator_guest_{name}", f"Guest {key} from the inventory.", "gauge",
               [({**inst, "guest": g["name"]}, g[key]) for g in doc["guests"]])
    metric("consolidator_guest_cpu_cores_p95", "Guest CPU use, p95 over the window.",
           "gauge", [({**inst, "guest": g["name"]}, g["cpu"]["p95"]) for g in doc["guests"]])
    metric("consolidator_guest_memory_working_set_bytes_p95",
           "Guest working set, p95 over the window.", "gauge",
           [({**inst, "guest": g["name"]}, g["working_set"]["p95"]) for g in doc["guests"]])
    metric("consolidator_guest_restarts_total", "Automatic restarts.", "counter",
           [({**inst, "guest": g["name"]}, g["restarts"]) for g in doc["guests"]])
    metric("consolidator_fits_guests", "More guests of this shape that fit.", "gauge",
           [({**inst, "shape": f["shape"], "by": "guarantees",
              "binding": f["by_guarantees"]["binding"]}, f["by_guarantees"]["count"])
            for f in doc["fits"]] +
           [({**inst, "shape": f["shape"], "by": "observed",
              "binding": f["by_observed"]["binding"]}, f["by_observed"]["count"])
            for f in doc["fits"] if f.get("by_observed")])
    return "\n".join(lines) + "\n"


def _cores(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _size(v: float | None) -> str:
    return "-" if v is None else human_size(v)


def tables(doc: dict[str, Any]) -> list[Any]:
    """rich renderables for the terminal."""
    from rich import box
    from rich.table import Table
    from rich.text import Text
    out: list[Any] = []
    w = doc["window"]
    h = doc["host"]
    head = Text(f"capacity report, instance {doc['instance']}, window {w['name']} "
                f"({human_duration(w['history_seconds'])} of history, source {w['source']})",
                style="bold")
    out.append(head)
    if w["note"]:
        out.append(Text(f"note: {w['note']}", style="yellow"))
    t = Table(title="host", title_justify="left", show_header=False, box=box.SIMPLE,
              pad_edge=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    c, o, u, hr = h["committed"], h["overcommit"], h["usage"], h["headroom"]
    t.add_row("CPUs", f"{h['cpus']} ({h['usable_cpus']:g} usable, {h['reserve']['cpus']:g} "
                      "reserved)")
    t.add_row("RAM", f"{human_size(h['memory_total'])} (budget {human_size(h['budget'])}, "
                     f"{human_size(h['reserve']['memory'])} reserved)")
    t.add_row("committed", f"{c['vcpus']} vCPUs, {c['cpu_reserve']:g} cores reserved, "
                           f"max {human_size(c['memory_max'])}, min "
                           f"{human_size(c['memory_min'])}")
    t.add_row("overcommit", f"{o['vcpus_per_usable_core']:.2f} vCPUs per core (limit "
                            f"{o['limit_cpus']:g}), {o['memory_max_per_budget']:.2f} x budget "
                            f"(limit {o['limit_memory']:g})")
    t.add_row("CPU use", f"now {_cores(u['cpu_now'])} cores, p95 {_cores(u['cpu_p95'])} "
                         f"(guests p95 {_cores(u['guests_cpu_p95'])})")
    t.add_row("guest memory held", f"now {_size(u['guest_memory_now'])}, p95 "
                              f"{_size(u['guest_memory_p95'])}")
    t.add_row("headroom", f"{_cores(hr['cpu'])} cores, {_size(hr['memory'])}")
    out.append(t)
    g = Table(title="guests: use over the window, p50 / p95 / max", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("guest", "left"), ("state", "left"), ("vCPUs", "right"),
                      ("CPU cores", "right"), ("mem max/min", "right"),
                      ("working set", "right"), ("balloon seen", "right"),
                      ("restarts", "right")):
        g.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for x in doc["guests"]:
        cp, ws, b = x["cpu"], x["working_set"], x["balloon"]
        g.add_row(x["name"], x["state"], str(x["vcpus"]) + (
            f" r{x['cpu_reserve']:g}" if x["cpu_reserve"] else ""),
            " ".join(_cores(v) for v in (cp["p50"], cp["p95"], cp["max"])),
            _mib(x["memory_max"], x["memory_min"]),
            _mib(ws["p50"], ws["p95"], ws["max"]), _mib(b["min"], b["max"], sep="-"),
            str(x["restarts"]))
    out.append(g)
    r = Table(title="right-sizing", title_justify="left", box=None, show_header=False,
              pad_edge=False)
    r.add_column("guest", style="bold")
    r.add_column("recommendation", overflow="fold")
    for x in doc["guests"]:
        r.add_row(x["name"], f"memory: {x['recommendation']['memory']}")
        r.add_row("", f"CPU: {x['recommendation']['cpu']}")
    out.append(r)
    tiered = any(x.get("tiers") for x in doc["fits"])
    f = Table(title="how many more fit", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    f.add_column("shape", no_wrap=True)
    for col in ("by guarantees", "by observed p95") + (("tiers",) if tiered else ()):
        f.add_column(col, overflow="fold", max_width=36)
    for x in doc["fits"]:
        bg = x["by_guarantees"]
        bo = x.get("by_observed")
        row = [x["shape"], f"[bold]{bg['count']}[/] {bg['binding']}\n{bg['detail']}",
               f"[bold]{bo['count']}[/] {bo['binding']}\n{bo['detail']}" if bo
               else "no history"]
        if tiered:
            row.append("\n".join(f"{t['count']} x {t['shape']} ({t['binding']})"
                                  for t in x.get("tiers", [])) or "-")
        f.add_row(*row)
    out.append(f)
    return out


def _mib(*values: float | None, sep: str = "/") -> str:
    """Compact sizes for table cells: ``41/41/41 MiB``, ``1/1.5 GiB``."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    unit, mult = ("GiB", 1 << 30) if min(known) >= (1 << 30) else ("MiB", MiB)
    return sep.join("-" if v is None else f"{v / mult:.1f}".rstrip("0").rstrip(".")
                    for v in values) + f" {unit}"
