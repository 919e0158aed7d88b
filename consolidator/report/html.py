"""The report as one self-contained HTML file: inline SVG charts (matplotlib), no fetches."""

from __future__ import annotations

import html
import io
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")   # no display: render to SVG only
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from ..units import MiB, human_duration, human_size  # noqa: E402
from .text import cores, size  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.15em;margin:28px 0 8px}
.sub{color:#5b6475;margin-bottom:12px}.note{background:#fff7e0;border:1px solid #f0d48a;
padding:8px 12px;border-radius:6px;margin:12px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:12px}
.card svg{width:100%;height:auto}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.92em}
th,td{border-bottom:1px solid #e8eaee;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{font-weight:600;width:180px}.fail{font-weight:600;color:#a14}
"""


def _fig_svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _times(points: list[list[float]]) -> tuple[list[datetime], list[float]]:
    return [datetime.fromtimestamp(t) for t, _ in points], [v for _, v in points]


def _charts(doc: dict[str, Any]) -> dict[str, str]:
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "svg.fonttype": "none"})
    c = doc["charts"]
    out: dict[str, str] = {}

    def fmt(ax: Any) -> None:
        loc = mdates.AutoDateLocator(minticks=3, maxticks=7)
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(6, 2.6))
    x, y = _times(c["host_cpu"])
    ax.plot(x, y, color="#2f6fde", label="host CPU busy")
    ax.axhline(doc["host"]["usable_cpus"], color="#a14", ls="--", lw=1, label="usable cores")
    ax.set_ylabel("cores")
    ax.set_title("host CPU")
    ax.legend(loc="upper left", fontsize=8)
    fmt(ax)
    out["host_cpu"] = _fig_svg(fig)

    fig, ax = plt.subplots(figsize=(6, 2.6))
    x, y = _times(c["host_mem_used"])
    ax.plot(x, [v / MiB for v in y], color="#2f6fde", label="host memory used")
    totals: dict[datetime, float] = {}
    for g in c["guests"].values():
        for t, v in g["balloon"]:
            d = datetime.fromtimestamp(t)
            totals[d] = totals.get(d, 0.0) + v
    if totals:
        ts = sorted(totals)
        ax.plot(ts, [totals[t] / MiB for t in ts], color="#3a9a5b", label="guests' balloons")
    top = max([v / MiB for v in y] + [v / MiB for v in totals.values()] + [1.0])
    if c["budget"] / MiB <= 3 * top:
        ax.axhline(c["budget"] / MiB, color="#a14", ls="--", lw=1, label="guest budget")
    else:   # far off scale: name it instead of flattening the lines that matter
        ax.plot([], [], color="#a14", ls="--", lw=1,
                label=f"guest budget {human_size(c['budget'])} (off scale)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("MiB")
    ax.set_title("host memory")
    ax.legend(loc="upper left", fontsize=8)
    fmt(ax)
    out["host_mem"] = _fig_svg(fig)

    names = list(c["guests"])
    cols = 3 if len(names) > 4 else max(1, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 2.4 * rows), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        g = c["guests"][name]
        ws = {t: v for t, v in g["ws"]}
        bal = {t: v for t, v in g["balloon"]}
        ts = sorted(set(ws) & set(bal))
        x = [datetime.fromtimestamp(t) for t in ts]
        wv = [ws[t] / MiB for t in ts]
        bv = [max(bal[t], ws[t]) / MiB for t in ts]
        if x:
            ax.stackplot(x, wv, [b - w for b, w in zip(bv, wv)],
                         colors=["#2f6fde", "#a9c4f5"], labels=["working set", "balloon (idle)"])
        ax.axhline(g["max"] / MiB, color="#a14", ls="--", lw=1, label="max")
        ax.set_title(name)
        ax.set_ylabel("MiB")
        fmt(ax)
        if i == 0:
            ax.legend(loc="upper left", fontsize=7)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    out["guest_mem"] = _fig_svg(fig)

    fig, ax = plt.subplots(figsize=(11, 2.8))
    for name in names:
        x, y = _times(c["guests"][name]["cpu"])
        ax.plot(x, y, label=name, lw=1.2)
    ax.set_ylabel("cores")
    ax.set_title("guest CPU")
    ax.legend(loc="upper left", fontsize=8, ncol=min(6, max(1, len(names))))
    fmt(ax)
    out["guest_cpu"] = _fig_svg(fig)
    return out


def _io_html(section: dict[str, Any]) -> str:
    """The I/O section: each guest's rates as p50/p95/max, the top consumers, how often
    the host's disk budget was full."""
    e = html.escape

    def rate(v: float | None) -> str:
        return "–" if v is None else f"{size(v)}/s"

    def three(x: dict[str, Any], fmt: Any = rate) -> str:
        return " / ".join(e(fmt(x[k])) for k in ("p50", "p95", "max"))
    rows = "".join(
        f"<tr><td>{e(n)}</td><td class='n'>{three(x['disk_bps'])}</td>"
        f"<td class='n'>{three(x['disk_iops'], lambda v: '–' if v is None else f'{v:.0f}')}"
        f"</td><td class='n'>{three(x['net_bps'])}</td>"
        f"<td class='n'>{e(size(x['disk_bytes']))}</td></tr>"
        for n, x in section["guests"].items())
    sub = []
    if section.get("budget_bps"):
        sat = section.get("saturated_fraction")
        sub.append(f"host disk budget {rate(section['budget_bps'])}, full "
                   f"{'–' if sat is None else f'{sat:.0%}'} of the window")
    for kind, key in (("disk", "top_disk"), ("network", "top_net")):
        if section[key]:
            sub.append(f"top {kind}: " + ", ".join(f"{g['guest']} {rate(g['mean'])}"
                                                    for g in section[key]))
    return ("<h2>I/O</h2>" + "".join(f"<div class='sub'>{e(x)}</div>" for x in sub) +
            "<table id='io'><tr><th>guest</th><th>disk bytes p50/p95/max</th>"
            "<th>disk ops p50/p95/max</th><th>net bytes p50/p95/max</th>"
            "<th>disk bytes in the window</th></tr>" + rows + "</table>")


def _merging_html(mg: dict[str, Any]) -> str:
    """Memory saved by merging: per guest and for the fleet, against the kernel now."""
    e = html.escape

    def three(x: dict[str, Any]) -> str:
        return " / ".join(e(size(x[k])) for k in ("p50", "p95", "max"))
    rows = "".join(f"<tr><td>{e(n)}</td><td class='n'>{three(x)}</td></tr>"
                   for n, x in mg["guests"].items())
    f, k, c = mg["fleet_saved"], mg.get("kernel_now") or {}, mg["ksmd_cpu"]
    sub = (f"host.ksm {mg['mode']}: the fleet saves {size(f['now'])} now (p95 "
           f"{size(f['p95'])}); the host {size(mg['host_saved']['now'])}, kernel "
           f"{size(k.get('saved_bytes'))}; ksmd CPU mean {cores(c['mean'])} cores. The other "
           "memory figures leave merging out.")
    if mg["no_merge"]:
        sub += " Never merged: " + ", ".join(mg["no_merge"]) + "."
    return ("<h2>Memory saved by merging</h2>" + f"<div class='sub'>{e(sub)}</div>"
            "<table id='merging'><tr><th>guest</th><th>saved p50/p95/max</th></tr>" +
            rows + f"<tr><td><b>fleet</b></td><td class='n'>{three(f)}</td></tr></table>")


def render(doc: dict[str, Any]) -> str:
    e = html.escape
    w, h = doc["window"], doc["host"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>consolidator report: {e(doc['instance'])}</title><style>{CSS}</style>"
             f"</head><body><main>",
             f"<h1>Capacity report: instance {e(doc['instance'])}</h1>",
             f"<div class='sub'>window {e(w['name'])}, {e(human_duration(w['history_seconds']))}"
             f" of history (source {e(w['source'])}), generated "
             f"{datetime.fromtimestamp(doc['generated_at']):%Y-%m-%d %H:%M:%S}</div>"]
    if w["note"]:
        parts.append(f"<div class='note'>{e(w['note'])}</div>")
    c, o, u, hr = h["committed"], h["overcommit"], h["usage"], h["headroom"]
    kv = [("CPUs", f"{h['cpus']} ({h['usable_cpus']:g} usable, {h['reserve']['cpus']:g} "
                   "reserved for the host)"),
          ("RAM", f"{human_size(h['memory_total'])}; guest budget "
                  f"{human_size(h['budget'])}; {human_size(h['reserve']['memory'])} reserved"),
          ("committed", f"{c['vcpus']} vCPUs, {c['cpu_reserve']:g} cores reserved, memory max "
                        f"{human_size(c['memory_max'])}, min {human_size(c['memory_min'])}"),
          ("overcommit", f"{o['vcpus_per_usable_core']:.2f} vCPUs per usable core (limit "
                         f"{o['limit_cpus']:g}); memory max {o['memory_max_per_budget']:.2f} x "
                         f"budget (limit {o['limit_memory']:g})"),
          ("CPU use", f"now {cores(u['cpu_now'])} cores, p95 {cores(u['cpu_p95'])}"),
          ("guest memory", f"now {size(u['guest_memory_now'])}, p95 "
                           f"{size(u['guest_memory_p95'])}"),
          ("headroom", f"{cores(hr['cpu'])} cores, {size(hr['memory'])}")]
    parts.append("<h2>Host</h2><table class='kv'>" + "".join(
        f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in kv) + "</table>")
    if doc.get("charts"):
        ch = _charts(doc)
        parts.append("<h2>Over the window</h2><div class='grid'>"
                     f"<div class='card' id='chart-host-cpu'>{ch['host_cpu']}</div>"
                     f"<div class='card' id='chart-host-mem'>{ch['host_mem']}</div></div>")
        parts.append(f"<h2>Guest memory</h2><div class='card' id='chart-guest-mem'>"
                     f"{ch['guest_mem']}</div>")
        parts.append(f"<h2>Guest CPU</h2><div class='card' id='chart-guest-cpu'>"
                     f"{ch['guest_cpu']}</div>")
    rows = []
    for g in doc["guests"]:
        cp, ws, b = g["cpu"], g["working_set"], g["balloon"]
        rows.append(
            f"<tr><td>{e(g['name'])}</td><td>{e(g['state'])}</td>"
            f"<td class='n'>{g['vcpus']}</td>"
            f"<td class='n'>{cores(cp['p50'])} / {cores(cp['p95'])} / {cores(cp['max'])}</td>"
            f"<td class='n'>{e(human_size(g['memory_max']))} / "
            f"{e(human_size(g['memory_min']))}</td>"
            f"<td class='n'>{e(size(ws['p50']))} / {e(size(ws['p95']))} / "
            f"{e(size(ws['max']))}</td>"
            f"<td class='n'>{e(size(b['min']))} – {e(size(b['max']))}</td>"
            f"<td class='n'>{g['restarts']}</td>"
            f"<td>{e(g['recommendation']['memory'])}<br>{e(g['recommendation']['cpu'])}</td>"
            "</tr>")
    parts.append("<h2>Guests</h2><table id='guests'><tr><th>guest</th><th>state</th>"
                 "<th>vCPUs</th><th>CPU cores p50/p95/max</th><th>memory max/min</th>"
                 "<th>working set p50/p95/max</th><th>balloon range</th><th>restarts</th>"
                 "<th>recommendation</th></tr>" + "".join(rows) + "</table>")
    if doc.get("io") and doc["io"]["guests"]:
        parts.append(_io_html(doc["io"]))
    mg = doc.get("merging")
    if mg and (mg["fleet_saved"]["max"] or mg["host_saved"]["max"]):
        parts.append(_merging_html(mg))
    frows = []
    for f in doc["fits"]:
        bg, bo = f["by_guarantees"], f.get("by_observed")
        tiers = "<br>".join(f"{t['count']} × {e(t['shape'])} ({t['binding']})"
                            for t in f.get("tiers", [])) or "–"
        frows.append(
            f"<tr><td>{e(f['shape'])}</td><td class='n'>{bg['count']}</td>"
            f"<td><span class='fail'>{bg['binding']}</span> {e(bg['detail'])}</td>"
            + (f"<td class='n'>{bo['count']}</td><td><span class='fail'>{bo['binding']}</span> "
               f"{e(bo['detail'])}</td>" if bo else "<td>–</td><td>no history yet</td>")
            + (f"<td class='n'>{f['by_observed_merged']['count']}</td>"
               if f.get("by_observed_merged") else "<td>–</td>")
            + f"<td>{tiers}</td></tr>")
    parts.append("<h2>How many more fit</h2><table id='fits'><tr><th>shape</th>"
                 "<th>by guarantees</th><th>binding</th><th>by observed p95</th>"
                 "<th>binding</th><th>observed, with merging</th><th>tiers</th></tr>" +
                 "".join(frows) + "</table>")
    parts.append("</main></body></html>")
    return "".join(parts)
