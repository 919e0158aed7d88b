"""The command line: click for parsing, rich for output.

Global options may be given before or after the command (``consolidator -f x.yaml
plan`` and ``consolidator plan -f x.yaml`` are the same). Errors print as one
line (plus hint); ``-v`` adds the traceback. Exit codes: see
:class:`consolidator.errors.ExitCode`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any


import click

from .. import __version__
from .. import log as logmod
from ..errors import (ConflictError, ConsolidatorError, ExitCode, PlanExit,
                      SupervisorUnreachable, UsageError)
from ..units import DNS_LABEL_RE
from .base import Ctx, common_options, handled
from .output import Text, err, out, show



EXIT_HELP = "\n".join(f"  {c.value:>3}  {c.name}" for c in ExitCode)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Exit codes:\n\n\b\n" + EXIT_HELP)
@common_options
@click.version_option(__version__, prog_name="consolidator")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Declare a fleet of QEMU/KVM guests in one YAML inventory and run it on this host.

    \b
    consolidator validate       check the inventory, report every error at once
    consolidator plan           show what apply would change
    consolidator apply          make it so (the supervisor starts if needed)
    consolidator status         what runs, and how it is doing (--explain: why)
    consolidator report         is the box full, what is wasted, how many more fit
    consolidator doctor         what this host offers, and what is missing
    consolidator snapshot       snapshots, of one guest or the fleet at one instant
    consolidator backup         incremental backups; restore brings guests back
    """
    ctx.ensure_object(Ctx)


# ------------------------------------------------------------------ validate, schema

@cli.command()
@common_options
@handled
def validate(c: Ctx) -> None:
    """Check the inventory; print ok and a summary, or every error with FILE:LINE:COL.

    Exits 0 when valid, 2 when not. Nothing is applied either way.
    """
    fleet = c.fleet()
    out.print(f"ok: {c.file}: {fleet.summary()}", markup=False)


@cli.command()
@common_options
@handled
def schema(c: Ctx) -> None:
    """Print the inventory's JSON Schema (for editor completion and checks)."""
    from ..inventory import json_schema
    out.print_json(json.dumps(json_schema()))


# ---------------------------------------------------------------------------- plan

@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 for no changes, 1 for an error, 2 when there are changes")
@click.option("--prune", is_flag=True, help="Plan removal of guests and networks not in "
                                            "the inventory")
@click.option("--purge", is_flag=True, help="With --prune: also delete their disk overlays")
@click.option("--allow-restart", is_flag=True,
              help="Plan restarts of running guests for changes that need one")
@handled
def plan(c: Ctx, as_json: bool, detailed_exitcode: bool, prune: bool, purge: bool,
         allow_restart: bool) -> None:
    """Show what apply would change, Terraform style (+ create, ~ change, - remove).

    Each action is labelled live (no disruption), restart or replace. Changes that
    need a running guest restarted are listed as pending unless --allow-restart.
    """
    from ..plan import plan as make_plan
    from .planview import render_plan
    ctx = click.get_current_context()
    ctx.meta["detailed_exitcode"] = detailed_exitcode
    fleet = c.fleet()
    state = c.state()
    observed = _observed(c)
    p = make_plan(fleet, observed, prune=prune, purge=purge, allow_restart=allow_restart)
    if as_json:
        out.print_json(json.dumps({**p.to_json(), "instance": fleet.instance,
                                   "fleet_hash": fleet.fleet_hash()}))
    else:
        where = str(state.root) + ("" if state.exists() else " (empty: nothing runs)")
        render_plan(out, p, header=f"Plan for instance {fleet.instance}, state {where}")
    if detailed_exitcode:
        sys.exit(PlanExit.CHANGES if not p.empty else PlanExit.NO_CHANGES)


# -------------------------------------------------------------------------- doctor

@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
@click.option("--measure-io", is_flag=True,
              help="Also measure the state dir's disk (3 s of direct writes) and keep the "
                   "figures as the disk budget of host.io: auto")
@handled
def doctor(c: Ctx, as_json: bool, measure_io: bool) -> None:
    """Check this host: KVM (hardware or PVM), cgroups, tun, netns, QEMU, busybox, kernel.

    Exits 4 when something required is missing.
    """
    from .doctor import gather
    from .render import doctor_table
    from ..inventory.schema import HostSpec
    instance, host = "cns", HostSpec()
    try:
        fleet = c.fleet()
        instance, host = fleet.instance, fleet.host
    except ConsolidatorError:
        pass
    report = gather(instance, Path(c.state_dir) / "images", host)
    if measure_io:
        from .doctor import measure_disk_io
        from ..state import HOST_IO, StateDir, write_json
        from ..units import human_rate
        st = StateDir(c.state_dir).ensure()
        try:
            report["io"] = measure_disk_io(str(st.root))
            write_json(st.root / HOST_IO, report["io"])
        except OSError as e:
            report["io"] = {"error": f"cannot measure {st.root}: {e.strerror or e}"}
    if as_json:
        out.print_json(json.dumps(report))
    else:
        show(out, doctor_table(report))
        out.print(Text(f"Guests will run under {report['accel']['name'].upper()}: ",
                       style="bold") + Text(report["accel"]["reason"]))
        io = report.get("io")
        if io and "error" in io:
            out.print(Text("disk: ", style="bold") + Text(io["error"], style="red"))
        elif io:
            out.print(Text("disk budget (host.io: auto): ", style="bold") +
                      Text(f"{human_rate(io['bps'])}, {io['iops']} IOPS "
                           f"({io['how']}, measured in {io['dir']})"))
        if not report["ok"]:
            out.print(Text("missing: ", style="bold red") +
                      Text(", ".join(report["missing"])))
    if not report["ok"]:
        sys.exit(ExitCode.HOST)


# --------------------------------------------------------------------------- image

@cli.group()
def image() -> None:
    """The builtin guest image: build, list, remove (cached in the state dir)."""


def _image_cache(c: Ctx) -> Path:
    from ..vm.launch import image_cache_dir
    return image_cache_dir(Path(c.state_dir) / "images")


@image.command("build")
@common_options
@click.argument("kind", type=click.Choice(["tiny", "debian"]), default="tiny")
@click.option("--kernel", type=click.Path(dir_okay=False), default=None,
              help="tiny: use this bzImage instead of the host's or Debian's cloud kernel")
@click.option("--refresh", is_flag=True, help="tiny: fetch Debian's cloud kernel again")
@click.option("--release", type=click.Choice(["bookworm", "bullseye"]), default="bookworm",
              show_default=True, help="debian: the release")
@click.option("--firmware", type=click.Choice(["bios", "uefi"]), default="uefi",
              show_default=True, help="debian: the bootloader's firmware")
@click.option("--size", default="4GiB", show_default=True, help="debian: the disk's size")
@click.option("--mirror", default=None, help="debian: the package mirror (default: the "
              "host's apt source, else deb.debian.org)")
@click.option("--force", is_flag=True, help="Rebuild even when a build of the same inputs exists")
@handled
def image_build(c: Ctx, kind: str, kernel: str | None, refresh: bool, release: str,
                firmware: str, size: str, mirror: str | None, force: bool) -> None:
    """Build an image into the cache. Same inputs give the same image.

    \b
    tiny    the builtin image: a kernel and a busybox initramfs (seconds)
    debian  a bootable Debian disk from Debian's packages (debootstrap): a kernel, a
            bootloader for the firmware, systemd, cloud-init and the QEMU guest agent,
            saved as a compressed qcow2 (minutes; root)
    """
    import time as _t
    t0 = _t.monotonic()
    say = lambda s: err.print(f"[dim]{s}[/]")   # noqa: E731
    if kind == "debian":
        from ..units import parse_size
        from ..vm.osimage import build_debian
        img = build_debian(_image_cache(c), release, firmware, size=parse_size(size),
                           mirror=mirror, force=force, progress=say)
        m = img.manifest
        out.print(f"debian image {img.dir.name}: {m['os']}, {firmware}, "
                  f"{len(m['packages'])} packages, {m['outputs']['disk.qcow2']['size'] >> 20} "
                  f"MiB qcow2 ({_t.monotonic() - t0:.1f}s)\n  disk: {img.disk}", markup=False)
        return
    from ..vm.image import build_tiny
    built = build_tiny(_image_cache(c), kernel, force=force, refresh=refresh, progress=say)
    m = built.manifest
    out.print(f"tiny image {built.dir.name}: kernel {m['kernel']['source']}, "
              f"initrd sha256 {m['outputs']['initrd.cpio']['sha256'][:16]}..., "
              f"{len(m['modules_order'])} modules ({_t.monotonic() - t0:.1f}s)", markup=False)


@image.command("list")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON")
@handled
def image_list(c: Ctx, as_json: bool) -> None:
    """List built images with their sources and checksums."""
    from rich.table import Table
    from ..units import human_size
    from ..vm.image import list_images
    from ..vm.osimage import list_os_images
    images = list_images(_image_cache(c))
    disks = list_os_images(_image_cache(c))
    if as_json:
        out.print_json(json.dumps([{"dir": str(i.dir), **i.manifest} for i in images] +
                                  [{"dir": str(i.dir), **i.manifest} for i in disks]))
        return
    t = Table(title=f"images in {_image_cache(c)}", title_justify="left")
    for col in ("name", "what", "sha256", "size"):
        t.add_column(col)
    for i in images:
        o = i.manifest["outputs"]
        t.add_row(i.dir.name, "kernel " + i.manifest["kernel"]["source"],
                  o["initrd.cpio"]["sha256"][:16],
                  human_size(o["vmlinuz"]["size"] + o["initrd.cpio"]["size"]))
    for d in disks:
        o = d.manifest["outputs"]["disk.qcow2"]
        t.add_row(d.dir.name, f"{d.manifest['os']} {d.manifest['firmware']} disk "
                  f"({human_size(o['virtual_size'])})", o["sha256"][:16], human_size(o["size"]))
    show(out, t)


@image.command("rm")
@common_options
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every built image and the kernel cache")
@handled
def image_rm(c: Ctx, names: tuple[str, ...], all_: bool) -> None:
    """Remove built images (by name from `image list`). Running guests keep their copy open."""
    import shutil
    from ..vm.image import cache_lock, list_images
    cache = _image_cache(c)
    if not names and not all_:
        raise UsageError("name an image (see `consolidator image list`) or pass --all")
    from ..vm.osimage import list_os_images
    known = {i.dir.name: i.dir for i in [*list_images(cache), *list_os_images(cache)]}
    targets = list(known.values()) if all_ else []
    for n in names:
        if n not in known:
            raise UsageError(f"no image {n!r} in {cache}")
        targets.append(known[n])
    with cache_lock(cache):                   # not under a build in progress
        for d in targets:
            shutil.rmtree(d, ignore_errors=True)
            out.print(f"removed {d.name}")
        if all_:
            for sub in ("debian-cloud", "debs"):
                shutil.rmtree(cache / sub, ignore_errors=True)


# ------------------------------------------------------------------------------ gc

@cli.command()
@common_options
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing")
@click.option("--instance", default=None,
              help="Instance prefix to collect [default: the one the state dir records]")
@click.option("--fabric-netns", default=None,
              help="With --instance: the netns holding its bridges, if not the root netns")
@handled
def gc(c: Ctx, dry_run: bool, instance: str | None, fabric_netns: str | None) -> None:
    """Find leftovers of an instance by name prefix and remove them.

    Works after a crash and with an empty state dir (name the instance with --instance):
    network namespaces, bridges and guest ports, nftables tables, cgroups, and any
    process still inside them. Refused while a supervisor runs the same instance: use
    destroy for a live fleet.
    """
    from ..daemon import teardown
    scope = _scope(c, instance, fabric_netns)
    if scope is None:
        raise UsageError(f"the state dir {c.state_dir} records no fleet: name the instance",
                         hint="consolidator gc --instance NAME")
    if not dry_run:
        _refuse_if_supervised(c, scope.instance)
    if dry_run:
        found = teardown.scan(scope)
        for item in found:
            out.print(item.describe(), markup=False)
        out.print(f"{len(found)} leftover{'s' if len(found) != 1 else ''} of instance "
                  f"{scope.instance}" + (" (dry run: nothing removed)" if found else ""),
                  markup=False)
        return
    gone = teardown.collect(scope)
    for g in gone:
        out.print(f"removed {g}", markup=False)
    out.print(f"instance {scope.instance}: {len(gone)} removed", markup=False)


def _scope(c: Ctx, instance: str | None, fabric_netns: str | None = None):
    """Whose objects destroy and gc act on: the instance the state dir records, or the
    one named with --instance (both given: they must agree). Never the inventory's."""
    from ..daemon.teardown import Scope
    recorded = Scope.recorded(c.state())
    if instance is None:
        return recorded
    if recorded is not None and recorded.instance != instance:
        raise ConflictError(f"the state dir {c.state_dir} records instance "
                            f"{recorded.instance!r}, not {instance!r}",
                            hint="pass the state dir of that instance with --state-dir")
    return recorded or Scope(instance, fabric_netns)


def _refuse_if_supervised(c: Ctx, instance: str) -> None:
    from ..daemon import protocol
    try:
        with protocol.connect(Path(c.state_dir), start=False) as client:
            running = client.call("status").get("instance")
    except SupervisorUnreachable:
        return
    if running == instance:
        raise ConflictError(f"a supervisor runs instance {instance} from {c.state_dir}",
                            hint="consolidator destroy removes a live fleet")


# ----------------------------------------------------------------------- apply

def _observed(c: Ctx):
    """The observed state: the supervisor's if one runs, else the state dir's records."""
    from ..daemon import protocol
    from ..plan import Observed
    try:
        with protocol.connect(Path(c.state_dir), start=False) as client:
            return Observed.from_json(client.call("observe"))
    except SupervisorUnreachable:
        return c.state().observe()


class Progress:
    """Live phases per guest: a rich table on a terminal, plain lines otherwise."""

    PHASES = ("network", "cgroup", "launch", "boot", "ready")

    def __init__(self, live: bool) -> None:
        self.rows: dict[str, tuple[str, float]] = {}
        self.live = None
        if live:
            from rich.live import Live
            self.live = Live(self._table(), console=err, refresh_per_second=8, transient=False)
            self.live.start()

    def _table(self):
        from rich.table import Table
        t = Table(title="apply", title_justify="left", box=None)
        t.add_column("guest", style="bold")
        t.add_column("phase")
        t.add_column("elapsed", justify="right")
        for name, (phase, el) in sorted(self.rows.items()):
            style = {"ready": "green", "failed": "bold red"}.get(phase, "yellow")
            t.add_row(name, f"[{style}]{phase}[/]", f"{el:.1f}s")
        return t

    def __call__(self, ev: dict) -> None:
        if "guest" not in ev:
            return
        self.rows[ev["guest"]] = (ev["phase"], ev.get("t", 0.0))
        if self.live is not None:
            self.live.update(self._table())
        else:
            err.print(f"{ev['guest']}: {ev['phase']} ({ev.get('t', 0):.2f}s)", markup=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


@cli.command()
@common_options
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every guest is READY (or failed)")
@click.option("--prune", is_flag=True, help="Stop and remove guests and networks no longer in "
                                            "the inventory")
@click.option("--purge", is_flag=True, help="With --prune: delete their disk overlays too")
@click.option("--allow-restart", is_flag=True,
              help="Restart running guests whose changes need it (vcpus, memory.max, nics, "
                   "image); otherwise those stay pending")
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing")
@click.option("--check-index", type=int, default=None,
              help="Refuse unless the state is still at this index (from `plan --json`)")
@handled
def apply(c: Ctx, wait: bool, prune: bool, purge: bool, allow_restart: bool, dry_run: bool,
          check_index: int | None) -> None:
    """Validate, plan, show the plan, then make it so through the supervisor.

    The supervisor is started detached when none runs. Independent guests start
    concurrently. Exits 0 when everything applied, 1 when something failed (the rest
    still applied; the next apply converges), 2 for an invalid inventory (nothing is
    touched), 5 when the plan went stale.
    """
    from ..daemon import protocol
    from ..plan import plan as make_plan
    from ..plan import Observed
    from .planview import render_plan
    from .render import status_table
    # a cold start: the supervisor starts now and imports while the inventory is checked
    # (an invalid inventory still applies nothing: a supervisor that runs changes nothing
    # until it is told to)
    early = None if dry_run else protocol.start_early(Path(c.state_dir))
    try:
        text, fleet = c.inventory()
    except BaseException:
        if early is not None:              # started for this apply only: it goes again
            protocol.stop_early(early)
        raise
    plain = c.log_format == "json" or not err.is_terminal
    if fleet.host.runas == "root":
        err.print("warning: host.runas: root: every guest's QEMU runs as root; a guest "
                  "that escapes QEMU owns the host",
                  style="bold yellow", markup=False)
    if dry_run:
        p = make_plan(fleet, _observed(c), prune=prune, purge=purge,
                      allow_restart=allow_restart)
        render_plan(out, p, header=f"Plan for instance {fleet.instance} (dry run)")
        return
    with protocol.connect(Path(c.state_dir), start=True, child=early) as client:
        begin = client.call("apply-begin", check_index=check_index)
        p = make_plan(fleet, Observed.from_json(begin["observed"]), prune=prune, purge=purge,
                      allow_restart=allow_restart)
        render_plan(out, p, header=f"Plan for instance {fleet.instance}, state index "
                                   f"{begin['index']}")
        if p.empty:
            client.call("apply-abort")
            return
        if not p.actions:
            client.call("apply-abort")
            out.print("Nothing to do until pending changes are allowed (--allow-restart).")
            return
        # the inventory itself goes, not the fleet: the supervisor validates it again
        args = dict(index=begin["index"], plan_digest=p.digest(), inventory=text,
                    inventory_path=str(Path(c.file).resolve()), prune=prune, purge=purge,
                    allow_restart=allow_restart)
        if not wait:
            client.send("apply-commit", **args)
            out.print("apply started; follow it with: consolidator status --watch")
            return
        progress = Progress(live=not plain)
        try:
            result = client.call("apply-commit", on_event=progress, **args)
        finally:
            progress.stop()
    show(out, status_table(result["status"]))
    for pd in result["pending"]:
        out.print(f"[yellow]pending[/] {pd['target']} {pd['name']}: needs a restart "
                  f"({', '.join(ch['field'] for ch in pd['changes'])}); "
                  "apply --allow-restart performs it")
    if result["failures"]:
        for f in result["failures"]:
            err.print(Text("failed: ", style="bold red") +
                      Text(f"{f['action']} {f['target']}: {f['error']}"))
        err.print(f"[red]{len(result['failures'])} failed[/]; the rest applied. Fix the "
                  "cause and apply again: it converges from here.")
        sys.exit(ExitCode.FAILURE)


# ---------------------------------------------------------------------- status

@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Versioned JSON (see docs/API.md)")
@click.option("--watch", is_flag=True, help="Refresh the table every second")
@click.option("--explain", is_flag=True,
              help="Also the rebalancer's last decision per guest, with its reason")
@handled
def status(c: Ctx, as_json: bool, watch: bool, explain: bool) -> None:
    """One row per guest: state, uptime, vCPUs, CPU %, memory (balloon / max), IPs,
    restarts and last event."""
    import time as _t
    from ..daemon import protocol
    with protocol.connect(Path(c.state_dir), start=True) as client:
        if as_json:                       # plain JSON: no rich on this path
            click.echo(json.dumps(client.call("status", explain=explain), indent=2,
                                  ensure_ascii=False))
            return
        from .render import explain_table, status_table
        if not watch:
            doc = client.call("status", explain=explain)
            show(out, status_table(doc))
            if explain:
                show(out, explain_table(doc))
            return
        from rich.live import Live
        with Live(status_table(client.call("status")), console=out, refresh_per_second=2) \
                as live:
            while True:
                _t.sleep(1)
                live.update(status_table(client.call("status")))


# ------------------------------------------------------------- guest commands

def _guest_call(c: Ctx, op: str, name: str) -> None:
    from ..daemon import protocol
    from .render import status_table
    with protocol.connect(Path(c.state_dir), start=True) as client:
        row = client.call(op, name=name, on_event=lambda ev: err.print(
            f"{ev.get('guest')}: {ev.get('phase')}", markup=False))
    show(out, status_table({"guests": [row], "instance": None, "index": None}))


@cli.command()
@common_options
@click.argument("name")
@handled
def stop(c: Ctx, name: str) -> None:
    """Stop a guest gracefully (power button, then quit, then kill). It stays down until
    start; note that apply starts guests with autostart: true."""
    _guest_call(c, "stop", name)


@cli.command()
@common_options
@click.argument("name")
@handled
def start(c: Ctx, name: str) -> None:
    """Start a stopped, crashed or failed guest (resets its restart history)."""
    _guest_call(c, "start", name)


@cli.command()
@common_options
@click.argument("name")
@handled
def restart(c: Ctx, name: str) -> None:
    """Stop a guest gracefully and start it again."""
    _guest_call(c, "restart", name)


@cli.command(context_settings={"ignore_unknown_options": True})
@common_options
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handled
def agent(c: Ctx, timeout: float, name: str, command: tuple[str, ...]) -> None:
    """Send COMMAND to the builtin image's guest agent and print its reply.

    \b
    consolidator agent web ping
    consolidator agent web meminfo
    consolidator agent web mem 64        hold 64 MiB (0 releases)
    consolidator agent web cpu 50        burn half of every vCPU (0 stops)
    """
    from ..daemon import protocol
    with protocol.connect(Path(c.state_dir), start=True) as client:
        res = client.call("agent", name=name, command=command[0], arg=" ".join(command[1:]),
                          timeout=timeout)
    out.print(res["reply"], markup=False)


@cli.command()
@common_options
@click.argument("name")
@handled
def console(c: Ctx, name: str) -> None:
    """Attach to a guest's serial console. Ctrl-] detaches.

    Without a terminal, copies stdin to the console and the console to stdout."""
    from .console import attach
    sock = c.state().guest_dir(name) / "run" / "console.sock"
    if not sock.exists():
        raise UsageError(f"guest {name} has no console socket (is it running?)")
    attach(sock, name)


@cli.command()
@common_options
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The PNG file to write")
@handled
def screenshot(c: Ctx, name: str, output: str) -> None:
    """Save the screen of a guest with display: vga as a PNG (QMP screendump)."""
    import base64
    from ..daemon import protocol
    _guest_name(name)
    with protocol.connect(Path(c.state_dir), start=False) as client:
        res = client.call("screenshot", name=name)
    data = base64.b64decode(res["png"])
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    Path(output).write_bytes(data)
    out.print(f"{output}: {width}x{height} PNG, {len(data)} bytes", markup=False)


@cli.command()
@common_options
@click.argument("name")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: a free one)")
@handled
def vnc(c: Ctx, name: str, port: int) -> None:
    """Forward the screen of a guest with display: vga to a VNC port on 127.0.0.1 while
    this runs (Ctrl-C ends it). QEMU listens on no TCP port: each viewer connection goes
    to the guest's unix socket, which the supervisor hands to QEMU."""
    from .console import forward_vnc
    _guest_name(name)
    sock = c.state().guest_dir(name) / "run" / "vnc.sock"
    if not sock.exists():
        raise UsageError(f"guest {name} has no screen socket (is it running, with "
                         "display: vga?)")
    forward_vnc(sock, name, port, lambda msg: out.print(msg, markup=False))


def _guest_name(name: str) -> None:
    from ..units import DNS_LABEL_RE
    if not DNS_LABEL_RE.match(name):
        raise UsageError(f"{name!r} is not a guest name")


@cli.command()
@common_options(file_short=False)
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines")
@click.option("-n", "--lines", type=int, default=200, show_default=True,
              help="How many lines to show first")
@handled
def logs(c: Ctx, name: str, follow: bool, lines: int) -> None:
    """A guest's serial log interleaved with its supervisor events.

    Root reads the state dir; a member of host.api_group gets them from the supervisor."""
    from .console import print_logs, print_logs_remote
    if not os.access(c.state_dir, os.X_OK):
        from ..daemon import protocol
        with protocol.connect(Path(c.state_dir), start=False) as client:
            print_logs_remote(lambda n, off: client.call("logs", name=name, lines=n,
                                                         **({"offset": off} if off else {})),
                              out, follow=follow, lines=lines)
        return
    if not DNS_LABEL_RE.match(name):           # a path component: never ../ or a/b
        raise UsageError(f"no guest {name!r}: a guest's name is a DNS label")
    gdir = Path(c.state_dir) / "guests" / name  # not StateDir: no schema import for logs
    if not gdir.exists():
        raise UsageError(f"no guest {name} in {c.state_dir}")
    print_logs(gdir / "log.jsonl", out, follow=follow, lines=lines)


# --------------------------------------------------------------------- destroy

@cli.command()
@common_options
@click.option("--purge", is_flag=True, help="Also delete the guests' disks: overlays, data "
              "disks, UEFI variable stores (also those an earlier destroy kept)")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
@click.option("--instance", default=None,
              help="The instance to destroy when the state dir records none (its objects "
                   "are found by name prefix); with a recorded one, they must agree")
@handled
def destroy(c: Ctx, purge: bool, yes: bool, instance: str | None) -> None:
    """Stop every guest and remove all networks, cgroups and netns of the fleet the state
    dir records; the supervisor stops. Base images and the image cache stay; overlays
    stay unless --purge. Never acts on an inventory: only on what was applied here, or on
    an instance named with --instance."""
    from ..daemon import protocol
    try:
        client: Any = protocol.connect(Path(c.state_dir), start=False)
    except SupervisorUnreachable:
        client = None
    with client or contextlib.nullcontext():
        info = client.call("ping") if client is not None else {}
        name = info.get("instance")
        if name is None or (instance is not None and instance != name):
            # no supervisor, or one without a fleet: what the state dir records decides
            # (the reading of which costs the schema's import, so not on the common path)
            scope = _scope(c, instance)
            kept = c.state().kept_disks() if scope is None and purge else []
            if kept:                # a destroy without --purge left disks: purge them now
                if not yes and sys.stdin.isatty():
                    click.confirm(f"Delete {len(kept)} kept disks in {c.state_dir}?",
                                  abort=True)
                c.state().clear(purge=True)
                for k in kept:
                    out.print(f"deleted {k}", markup=False)
                return
            if scope is None:
                raise UsageError(f"the state dir {c.state_dir} records no fleet: nothing to "
                                 "destroy", hint="to remove an instance's leftovers by name, "
                                                 "pass --instance NAME")
            name = scope.instance
        if not yes and sys.stdin.isatty():
            click.confirm(f"Destroy every guest and network of instance {name} "
                          f"(state dir {c.state_dir})?", abort=True)
        if client is None:
            res = _destroy_offline(c, scope, purge)
        else:
            pid = info.get("pid")
            res = client.call("destroy", purge=purge)
    # "the supervisor has stopped" is said only once it has: its exit, not its reply
    if client is not None and isinstance(pid, int) and not protocol.wait_exit(pid, timeout=15):
        res["failures"].append({"target": f"supervisor {pid}", "action": "stop",
                                "error": "still running 15 s after destroy"})
    for r in res["removed"]:
        out.print(f"removed {r}", markup=False)
    for f in res["failures"]:
        err.print(Text(f"failed: {f['action']} {f['target']}: {f['error']}", style="bold red"))
    out.print(f"destroyed ({len(res['removed'])} objects); the supervisor has stopped",
              markup=False)
    if res["failures"]:
        sys.exit(ExitCode.FAILURE)


def _destroy_offline(c: Ctx, scope: Any, purge: bool) -> dict[str, Any]:
    """No supervisor runs: the same teardown, then the records go."""
    from ..daemon import teardown
    gone = teardown.collect(scope)
    teardown.forget(c.state(), purge=purge)
    return {"removed": gone, "failures": []}


# ------------------------------------------------------------------- supervise

@cli.command()
@common_options
@handled
def supervise(c: Ctx) -> None:
    """Run the supervisor in the foreground (for systemd: tools/consolidator.service).

    apply, status and the other commands start it detached when it is not running."""
    from ..daemon.supervisor import main as run_supervisor
    logmod.configure(c.log_format)  # type: ignore[arg-type]
    run_supervisor(c.state_dir)


@cli.command()
@common_options
@click.option("--window", default="1h", show_default=True,
              help="1h, 24h, 7d (or a duration such as 30m)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "html", "prom"]),
              default="table", show_default=True)
@click.option("--shape", "shapes", multiple=True, metavar="vcpus=N,memory=SIZE[,min=SIZE]"
              "[,reserve=CORES]",
              help="A guest shape to count (repeatable); default: each shape in the fleet")
@click.option("--tiered", is_flag=True,
              help="Shrink the shape along the resource that failed and keep counting")
@click.option("--headroom", type=float, default=0.15, show_default=True,
              help="Share of capacity kept free when counting by observed use")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead of stdout")
@handled
def report(c: Ctx, window: str, fmt: str, shapes: tuple[str, ...], tiered: bool,
           headroom: float, output: str | None) -> None:
    """Capacity report: host and guest usage over a window, right-sizing, and how many more
    guests of a shape fit (by guarantees and by observed p95, naming the binding resource:
    FAILMEM, FAILCPU, FAILVCPU). Reads the state dir; no supervisor needed.

    JSON format: docs/REPORT.md. HTML: one self-contained file with inline SVG charts.
    """
    from ..report import document as rep
    from ..report import text as rtext
    parsed = [rep.parse_shape(s) for s in shapes]
    if os.access(c.state_dir, os.X_OK):
        doc = rep.build(Path(c.state_dir), window, parsed, tiered=tiered, headroom=headroom)
    else:                     # a member of host.api_group: the supervisor builds it
        from ..daemon import protocol
        with protocol.connect(Path(c.state_dir), start=False) as client:
            doc = client.call("report", window=window, shapes=list(shapes), tiered=tiered,
                              headroom=headroom)
    text: str | None = None
    if fmt == "json":
        text = rep.to_json(doc)
    elif fmt == "prom":
        text = rtext.to_prom(doc)
    elif fmt == "html":
        from ..report.html import render
        text = render(doc)
    if text is None:
        from rich.console import Console
        with (open(output, "w") if output else contextlib.nullcontext(sys.stdout)) as f:
            # a terminal's own width; files and pipes get 120 columns, not rich's 80
            con = Console(file=f, highlight=False,
                          width=None if not output and out.is_terminal else 120)
            for r in rtext.tables(doc):
                con.print(r)
    elif output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
    if output:
        err.print(f"report written to {output}")


def _recovery_commands() -> None:
    from . import recovery
    cli.add_command(recovery.snapshot)
    cli.add_command(recovery.backup)
    cli.add_command(recovery.restore)


_recovery_commands()


def main() -> None:
    cli(prog_name="consolidator")


if __name__ == "__main__":
    main()
