"""The report as text: tables for people (rich), Prometheus exposition for machines."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from ..units import MiB, human_duration, human_size


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
    sto = doc.get("storage") or {}
    sg = sto.get("guests") or {}
    metric("consolidator_guest_disk_virtual_bytes", "What the guest's disks may grow to.",
           "gauge", [({**inst, "guest": n}, x["virtual_size"]) for n, x in sorted(sg.items())])
    metric("consolidator_guest_disk_allocated_bytes", "What the guest's disks hold.",
           "gauge", [({**inst, "guest": n}, x["allocated"]) for n, x in sorted(sg.items())])
    metric("consolidator_guest_backup_age_seconds", "How old the guest's newest backup is.",
           "gauge", [({**inst, "guest": n}, x["backups"]["age_s"])
                     for n, x in sorted(sg.items())])
    for key, name in (("state_fs", "state"), ("backup_dir", "backup")):
        fs = sto.get(key) or {}
        metric(f"consolidator_host_{name}_fs_free_bytes",
               f"Free space on the {name} directory's filesystem.", "gauge",
               [(inst, fs.get("free"))])
    metric("consolidator_fits_guests", "More guests of this shape that fit.", "gauge",
           [({**inst, "shape": f["shape"], "by": "guarantees",
              "binding": f["by_guarantees"]["binding"]}, f["by_guarantees"]["count"])
            for f in doc["fits"]] +
           [({**inst, "shape": f["shape"], "by": "observed",
              "binding": f["by_observed"]["binding"]}, f["by_observed"]["count"])
            for f in doc["fits"] if f.get("by_observed")])
    return "\n".join(lines) + "\n"


def cores(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def size(v: float | None) -> str:
    return "-" if v is None else human_size(v)


def tables(doc: dict[str, Any]) -> list[Any]:
    """rich renderables for the terminal."""
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
    t.add_row("CPU use", f"now {cores(u['cpu_now'])} cores, p95 {cores(u['cpu_p95'])} "
                         f"(guests p95 {cores(u['guests_cpu_p95'])})")
    t.add_row("guest memory held", f"now {size(u['guest_memory_now'])}, p95 "
                              f"{size(u['guest_memory_p95'])}")
    t.add_row("headroom", f"{cores(hr['cpu'])} cores, {size(hr['memory'])}")
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
            " ".join(cores(v) for v in (cp["p50"], cp["p95"], cp["max"])),
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
    if doc.get("storage"):
        out.append(_storage_table(doc["storage"]))
    if doc.get("io") and doc["io"]["guests"]:
        out.append(_io_table(doc["io"]))
    mg = doc.get("merging")
    if mg and (mg["fleet_saved"]["max"] or mg["host_saved"]["max"]):
        out.append(_merging_table(mg))
    merged = any(x.get("by_observed_merged") for x in doc["fits"])
    tiered = any(x.get("tiers") for x in doc["fits"])
    f = Table(title="how many more fit", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    f.add_column("shape", no_wrap=True)
    for col in ("by guarantees", "by observed p95") + \
            (("observed, with merging",) if merged else ()) + (("tiers",) if tiered else ()):
        f.add_column(col, overflow="fold", max_width=36)
    for x in doc["fits"]:
        bg = x["by_guarantees"]
        bo = x.get("by_observed")
        row = [x["shape"], f"[bold]{bg['count']}[/] {bg['binding']}\n{bg['detail']}",
               f"[bold]{bo['count']}[/] {bo['binding']}\n{bo['detail']}" if bo
               else "no history"]
        if merged:
            bm = x.get("by_observed_merged")
            row.append(f"[bold]{bm['count']}[/] {bm['binding']}\n{bm['detail']}" if bm
                       else "-")
        if tiered:
            row.append("\n".join(f"{t['count']} x {t['shape']} ({t['binding']})"
                                  for t in x.get("tiers", [])) or "-")
        f.add_row(*row)
    out.append(f)
    return out


def _merging_table(mg: dict[str, Any]) -> Any:
    t = Table(title=f"memory saved by merging (KSM, host.ksm {mg['mode']}); the other "
                    "memory figures leave merging out", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("guest", "saved p50", "saved p95", "max"):
        t.add_column(col, justify="left" if col == "guest" else "right")
    for name, x in mg["guests"].items():
        t.add_row(name, size(x["p50"]), size(x["p95"]), size(x["max"]))
    f, h, c = mg["fleet_saved"], mg["host_saved"], mg["ksmd_cpu"]
    t.add_row("[bold]fleet[/]", size(f["p50"]), size(f["p95"]), size(f["max"]))
    k = mg.get("kernel_now") or {}
    t.caption = (f"now: the fleet saves {size(f['now'])}, the host {size(h['now'])} "
                 f"(kernel: {size(k.get('saved_bytes'))}); ksmd CPU mean {cores(c['mean'])}, "
                 f"p95 {cores(c['p95'])}" + (f"; never merged: {', '.join(mg['no_merge'])}"
                                            if mg["no_merge"] else ""))
    t.caption_justify = "left"
    return t


def _io_table(io: dict[str, Any]) -> Any:
    def rate(v: float | None) -> str:
        return "-" if v is None else f"{size(v)}/s"

    def three(x: dict[str, Any], fmt: Any = rate) -> str:
        return " / ".join(fmt(x[k]) for k in ("p50", "p95", "max"))
    budget = io.get("budget_bps")
    sat = io.get("saturated_fraction")
    title = "I/O: p50 / p95 / max a second"
    if budget:
        title += (f"; host disk budget {rate(budget)}, filled "
                  f"{'-' if sat is None else f'{sat:.0%}'} of the window")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("guest", "disk bytes", "disk ops", "net bytes"):
        t.add_column(col, overflow="fold")
    for name, x in io["guests"].items():
        t.add_row(name, three(x["disk_bps"]),
                  three(x["disk_iops"], lambda v: "-" if v is None else f"{v:.0f}"),
                  three(x["net_bps"]))
    tops = [f"{kind}: " + ", ".join(f"{g['guest']} {rate(g['mean'])}" for g in io[key])
            for kind, key in (("disk", "top_disk"), ("net", "top_net")) if io[key]]
    if any(tops):
        t.caption = "top consumers (mean): " + "; ".join(tops)
        t.caption_justify = "left"
    return t


def _storage_table(sto: dict[str, Any]) -> Any:
    from ..units import human_duration
    t = Table(title="storage: disks (allocated / virtual), snapshots, backups",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("guest", "disks", "snapshots", "backups", "newest backup"):
        t.add_column(col, overflow="fold")
    for name, x in sorted(sto["guests"].items()):
        b = x["backups"]
        t.add_row(name, f"{size(x['allocated'])} / {size(x['virtual_size'])}"
                  if x["disks"] else "-",
                  str(len(x["snapshots"])) if x["snapshots"] else "-",
                  f"{b['count']}, {size(b['bytes'])}" if b["count"] else "none",
                  f"{b['last']} ({human_duration(b['age_s'])} ago)" if b["last"] else "-")
    for key, what in (("state_fs", "state dir"), ("backup_dir", "backup dir")):
        fs = sto[key]
        if fs.get("free") is not None:
            t.add_row(f"[dim]{what}[/]", f"{size(fs['free'])} free of {size(fs['size'])}",
                      "", "", fs["dir"])
    return t


def _mib(*values: float | None, sep: str = "/") -> str:
    """Compact sizes for table cells: ``41/41/41 MiB``, ``1/1.5 GiB``."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    unit, mult = ("GiB", 1 << 30) if min(known) >= (1 << 30) else ("MiB", MiB)
    return sep.join("-" if v is None else f"{v / mult:.1f}".rstrip("0").rstrip(".")
                    for v in values) + f" {unit}"
