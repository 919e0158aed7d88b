"""YAML loading that remembers where every node came from.

PyYAML's ``safe_load`` forgets positions and silently keeps the last of two
duplicate keys. :class:`PositionLoader` is a ``SafeLoader`` subclass that builds
plain Python data from the composed node tree itself, recording for every path
(``("guests", "web", "memory", "min")``) the line and column of the key and of
the value, and reporting every duplicate key instead of dropping one.

No input stops it. Each node is built once: an alias yields the object its anchor
built, so an alias bomb costs what ``safe_load`` pays (positions are recorded where a
node first appears). Nesting deeper than :data:`MAX_DEPTH` is refused where it starts
(:class:`TooDeep`), before Python's recursion limit can be reached, and so is any tag
that is not one of YAML's own plain types (``!!python/object:...`` on a mapping was
silently ignored before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]
MAX_DEPTH = 64
_Y = "tag:yaml.org,2002:"
#: the tags an inventory's nodes may carry; anything else is refused (Y009)
PLAIN_TAGS = {_Y + t for t in ("map", "seq", "str", "int", "float", "bool", "null",
                               "timestamp")}


class TooDeep(yaml.composer.ComposerError):
    """Nesting deeper than MAX_DEPTH, raised at the node where it goes too deep."""


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    col: int   # 1-based

    @classmethod
    def of(cls, m: yaml.Mark | None) -> "Mark":
        return cls(m.line + 1, m.column + 1) if m is not None else cls(1, 1)


@dataclass
class SourceMap:
    """Where each path of a loaded document sits in its file."""

    file: str
    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def value(self, path: Path) -> Mark:
        """The value's position, or the nearest enclosing node's when absent."""
        return self._nearest(path, self.values)

    def key(self, path: Path) -> Mark:
        """The key's position (for unknown keys, bad names), falling back to the value."""
        if path in self.keys:
            return self.keys[path]
        return self._nearest(path, self.values)

    def _nearest(self, path: Path, table: dict[Path, Mark]) -> Mark:
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), Mark(1, 1))


@dataclass(frozen=True)
class YamlProblem:
    path: Path
    mark: Mark
    message: str
    code: str          # Y002 duplicate key, Y005 a key that is not a string


class PositionLoader(yaml.SafeLoader):
    """A SafeLoader that keeps each node's line and column and rejects duplicate keys."""

    def __init__(self, stream: str, file: str = "<inventory>") -> None:
        super().__init__(stream)
        self.source = SourceMap(file)
        self.problems: list[YamlProblem] = []
        self._depth = 0
        self._built: dict[int, Any] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise TooDeep(None, None, f"nested deeper than {MAX_DEPTH} levels",
                              self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def load_document(self) -> Any:
        """Load one document. Raises ``yaml.MarkedYAMLError`` on a syntax error."""
        try:
            node = self.get_single_node()
        finally:
            self.dispose()
        if node is None:
            return None
        return self._build(node, ())

    def _build(self, node: yaml.Node, path: Path) -> Any:
        self.source.values.setdefault(path, Mark.of(node.start_mark))
        if id(node) in self._built:          # an alias: its anchor's object, built once
            return self._built[id(node)]
        out = self._build_new(node, path)
        self._built[id(node)] = out
        return out

    def _build_new(self, node: yaml.Node, path: Path) -> Any:
        if node.tag not in PLAIN_TAGS:
            self.problems.append(YamlProblem(
                path, Mark.of(node.start_mark),
                f"tag {node.tag.replace(_Y, '!!')!r} is not allowed: only YAML's plain "
                "types (mappings, lists, strings, numbers, booleans, null)", "Y009"))
            return None
        if isinstance(node, yaml.MappingNode):
            n_explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            # flatten_mapping resolves merge keys (<<): merged pairs first, then the
            # node's own, which override them. Only the node's own keys can be duplicates.
            self.flatten_mapping(node)
            n_merged = len(node.value) - n_explicit
            out: dict[str, Any] = {}
            for key_node, value_node in node.value[:n_merged]:
                key = self.construct_object(key_node, deep=True)
                out[str(key)] = self._build(value_node, path + (str(key),))
            first_seen: dict[str, Mark] = {}
            for key_node, value_node in node.value[n_merged:]:
                key = self.construct_object(key_node, deep=True)
                kmark = Mark.of(key_node.start_mark)
                if not isinstance(key, str):
                    shown = key if not isinstance(key, bool) else str(key).lower()
                    self.problems.append(YamlProblem(
                        path + (str(shown),), kmark,
                        f"key {shown!r} is a {type(key).__name__}, not a string; quote it",
                        "Y005"))
                    key = str(shown)
                if key in first_seen:
                    f = first_seen[key]
                    self.problems.append(YamlProblem(
                        path + (key,), kmark,
                        f"duplicate key {key!r} (first defined at line {f.line}, column {f.col})",
                        "Y002"))
                    continue
                first_seen[key] = kmark
                self.source.keys[path + (key,)] = kmark
                out[key] = self._build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.construct_object(node, deep=True)


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap, list[YamlProblem]]:
    """Parse ``text``. Returns data, positions and non-fatal problems (duplicates, bad keys).

    A syntax error raises ``yaml.MarkedYAMLError``; the caller turns it into a Problem.
    """
    loader = PositionLoader(text, file)
    data = loader.load_document()
    return data, loader.source, loader.problems
