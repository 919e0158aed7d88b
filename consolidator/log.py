"""Logging through structlog: JSON lines for the daemon, readable lines for the CLI.

structlog is imported when logging is configured, not when this module is: the CLI's
common paths (validate, plan, apply's client side, status) log nothing, and their
latency is a feature (a no-op apply should take well under half a second).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any, Literal

LogFormat = Literal["console", "json"]


class LineSink:
    """A log file that never raises: each line is one ``write(2)`` on the descriptor
    (whole lines, even from threads, with O_APPEND), and a line the disk has no room for
    (ENOSPC, EIO) is counted, not raised into whatever was logging. The first line that
    fits again says how many were lost. A full disk must not break the daemon through
    its log."""

    def __init__(self, stream: IO[str]) -> None:
        self.fd = stream.fileno()
        self.lost = 0

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        try:
            if self.lost:
                note = json.dumps({"event": "log.lines_lost", "count": self.lost,
                                   "level": "warning", "timestamp":
                                   datetime.now(timezone.utc).isoformat()}) + "\n"
                os.write(self.fd, note.encode())
                self.lost = 0
            return os.write(self.fd, data)
        except OSError:
            self.lost += 1
            return 0

    def flush(self) -> None:
        pass


def configure(fmt: LogFormat = "console", *, verbose: bool = False,
              stream: IO[str] | None = None) -> None:
    """Configure structlog once per process. Idempotent."""
    import structlog
    level = logging.DEBUG if verbose else logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(sort_keys=False)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty(),
                                                 pad_event_to=28)
    out = stream or sys.stderr
    factory: Any = structlog.PrintLoggerFactory(file=out)
    if fmt == "json":
        try:
            factory = structlog.WriteLoggerFactory(file=LineSink(out))  # type: ignore[arg-type]
        except (AttributeError, OSError, ValueError):     # a stream without a descriptor
            pass
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
