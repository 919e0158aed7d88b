"""Collects inventory problems, each placed by the source map and tagged with its rule."""

from __future__ import annotations

from ..errors import Problem
from .codes import CODES
from .yamlpos import Mark, SourceMap


def dotted(loc: tuple[str | int, ...]) -> str:
    """``("guests", "web", "nics", 0, "ip")`` -> ``guests.web.nics[0].ip``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


class Reporter:
    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def at(self, code: str, mark: Mark, loc: tuple, message: str,
           hint: str | None = None) -> None:
        assert code in CODES, f"unregistered inventory rule {code}"
        self.problems.append(Problem(self.source.file, mark.line, mark.col, dotted(loc),
                                     message, hint, code))

    def value(self, code: str, loc: tuple, message: str, hint: str | None = None) -> None:
        """At the value of ``loc`` (or the nearest enclosing node)."""
        self.at(code, self.source.value(loc), loc, message, hint)

    def key(self, code: str, loc: tuple, message: str, hint: str | None = None) -> None:
        """At the key of ``loc`` (unknown keys, bad names)."""
        self.at(code, self.source.key(loc), loc, message, hint)
