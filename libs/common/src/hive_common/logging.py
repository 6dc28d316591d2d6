"""structlog set-up shared by every service, with stdlib logging routed through it.

:func:`configure_logging` installs one pipeline: contextvars merge (``request_id``,
``plan_id``, ``ticket_id`` bound per request), log level, logger name, ISO-8601 UTC
timestamp, then a JSON or console renderer. Records from stdlib loggers (uvicorn, grpc,
libraries) go through the same processors via :class:`structlog.stdlib.ProcessorFormatter`,
so a process prints one format only.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Literal

import structlog
from structlog.typing import Processor

from hive_common.config import LogFormat

REQUEST_CONTEXT_KEYS = ("request_id", "plan_id", "ticket_id")
"""The per-request keys bound in contextvars (others may be bound too)."""

# Loggers that install their own handlers or stop propagation; we route them to root.
_ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "grpc", "grpc._cython")

_HANDLER_MARK = "_hive_common_handler"


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer_chain(fmt: Literal["json", "pretty"]) -> list[Processor]:
    if fmt == "json":
        # Plain-text traceback: no frame locals (they can hold secrets or request bodies).
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return [structlog.dev.ConsoleRenderer()]


def _resolve_format(fmt: LogFormat, stream: IO[str]) -> Literal["json", "pretty"]:
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "pretty" if callable(isatty) and isatty() else "json"


def configure_logging(
    *,
    level: int | str = "INFO",
    fmt: LogFormat = "auto",
    stream: IO[str] | None = None,
) -> None:
    """Configure structlog and stdlib logging for the whole process.

    ``fmt="auto"`` renders pretty on a terminal and JSON otherwise. ``stream`` defaults to
    ``sys.stdout``. Safe to call again: the previous handler is replaced, never duplicated.
    """
    out = stream if stream is not None else sys.stdout
    resolved = _resolve_format(fmt, out)
    numeric_level = (
        logging.getLevelNamesMapping()[level.upper()] if isinstance(level, str) else level
    )
    shared = _shared_processors()

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached so that a second configure_logging() call takes effect everywhere.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer_chain(resolved),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    # Lines are rendered from the event dict: the caller's file and line, thread and
    # process that stdlib gathers for every record are never shown, and finding the
    # caller (a stack walk) was a large part of a log line's cost. The logging HOWTO's
    # "Optimization" section documents these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    for name in _ROUTED_LOGGERS:
        routed = logging.getLogger(name)
        routed.handlers.clear()
        routed.propagate = True
        routed.setLevel(logging.NOTSET)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger (stdlib-backed) named ``name`` with ``initial`` fields bound."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def bind_request_context(
    *,
    request_id: str | None = None,
    plan_id: str | None = None,
    ticket_id: str | None = None,
    **extra: Any,
) -> None:
    """Bind request-scoped fields in contextvars; ``None`` values are skipped.

    Every log line written in the current context (task) carries them.
    """
    values: dict[str, Any] = {
        "request_id": request_id,
        "plan_id": plan_id,
        "ticket_id": ticket_id,
        **extra,
    }
    structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def clear_request_context() -> None:
    """Drop every contextvar-bound field of the current context."""
    structlog.contextvars.clear_contextvars()


def current_request_context() -> Mapping[str, Any]:
    """The fields currently bound in contextvars."""
    return structlog.contextvars.get_contextvars()


@contextmanager
def request_context(**fields: Any) -> Iterator[None]:
    """Bind ``fields`` (``None`` skipped) for the ``with`` block, restoring previous values."""
    with structlog.contextvars.bound_contextvars(
        **{k: v for k, v in fields.items() if v is not None}
    ):
        yield


__all__ = [
    "REQUEST_CONTEXT_KEYS",
    "bind_request_context",
    "clear_request_context",
    "configure_logging",
    "current_request_context",
    "get_logger",
    "new_request_id",
    "request_context",
]
