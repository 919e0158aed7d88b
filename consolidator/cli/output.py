"""Where the CLI prints: rich consoles made on first use, and whole tables.

Shared by the full CLI (:mod:`.main`) and its quick path (:mod:`.quick`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text as _RichText


class _LazyConsole:
    """A rich Console made on first use: importing rich costs about 60 ms, which a
    `status --json` (plain JSON out) need not pay."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._options)
        return getattr(self._console, name)


def Text(*args: Any, **kwargs: Any) -> "_RichText":  # noqa: N802 - stands for rich's Text
    from rich.text import Text as RichText
    return RichText(*args, **kwargs)


out: Any = _LazyConsole(highlight=False, soft_wrap=True)
err: Any = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def show(console: Any, renderable: Any) -> None:
    """Print a table whole: at the terminal's width on a terminal; elsewhere (a pipe, a
    file) at its natural width, so no value is cut to fit 80 columns."""
    from rich.console import Console
    if console.is_terminal:
        console.print(renderable)
        return
    width = Console(width=1 << 14).measure(renderable).maximum
    Console(file=console.file, width=max(width, 20), highlight=False, soft_wrap=True,
            no_color=True).print(renderable)
