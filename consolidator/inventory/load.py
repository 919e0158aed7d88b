"""Read and validate an inventory file, or report every error in it.

Three passes, all of which always run, so the operator sees every problem at once:

1. YAML, through :class:`PositionLoader` (syntax errors stop here: there is no tree).
2. Structure, through pydantic: unknown keys (with a suggestion), types, sizes.
3. Meaning, through :mod:`.checks`, on every section that parsed.

Each problem is reported as ``FILE:LINE:COL: dotted.path: message [CODE]``. What comes
out is the validated :class:`~.schema.Inventory`; :func:`consolidator.model.resolve`
turns it into the fleet.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import InventoryError, Problem
from ..hostfacts import HostFacts
from . import checks
from .reporter import Reporter
from .schema import GuestSpec, HostSpec, ImageSpec, Inventory, NetworkSpec
from .yamlpos import Mark, TooDeep, load_yaml

DEFAULT_FILE = "inventory.yaml"
MAX_BYTES = 512 << 10        # an inventory of a thousand guests is under 200 KiB; JSON-quoted
                             # it still fits in one API message (1 MiB)


def _all_field_names() -> set[str]:
    names: set[str] = set()
    stack: list[type] = [Inventory]
    while stack:
        m = stack.pop()
        for n, f in m.model_fields.items():
            names.add(n)
            for t in typing.get_args(f.annotation) + (f.annotation,):
                for tt in (t, *typing.get_args(t)):
                    if isinstance(tt, type) and issubclass(tt, BaseModel) and tt not in stack:
                        stack.append(tt)
    return names


def _file_problem(shown: str, message: str, hint: str | None = None) -> InventoryError:
    return InventoryError([Problem(shown, 1, 1, "(file)", message, hint, "Y004")])


def read_inventory(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The file's text and the name problems show it under. Only a regular file of at
    most MAX_BYTES is read (a FIFO is never waited on, /dev/zero never read), and it must
    be UTF-8 text. Raises Y004 and Y006 problems."""
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _file_problem(shown, "no such file",
                            "pass -f FILE or run from the inventory's directory") from None
    except OSError as e:
        raise _file_problem(shown, f"cannot read: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _file_problem(shown, "not a regular file", "an inventory is a file of YAML")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_BYTES:
            raise _file_problem(shown, f"{st.st_size} bytes: larger than the "
                                f"{MAX_BYTES >> 10} KiB an inventory may be")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:                      # it grew while we looked
        raise _file_problem(shown, f"larger than the {MAX_BYTES >> 10} KiB an inventory "
                            "may be")
    try:
        return data.decode("utf-8"), shown
    except UnicodeDecodeError as e:
        line, col = _place(data, e.start)
        raise InventoryError([Problem(shown, line, col, "(file)",
                                      f"byte 0x{data[e.start]:02x} is not UTF-8",
                                      "save the file as UTF-8", "Y006")]) from None


def _place(data: bytes | str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset``."""
    nl = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(nl, 0, offset) + 1
    return line, offset - (data.rfind(nl, 0, offset) + 1) + 1  # type: ignore[arg-type]


def load_inventory(path: str | os.PathLike[str], facts: HostFacts,
                   state_dir: Path | None = None) -> Inventory:
    """Read and validate ``path``. Raises :class:`InventoryError` listing every problem."""
    text, shown = read_inventory(path)
    return validate(text, shown, facts, base_dir=Path(path).parent, state_dir=state_dir)


def validate(text: str, file: str, facts: HostFacts, base_dir: Path | None = None,
             state_dir: Path | None = None) -> Inventory:
    """``state_dir``: whose image cache is an image root by default."""
    """Every check, every problem at once: the validated inventory, or InventoryError."""
    try:
        data, source, yproblems = load_yaml(text, file)
    except TooDeep as e:
        mark = Mark.of(e.problem_mark)
        raise InventoryError([Problem(file, mark.line, mark.col, "yaml", str(e.problem),
                                      None, "Y008")]) from None
    except yaml.reader.ReaderError as e:
        line, col = _place(text, e.position)
        raise InventoryError([Problem(file, line, col, "yaml",
                                      f"character U+{_codepoint(e.character):04X} is not "
                                      "allowed in YAML",
                                      None, "Y006")]) from None
    except yaml.MarkedYAMLError as e:
        mark = Mark.of(e.problem_mark or e.context_mark)
        msg = " ".join(x for x in (e.context, e.problem) if x) or "invalid YAML"
        raise InventoryError([Problem(file, mark.line, mark.col, "yaml", msg, None,
                                      "Y001")]) from None
    rep = Reporter(source)
    for yp in yproblems:
        rep.at(yp.code, yp.mark, yp.path, yp.message)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        rep.value("Y003", (), f"the inventory must be a mapping, got {type(data).__name__}")
        raise InventoryError(rep.problems)

    inventory = None
    try:
        inventory = Inventory.model_validate(data)
    except ValidationError as e:
        for err in _merge_union_errors(e.errors()):
            _report_pydantic(rep, err)

    checks.run(rep, data, _parse_sections(data), facts, base_dir or Path("."), state_dir)
    if rep.problems:
        raise InventoryError(_consequences_dropped(_dedupe(rep.problems)))
    assert inventory is not None
    return inventory


def _codepoint(c: int | str) -> int:
    return c if isinstance(c, int) else ord(c)


def _consequences_dropped(problems: list[Problem]) -> list[Problem]:
    """A refused tag leaves its node empty: what the schema then says of it is noise."""
    refused = [p.path for p in problems if p.code == "Y009"]
    return [p for p in problems if p.code == "Y009" or not any(
        p.path == r or p.path.startswith(r + ".") or p.path.startswith(r + "[")
        for r in refused)]


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple] = set()
    out = []
    for p in problems:
        k = (p.line, p.col, p.path, p.message)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def _parse_sections(data: dict[str, Any]) -> checks.Parsed:
    """Each section element validated on its own: what parsed is checked for meaning."""

    def one(model: type[BaseModel], raw: Any) -> Any:
        try:
            return model.model_validate(raw if raw is not None else {})
        except ValidationError:
            return None

    def many(model: type[BaseModel], raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            return {}
        return {str(k): one(model, v) for k, v in raw.items()}

    return checks.Parsed(
        instance=data.get("instance", "cns"),
        host=one(HostSpec, data.get("host")),
        images=many(ImageSpec, data.get("images", {})),
        networks=many(NetworkSpec, data.get("networks", {})),
        guests=many(GuestSpec, data.get("guests", {})),
    )


_UNION_TAG = re.compile(r"^(function-[a-z]+\[.*\]|literal\[.*\]|int|str|float|bool|none|"
                        r"list\[.*\]|dict\[.*\]|tuple\[.*\]|[A-Z][A-Za-z]+)$")


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic reports a bad value of ``A | B`` once per member, with the member's tag
    in the path (``host.memory.literal['auto']``). Strip the tags and make one error per
    place that names every alternative."""
    out: dict[tuple, dict[str, Any]] = {}
    order: list[tuple] = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)
                                                  and p not in _FIELD_NAMES))
        if loc == tuple(err["loc"]):
            out[(loc, len(order))] = err
            order.append((loc, len(order)))
            continue
        key = (loc, -1)
        if key not in out:
            out[key] = {**err, "loc": loc, "alternatives": []}
            order.append(key)
        out[key]["alternatives"].append(err)
    result = []
    for key in order:
        err = out[key]
        alts = err.get("alternatives")
        if alts:
            wants, whys = [], []
            for a in alts:
                if a["type"] == "value_error" and "ctx" in a:
                    m = str(a["ctx"]["error"])
                    (whys if m not in whys else []).append(m)
                else:
                    m = a["msg"].replace("Input should be ", "")
                    (wants if m not in wants else []).append(m)
            msg = "; ".join(whys)
            if wants:
                msg = f"expected {' or '.join(wants)}" + (f", or: {msg}" if msg else "")
            err = {"type": "union", "loc": err["loc"], "msg": msg, "input": err.get("input")}
        result.append(err)
    return result


_FIELD_NAMES = _all_field_names()

_MESSAGES = {
    "missing": "required field is missing",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "string_type": "expected a string",
}


def _report_pydantic(rep: Reporter, err: dict[str, Any]) -> None:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else (
            f"allowed here: {', '.join(allowed)}" if allowed else None)
        rep.key("S001", loc, f"unknown key {key!r}", hint)
        return
    if kind == "missing":
        rep.key("S002", loc[:-1], f"{_MESSAGES['missing']}: {loc[-1]}")
        return
    msg = _MESSAGES.get(kind) or err["msg"]
    if kind == "union":
        rep.value("S003", loc, msg)
        return
    if kind == "value_error":
        msg = str(err["ctx"]["error"]) if "ctx" in err else msg.removeprefix("Value error, ")
    elif kind in ("literal_error",):
        msg = err["msg"].replace("Input should be", "expected")
    elif kind.startswith(("greater_than", "less_than")):
        msg = err["msg"].replace("Input should be", "must be")
    if "input" in err and kind != "value_error" and _scalar(err["input"]):
        msg += f", got {_show(err['input'])}"
    rep.value("S003", loc, msg)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v)


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else args[0]
            if not models and len(args) > 1:
                return tp
        else:
            return tp


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys allowed at ``loc``, by walking the schema along it."""
    tp: Any = Inventory
    parts = list(loc)
    while parts:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            tp = field.annotation
            continue
        origin = typing.get_origin(tp)
        if origin in (dict, list, tuple):
            parts.pop(0)
            tp = typing.get_args(tp)[-1 if origin is dict else 0]
            continue
        return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []
