"""Logging through structlog: JSON lines for the daemon, readable lines for the CLI.

structlog is imported when logging is configured, not when this module is: the CLI's
common paths (validate, plan, apply's client side, status) log nothing, and their
latency is a feature (a no-op apply should take well under half a second).
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Literal

LogFormat = Literal["console", "json"]


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
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
