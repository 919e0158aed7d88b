"""The single error tree of consolidator.

Every error the project raises on purpose derives from :class:`ConsolidatorError`.
Each class carries a named exit code (:class:`ExitCode`), so the CLI maps an
error to its exit status by type, never by message text. Errors carry
structured fields; code that handles them branches on those fields.

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
    ├── ReadyTimeout                      exit 1             .serial_tail, .hint
    ├── QMPError                          exit 1             .error_class (QMP's class, e.g. GenericError)
    ├── RunstateError                     exit 1             .state, .required
    ├── CgroupError / NetError            exit 1 / 4
    └── SupervisorError                   exit 6 (SUPERVISOR) daemon unreachable or refused
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, order=True)
class Problem:
    """One inventory error, with the place it was found.

    ``line`` and ``col`` are 1-based. ``path`` is the dotted field path
    (``guests.web.memory.min``); ``yaml`` for syntax errors outside any field.
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    hint: str | None = None

    def render(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class InventoryError(ConsolidatorError):
    exit_code = ExitCode.INVALID

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col, p.path))
        n = len(self.problems)
        super().__init__(f"{n} error{'s' if n != 1 else ''} in inventory")


class UsageError(ConsolidatorError):
    exit_code = ExitCode.INVALID


class NotYetImplemented(ConsolidatorError):
    exit_code = ExitCode.INCOMPLETE

    def __init__(self, command: str, lacks: str) -> None:
        super().__init__(f"{command}: not available yet: needs {lacks}")
        self.lacks = lacks


class HostError(ConsolidatorError):
    """The host lacks something required (root, /dev/net/tun, a binary...)."""

    exit_code = ExitCode.HOST

    def __init__(self, message: str, *, fact: str | None = None, fix: str | None = None) -> None:
        super().__init__(message, hint=fix)
        self.fact = fact
        self.fix = fix


class ConflictError(ConsolidatorError):
    exit_code = ExitCode.CONFLICT


class StateError(ConsolidatorError):
    pass


class PlanError(ConsolidatorError):
    pass


class ImageError(ConsolidatorError):
    def __init__(self, message: str, *, tried: list[tuple[str, str]] | None = None,
                 hint: str | None = None) -> None:
        self.tried = list(tried or [])
        if self.tried:
            message += "".join(f"\n  - {src}: {why}" for src, why in self.tried)
        super().__init__(message, hint=hint)


class LaunchError(ConsolidatorError):
    """QEMU exited (or could not be spawned) before the guest was up."""

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

    def __init__(self, message: str, *, error_class: str | None = None,
                 command: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.command = command


class RunstateError(ConsolidatorError):
    """An operation was asked of a guest in a state that does not allow it."""

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


class SupervisorError(ConsolidatorError):
    exit_code = ExitCode.SUPERVISOR
