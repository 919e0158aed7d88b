"""Human output of plans: what apply would change, Terraform style."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..inventory.schema import NetworkSpec
from ..model import GuestIntent
from ..plan import (Action, CreateGuest, CreateNetwork, Impact, Plan, RemoveGuest,
                   RemoveNetwork, StartGuest, StopGuest, UpdateGuest, UpdateHost, UpdateNetwork)
from ..units import format_size

_IMPACT_STYLE = {Impact.LIVE: "green", Impact.RESTART: "yellow", Impact.REPLACE: "red"}


def describe_network(spec: NetworkSpec) -> str:
    gw = f"gateway {spec.gateway}" if spec.gateway else "isolated from the host"
    return f"{spec.subnet}, {gw}" + (", nat" if spec.nat else "")


def describe_guest(g: GuestIntent) -> str:
    mem = format_size(g.memory.max)
    if g.memory_min != g.memory.max:
        mem += f" (min {format_size(g.memory_min)})"
    nics = ", ".join(f"{n.network} {n.ip or 'no ip'}" for n in g.nics) or "no nics"
    cpu = f"{g.vcpus} vCPU{'s' if g.vcpus > 1 else ''}"
    if g.cpu.reserve:
        cpu += f" (reserve {g.cpu.reserve:g})"
    return f"{g.image}, {cpu}, {mem}, {nics}"


def _symbol(a: Action) -> tuple[str, str]:
    if isinstance(a, (CreateGuest, CreateNetwork)):
        return ("-/+", "magenta") if a.impact is Impact.REPLACE else ("+", "green")
    if isinstance(a, (RemoveGuest, RemoveNetwork)):
        return ("-/+", "magenta") if a.changes else ("-", "red")
    if isinstance(a, StopGuest):
        return ("<", "yellow")
    if isinstance(a, StartGuest):
        return (">", "green" if a.impact is Impact.LIVE else "yellow")
    return ("~", "yellow")


def _body(a: Action) -> str:
    if isinstance(a, CreateNetwork) and a.spec is not None and not a.changes:
        return describe_network(a.spec)
    if isinstance(a, CreateGuest) and a.intent is not None and not a.changes:
        return describe_guest(a.intent)
    if isinstance(a, RemoveGuest):
        return "stop and remove; disk overlay " + ("deleted (--purge)" if a.purge else "kept")
    if isinstance(a, RemoveNetwork) and not a.changes:
        return "remove bridge and its rules"
    if isinstance(a, StopGuest):
        return "graceful stop, for the changes below"
    return ""


def render_plan(console: Console, p: Plan, *, header: str) -> None:
    console.print(Text(header, style="bold"))
    if p.empty:
        console.print("\nNo changes. The fleet matches the inventory.")
    grid = Table.grid(padding=(0, 2))
    for col in ("sym", "what", "impact", "detail"):
        grid.add_column(col, justify="right" if col == "sym" else "left")

    def changes(items) -> None:
        for c in items:
            grid.add_row("", "", "", Text(c.render(), style=_IMPACT_STYLE[c.impact]))

    for a in p.actions:
        sym, style = _symbol(a)
        verb = {"start": "start ", "stop": "stop "}.get(a.kind, "")
        grid.add_row(Text(sym, style=f"bold {style}"),
                     Text(f"{verb}{a.target} {a.name}".rstrip(), style="bold"),
                     Text(a.impact.value, style=_IMPACT_STYLE[a.impact]),
                     Text(_body(a), style="dim"))
        if isinstance(a, (UpdateGuest, UpdateNetwork, UpdateHost, StopGuest, CreateGuest,
                          RemoveNetwork)):
            changes(a.changes)
    if p.pending:
        grid.add_row("", "", "", "")
        grid.add_row("", Text("pending: needs a restart of a running guest "
                              "(apply --allow-restart does it)", style="bold yellow"), "", "")
        for pd in p.pending:
            grid.add_row(Text("~", style="bold yellow"),
                         Text(f"{pd.target} {pd.name}", style="bold"),
                         Text(pd.impact.value, style=_IMPACT_STYLE[pd.impact]), "")
            changes(pd.changes)
    if p.actions or p.pending:
        console.print()
        console.print(grid)
    for n in p.notes:
        console.print(Text(f"note: {n}", style="cyan"))
    c = p.counts()
    console.print(Text(
        f"\nPlan: {c['create']} to create, {c['start']} to start, {c['live']} to change live, "
        f"{c['restart']} to restart, {c['replace']} to replace, {c['remove']} to remove"
        + (f", {c['pending']} pending." if c["pending"] else "."), style="bold"))
