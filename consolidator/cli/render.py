"""Human output of plain documents: status, explain and doctor tables (dicts in, rich
out). It imports no model: `status` must not pay for the inventory's schema at start-up.
Plans are rendered by :mod:`.planview`."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..units import human_size, human_uptime


def doctor_table(report: dict) -> Table:
    t = Table(title="consolidator doctor", title_justify="left", show_lines=False)
    t.add_column("fact", style="bold")
    t.add_column("value", overflow="fold")
    t.add_column("usable")
    t.add_column("fix", overflow="fold")
    for f in report["facts"]:
        if f["ok"]:
            mark = Text("yes", style="green")
        elif f["required"]:
            mark = Text("NO", style="bold red")
        else:
            mark = Text("no", style="yellow")
        # facts quote the system ("[cpu memory]"): text, never rich markup
        t.add_row(f["name"], Text(f["value"]), mark, Text(f["fix"] or ""))
    return t


_STATE_STYLE = {"running": "green", "starting": "yellow", "stopping": "yellow",
                "stopped": "dim", "defined": "dim", "crashed": "red", "failed": "bold red",
                "orphaned": "bold magenta"}


def _pair(a: float | None, b: float | None) -> str:
    """Two rates as ``1.2M/340K`` (a second each), ``-`` where not measured."""
    def one(v: float | None) -> str:
        if v is None:
            return "-"
        for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if v >= m:
                return f"{v / m:.1f}{unit}"
        return f"{v:.0f}"
    return "-" if a is None and b is None else f"{one(a)}/{one(b)}"


def status_table(doc: dict) -> Table:
    title = "guests"
    if doc.get("instance"):
        title = f"instance {doc['instance']} (state index {doc.get('index')})"
    t = Table(title=title, title_justify="left")
    for col, just in (("guest", "left"), ("state", "left"), ("uptime", "right"),
                      ("vCPUs", "right"), ("CPU %", "right"), ("memory", "right"),
                      ("disk r/w", "right"), ("net rx/tx", "right"),
                      ("IPs", "left"), ("restarts", "right"), ("last event", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for g in doc.get("guests", []):
        mem = human_size(g["memory_max_bytes"])
        if g.get("balloon_bytes") is not None:
            mem = f"{human_size(g['balloon_bytes'])} / {mem}"
        cpu = f"{g['cpu_percent']:.0f}" if g.get("cpu_percent") is not None else "-"
        io = g.get("io") or {}
        state = Text(g["state"], style=_STATE_STYLE.get(g["state"], ""))
        if g.get("unresponsive_s") is not None:
            state = Text(f"{g['state']}, unresponsive {g['unresponsive_s']:.0f}s",
                         style="bold red")
        t.add_row(g["name"], state,
                  human_uptime(g.get("uptime_s")), str(g["vcpus"]), cpu, mem,
                  _pair(io.get("disk_read_bps"), io.get("disk_write_bps")),
                  _pair(io.get("net_rx_bps"), io.get("net_tx_bps")),
                  ", ".join(g.get("ips") or []) or "-", str(g.get("restarts", 0)),
                  Text(g.get("last_event") or "-"))
    notes = [f"{g['name']}: {e}" for g in doc.get("guests", []) for e in g.get("errors") or []]
    notes = ["readings failing: " + "; ".join(notes)] if notes else []
    for n in doc.get("networks") or []:
        d = n.get("dhcp") or {}
        if d.get("unresponsive"):
            notes.append(f"network {n['name']}: its DHCP/DNS server (dnsmasq, pid "
                         f"{d.get('pid')}) does not answer: {d['unresponsive']}")
    ksm = (doc.get("rebalancer") or {}).get("ksm")
    if ksm and (ksm.get("run") or ksm.get("saved_bytes")):
        notes.append(_ksm_line(ksm))
    hist = doc.get("history") or {}
    if hist.get("error"):
        notes.append(f"history: not recording ({hist['error']}); "
                     f"{hist.get('lost_samples', 0)} samples lost so far, retried every tick")
    if (doc.get("metrics") or {}).get("error"):
        notes.append(f"metrics: {doc['metrics']['error']} (retried every 10 s)")
    if notes:
        t.caption = Text("\n".join(notes), style="yellow")
        t.caption_justify = "left"
    return t


def _ksm_line(k: dict) -> str:
    cpu = "-" if k.get("cpu") is None else f"{k['cpu'] * 100:.1f}%"
    scan = (f"scanning {k['pages_to_scan']} pages every {k['sleep_ms']} ms" if k.get("run")
            else "scanner stopped")
    return (f"KSM ({k.get('mode') or 'off'}): {scan}, ksmd CPU {cpu}; saves "
            f"{human_size(k.get('saved_bytes'))} on the host, "
            f"{human_size(k.get('fleet_saved_bytes'))} of it this fleet's")


def explain_table(doc: dict) -> Table:
    """The rebalancer's last decision per guest, with its reasons."""
    rb = doc.get("rebalancer") or {}
    title = ("rebalancer: off (static settings)" if not rb.get("enabled") else
             f"rebalancer: host memory {rb.get('host_state')}, budget "
             f"{human_size(rb.get('budget_now_bytes') or rb.get('budget_bytes'))} of "
             f"{human_size(rb.get('budget_bytes'))}, {rb.get('ticks')} ticks")
    t = Table(title=title, title_justify="left", show_lines=True)
    for col in ("guest", "CPU weight", "why", "balloon", "why", "disk share", "why"):
        t.add_column(col, overflow="fold")
    for g in doc.get("guests", []):
        ex = g.get("explain") or {}
        cpu, mem = ex.get("cpu") or {}, ex.get("memory") or {}
        bal = "-"
        if mem:
            bal = f"{human_size(mem.get('actual'))} -> {human_size(mem.get('target'))}"
            if mem.get("ws") is not None:
                bal += f"\n(ws {human_size(mem['ws'])})"
        io = ex.get("io") or {}
        share = "-" if not io else ("none" if io.get("bps") is None else
                                    f"{human_size(io['bps'])}/s")
        t.add_row(g["name"], str(cpu.get("weight", "-")), Text(cpu.get("reason", "-")), bal,
                  Text(mem.get("reason", "-"),
                       style="bold yellow" if mem.get("pressure") else ""),
                  share, Text(io.get("reason", "-")))
    ksm = rb.get("ksm")
    if ksm:
        ex = ksm.get("explain") or {}
        lines = [_ksm_line(ksm)]
        if ex.get("reason"):
            phase = f"{ex['phase']}: " if ex.get("phase") else ""
            lines.append(f"KSM policy: {phase}{ex['reason']}")
        t.caption = Text("\n".join(lines))
        t.caption_justify = "left"
    return t
