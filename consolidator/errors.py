"""The single error tree of consolidator.

Every error the project raises on purpose derives from :class:`ConsolidatorError`.
Each class carries a named exit code (:class:`ExitCode`), so the CLI maps an
error to its exit status by type, never by message text. Errors carry
structured fields (``FIELDS``); code that handles them branches on those fields.

    ConsolidatorError                     exit 1 (FAILURE)
    ├── InventoryError                    exit 2 (INVALID)   .problems: list[Problem]
    ├── UsageError                        exit 2 (INVALID)
    ├── NotYetImplemented                 exit 3 (INCOMPLETE) .lacks
    ├── HostError                         exit 4 (HOST)      .fact, .fix
    ├── ConflictError                     exit 5 (CONFLICT)  (stale plan, lock held, name clash)
    ├── StateError                        exit 1             (state dir unreadable, wrong version)
    ├── PlanError                         exit 1
    ├── ImageError                        exit 1             .tried: list[(source, reason)]
    ├── LaunchError                       exit 1             .exitcode, .argv, .stderr_tail, .serial_tail
    │   └── ReadyTimeout                  exit 1
    ├── QMPError                          exit 1             .error_class (QMP's class, e.g. GenericError)
    ├── AgentError                        exit 1             .timeout (the guest agent said err, or nothing)
    ├── RunstateError                     exit 1             .state, .required, .op
    ├── CgroupError                       exit 1
    ├── NetError                          exit 1
    ├── AccessDenied                      exit 1             the API's peer may not do that
    └── SupervisorError                   exit 6 (SUPERVISOR) the daemon refused or went away
        └── SupervisorUnreachable         exit 6             no daemon runs for the state dir

An error crosses the supervisor's socket whole: :meth:`ConsolidatorError.to_wire` gives
its class name, message, hint, exit code and fields, and :func:`from_wire` makes the
same class again on the client's side, so exit codes never change across the socket.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    INVALID = 2
    INCOMPLETE = 3
    HOST = 4
    CONFLICT = 5
    SUPERVISOR = 6
    INTERRUPTED = 130


#: ``plan --detailed-exitcode`` uses Terraform's convention instead.
class PlanExit(enum.IntEnum):
    NO_CHANGES = 0
    ERROR = 1
    CHANGES = 2


class ConsolidatorError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE
    #: structured fields that travel with the error (JSON-able values)
    FIELDS: tuple[str, ...] = ()

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint,
                "exit_code": int(self.exit_code),
                "fields": {f: _plain(getattr(self, f, None)) for f in self.FIELDS}}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, Problem):
        return asdict(v)
    return v


@dataclass(frozen=True, order=True)
class Problem:
    """One inventory error, with the place it was found and the rule that found it.

    ``line`` and ``col`` are 1-based. ``path`` is the dotted field path
    (``guests.web.memory.min``); ``yaml`` for syntax errors outside any field. ``code``
    names the rule (see :mod:`consolidator.inventory.codes`); it never changes meaning.
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    hint: str | None = None
    code: str = ""

    def render(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        if self.code:
            text += f" [{self.code}]"
        return text


class InventoryError(ConsolidatorError):
    exit_code = ExitCode.INVALID
    FIELDS = ("problems",)

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col, p.path))
        n = len(self.problems)
        super().__init__(f"{n} error{'s' if n != 1 else ''} in inventory")


class UsageError(ConsolidatorError):
    exit_code = ExitCode.INVALID


class NotYetImplemented(ConsolidatorError):
    exit_code = ExitCode.INCOMPLETE
    FIELDS = ("lacks",)

    def __init__(self, command: str, lacks: str) -> None:
        super().__init__(f"{command}: not available yet: needs {lacks}")
        self.lacks = lacks


class HostError(ConsolidatorError):
    """The host lacks something required (root, /dev/net/tun, a binary...)."""

    exit_code = ExitCode.HOST
    FIELDS = ("fact", "fix")

    def __init__(self, message: str, *, fact: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, hint=fix)
        self.fact = fact
        self.fix = fix


class ConflictError(ConsolidatorError):
    exit_code = ExitCode.CONFLICT


class StateError(ConsolidatorError):
    pass


class HistoryUnavailable(StateError):
    """The history cannot be opened for now (a full disk, an I/O error, a lock): the
    file is not at fault, and opening it again later may succeed."""


class PlanError(ConsolidatorError):
    pass


class ImageError(ConsolidatorError):
    FIELDS = ("tried",)

    def __init__(self, message: str, *, tried: list[tuple[str, str]] | None = None,
                 hint: str | None = None) -> None:
        self.tried = list(tried or [])
        if self.tried:
            message += "".join(f"\n  - {src}: {why}" for src, why in self.tried)
        super().__init__(message, hint=hint)


class LaunchError(ConsolidatorError):
    """QEMU exited (or could not be spawned) before the guest was up."""

    FIELDS = ("exitcode", "argv", "stderr_tail", "serial_tail")

    def __init__(self, message: str, *, exitcode: int | None = None, argv: list[str] | None = None,
                 stderr_tail: str = "", serial_tail: str = "", hint: str | None = None) -> None:
        self.exitcode = exitcode
        self.argv = list(argv or [])
        self.stderr_tail = stderr_tail
        self.serial_tail = serial_tail
        full = message
        if stderr_tail.strip():
            full += "\nqemu said:\n  " + "\n  ".join(stderr_tail.strip().splitlines()[-12:])
        super().__init__(full, hint=hint)


class ReadyTimeout(LaunchError):
    """The guest did not print its READY line in time."""


class QMPError(ConsolidatorError):
    """A QMP command failed. ``error_class`` is QMP's own class (GenericError, ...)."""

    FIELDS = ("error_class", "command")

    def __init__(self, message: str, *, error_class: str | None = None,
                 command: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.command = command


class AgentError(ConsolidatorError):
    """The guest agent answered ``err``, or did not answer in time (``timeout`` True)."""

    FIELDS = ("timeout",)

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class RunstateError(ConsolidatorError):
    """An operation was asked of a guest in a state that does not allow it."""

    FIELDS = ("state", "required", "op")

    def __init__(self, name: str, state: str, required: tuple[str, ...], op: str) -> None:
        super().__init__(
            f"guest {name}: cannot {op} while {state}; requires {' or '.join(required)}")
        self.state = state
        self.required = required
        self.op = op


class CgroupError(ConsolidatorError):
    pass


class NetError(ConsolidatorError):
    pass


class AccessDenied(ConsolidatorError):
    """The supervisor's peer may not do what it asked (by its uid and groups)."""


class SupervisorError(ConsolidatorError):
    exit_code = ExitCode.SUPERVISOR


class SupervisorUnreachable(SupervisorError):
    """No supervisor runs for the state dir (and none was to be started)."""


def error_classes() -> dict[str, type[ConsolidatorError]]:
    """Every class of the tree, by name."""
    out: dict[str, type[ConsolidatorError]] = {}
    todo: list[type[ConsolidatorError]] = [ConsolidatorError]
    while todo:
        c = todo.pop()
        out[c.__name__] = c
        todo.extend(c.__subclasses__())
    return out


def from_wire(d: dict[str, Any]) -> ConsolidatorError:
    """The error :meth:`ConsolidatorError.to_wire` described, as the same class with the
    same fields. An unknown class (a newer daemon) becomes the root with its exit code."""
    cls = error_classes().get(str(d.get("type")), ConsolidatorError)
    e = cls.__new__(cls)
    message = str(d.get("message", "supervisor error"))
    Exception.__init__(e, message)
    e.message = message
    e.hint = d.get("hint")
    fields = d.get("fields") or {}
    for f in cls.FIELDS:
        setattr(e, f, fields.get(f))
    if cls is InventoryError:
        e.problems = [Problem(**p) for p in (fields.get("problems") or [])]  # type: ignore[attr-defined]
    if cls is RunstateError:
        e.required = tuple(fields.get("required") or ())  # type: ignore[attr-defined]
    if cls is ImageError:
        e.tried = [tuple(t) for t in (fields.get("tried") or [])]  # type: ignore[attr-defined]
    if cls is ConsolidatorError and d.get("type") != "ConsolidatorError":
        try:
            e.exit_code = ExitCode(int(d.get("exit_code", 1)))
        except ValueError:
            e.exit_code = ExitCode.FAILURE
    return e
