"""What every command shares: its settings (:class:`Ctx`), the global options and the
error handling that turns an error into one clear message and its exit code."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .. import DEFAULT_STATE_DIR
from .. import log as logmod
from ..errors import ConsolidatorError, ExitCode, InventoryError, PlanExit
from .output import Text, err


class Ctx:
    """Settings shared by every command."""

    def __init__(self) -> None:
        self.state_dir: str = os.environ.get("CONSOLIDATOR_STATE_DIR", DEFAULT_STATE_DIR)
        self.file: str = os.environ.get("CONSOLIDATOR_INVENTORY", "inventory.yaml")
        self.log_format: str = "console"
        self.verbose: bool = False

    def state(self):
        from ..state import StateDir
        return StateDir(self.state_dir)

    def fleet(self):
        from ..model import load_fleet
        return load_fleet(self.file, state_dir=Path(self.state_dir))

    def inventory(self):
        """The inventory's text, read once, and the fleet it describes."""
        from ..hostfacts import HostFacts
        from ..inventory import read_inventory
        from ..model import parse_fleet
        text, shown = read_inventory(self.file)
        return text, parse_fleet(text, shown, HostFacts.probe(), Path(self.file).parent,
                                 state_dir=Path(self.state_dir))


def _set(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def cb(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            root = ctx.find_root()
            root.ensure_object(Ctx)
            setattr(root.obj, attr, value)
    return cb


def common_options(f: Callable | None = None, *, file_short: bool = True) -> Callable:
    """Global options, accepted on the group and on every command. ``file_short=False``
    leaves ``-f`` to the command (``logs -f`` follows); ``--file`` still works."""
    if f is None:
        return lambda g: common_options(g, file_short=file_short)
    file_flags = ("-f", "--file") if file_short else ("--file",)
    opts = [
        click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                     expose_value=False, callback=_set("state_dir"), is_eager=True,
                     help=f"State directory [env CONSOLIDATOR_STATE_DIR; default "
                          f"{DEFAULT_STATE_DIR}]"),
        click.option(*file_flags, type=click.Path(dir_okay=False), default=None,
                     expose_value=False, callback=_set("file"), is_eager=True,
                     help="Inventory file [default ./inventory.yaml]"),
        click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
                     expose_value=False, callback=_set("log_format"), is_eager=True,
                     help="Log lines for people (console) or machines (json)"),
        click.option("-v", "--verbose", is_flag=True, default=False, expose_value=False,
                     callback=_set("verbose"), is_eager=True,
                     help="More detail, and tracebacks on errors"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def handled(f: Callable) -> Callable:
    """Run a command: errors become one clear message and their exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        c: Ctx = ctx.find_root().ensure_object(Ctx)
        if c.verbose or c.log_format == "json":
            logmod.configure(c.log_format, verbose=c.verbose)  # type: ignore[arg-type]
        try:
            return f(c, *args, **kwargs)
        except InventoryError as e:
            for p in e.problems:
                err.print(p.render(), markup=False)
            err.print(f"[red]{e.message}[/]; nothing was applied")
            if c.verbose:
                err.print(traceback.format_exc(), markup=False)
            sys.exit(_code(ctx, e))
        except ConsolidatorError as e:
            # messages quote paths and system text: never read them as markup
            err.print(Text("error: ", style="bold red") + Text(e.message))
            if e.hint:
                err.print(Text("hint: ", style="yellow") + Text(e.hint))
            if c.verbose:
                err.print(traceback.format_exc(), markup=False)
            sys.exit(_code(ctx, e))
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(ExitCode.INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            err.print(Text("internal error: ", style="bold red") +
                      Text(f"{type(e).__name__}: {e}"))
            if c.verbose:
                err.print(traceback.format_exc(), markup=False)
            else:
                err.print("[dim]run again with -v for the traceback[/]")
            sys.exit(ExitCode.FAILURE)

    return wrapper


def _code(ctx: click.Context, e: ConsolidatorError) -> int:
    if ctx.meta.get("detailed_exitcode"):
        return PlanExit.ERROR
    return int(e.exit_code)
