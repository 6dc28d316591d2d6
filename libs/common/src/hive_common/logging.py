"""structlog set-up shared by every service, with stdlib logging rendered the same way.

:func:`configure_logging` installs one set of processors: contextvars merge
(``request_id``, ``plan_id``, ``ticket_id`` bound per request), log level, logger name,
ISO-8601 UTC timestamp, then a JSON or console renderer. structlog loggers run them
natively (no stdlib ``LogRecord``; disabled levels are no-op methods) and write each line
straight to the stream. Records from stdlib loggers (uvicorn, grpc, libraries) go through
the same processors via :class:`structlog.stdlib.ProcessorFormatter` on a handler writing
to that stream, under the same lock, so a process prints one format only and lines from
the two paths never interleave.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import FrameType
from typing import IO, Any, Literal, Protocol

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from hive_common.config import LogFormat
from hive_common.errors import HiveError
from hive_common.text import escape_controls

REQUEST_CONTEXT_KEYS = ("request_id", "plan_id", "ticket_id")
"""The per-request keys bound in contextvars (others may be bound too)."""

# Loggers that install their own handlers or stop propagation; we route them to root.
_ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "grpc", "grpc._cython")

_HANDLER_MARK = "_hive_common_handler"


class HiveLogger(Protocol):
    """What :func:`get_logger` returns: a structlog bound logger (level-filtering wrapper).

    Log methods take the event, optional ``%`` arguments and fields. Unlike
    ``structlog.stdlib.BoundLogger`` there are no stdlib ``Logger`` methods
    (``setLevel``, ``isEnabledFor``, ...). ``event`` is declared optional to match
    ``hive_common.config.WarningLogger``, but a call must pass it.
    """

    def bind(self, **new_values: Any) -> HiveLogger: ...
    def unbind(self, *keys: str) -> HiveLogger: ...
    def debug(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...
    def info(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...
    def warning(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...
    def error(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...
    def exception(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...
    def critical(self, event: str | None = ..., *args: Any, **kw: Any) -> Any: ...


def log_round_failure(logger: HiveLogger, what: str, exc: Exception) -> None:
    """Log a failed round of a background loop, which goes on: a dependency being away
    is a warning; anything else is a defect, logged with its traceback (the loop must
    survive it too, or one bad row would stop it for good)."""
    if isinstance(exc, HiveError):
        logger.warning(what, error=exc.message, code=exc.code)
    else:
        logger.error(what, exc_info=exc)


class _LineWriter:
    """What a structlog logger wraps: writes one rendered line to the shared stream.

    ``name`` is read by :func:`structlog.stdlib.add_logger_name` for the ``logger`` key.
    """

    __slots__ = ("_flush", "_lock", "_write", "name")

    def __init__(
        self,
        name: str,
        write: Callable[[str], object],
        flush: Callable[[], object],
        lock: AbstractContextManager[Any],
    ) -> None:
        self.name = name
        self._write = write
        self._flush = flush
        self._lock = lock

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline in one call, then flush (as StreamHandler does)."""
        with self._lock:
            self._write(message + "\n")
            self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LineWriterFactory:
    """structlog ``logger_factory``: a :class:`_LineWriter` named as ``get_logger`` was asked.

    Called for every line (loggers are not cached, so reconfiguration reaches them), so it
    only builds a four-slot object.
    """

    def __init__(self, stream: IO[str], lock: AbstractContextManager[Any]) -> None:
        self._write = stream.write
        self._flush = stream.flush
        self._lock = lock

    def __call__(self, *args: Any) -> _LineWriter:
        if not args:
            # structlog.get_logger() without a name: the calling module, as stdlib's
            # LoggerFactory guesses it.
            name = _calling_module()
        elif args[0] is None:
            name = "root"  # what logging.getLogger(None) was called
        else:
            name = str(args[0])
        return _LineWriter(name, self._write, self._flush, self._lock)


def _calling_module() -> str:
    # The first frame outside this module and structlog, as structlog's stdlib factory does.
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", "?"))
        if module != __name__ and not module.startswith("structlog"):
            return module
        frame = frame.f_back
    return "?"


def _drop_everything(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    raise structlog.DropEvent


def _shared_processors() -> list[Processor]:
    # No PositionalArgumentsFormatter: the filtering wrapper applies ``%`` arguments itself
    # and ProcessorFormatter hands foreign records over already formatted.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # The stdlib record's name for foreign records, the _LineWriter's name otherwise.
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _escape_controls(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Pretty format: values with control characters escaped (a NUL from a request path
    made grep take a whole log for binary); the JSON format escapes them already."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = escape_controls(value)
    return event_dict


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def _renderer_chain(fmt: Literal["json", "pretty"], stream: IO[str]) -> list[Processor]:
    if fmt == "json":
        # Plain-text traceback: no frame locals (they can hold secrets or request bodies).
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    # Colours only on a terminal: in a file (make dev's logs) they are escape sequences.
    return [_escape_controls, structlog.dev.ConsoleRenderer(colors=_is_terminal(stream))]


def _resolve_format(fmt: LogFormat, stream: IO[str]) -> Literal["json", "pretty"]:
    if fmt != "auto":
        return fmt
    return "pretty" if _is_terminal(stream) else "json"


def _report_logging_error() -> None:
    """What :meth:`logging.Handler.handleError` does: tell stderr, never fail the caller."""
    if logging.raiseExceptions and sys.stderr:
        try:
            sys.stderr.write("--- Logging error ---\n")
            traceback.print_exc(file=sys.stderr)
        except OSError:  # stderr is gone too
            pass


def _never_raising(base: type[FilteringBoundLogger]) -> type[FilteringBoundLogger]:
    """``base`` whose log calls swallow (and report) rendering and write errors.

    A line that cannot be rendered or written (closed stream, broken pipe, full disk) must
    not fail the request that logs it; the stdlib handler path never did either.
    """

    def _proxy_to_logger(
        self: structlog.BoundLoggerBase,
        method_name: str,
        event: str | None = None,
        **event_kw: Any,
    ) -> Any:
        try:
            return structlog.BoundLoggerBase._proxy_to_logger(self, method_name, event, **event_kw)
        except Exception:
            _report_logging_error()
            return None

    wrapper: type[FilteringBoundLogger] = type(
        base.__name__, (base,), {"_proxy_to_logger": _proxy_to_logger}
    )
    return wrapper


# structlog has a filtering wrapper class per standard level only.
_WRAPPERS = {
    level: _never_raising(structlog.make_filtering_bound_logger(level))
    for level in (
        logging.NOTSET,
        logging.DEBUG,
        logging.INFO,
        logging.WARNING,
        logging.ERROR,
        logging.CRITICAL,
    )
}


def _filtering_wrapper(level: int) -> tuple[type[FilteringBoundLogger], list[Processor]]:
    """structlog's wrapper class for ``level`` and the processors to put before all others.

    A level between two standard ones filters the named methods like the next standard
    level up; above CRITICAL nothing is logged (as stdlib does).
    """
    for standard, wrapper in _WRAPPERS.items():
        if level <= standard:
            return wrapper, []
    return _WRAPPERS[logging.CRITICAL], [_drop_everything]


class _PeerGoneFilter(logging.Filter):
    """grpc logs "ExecuteBatchError raised in core by servicer method [...]" at ERROR, with
    a traceback, when a stream's message could not be sent: its client went away (killed,
    or closed without reading). That is a client leaving, not a fault of the service:
    logged at INFO, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("ExecuteBatchError raised in core by servicer method"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg}: the client went away before it was sent"
            record.exc_info = record.exc_text = None
        return True


_PEER_GONE = _PeerGoneFilter()


def configure_logging(
    *,
    level: int | str = "INFO",
    fmt: LogFormat = "auto",
    stream: IO[str] | None = None,
) -> None:
    """Configure structlog and stdlib logging for the whole process.

    ``fmt="auto"`` renders pretty on a terminal and JSON otherwise. ``stream`` defaults to
    ``sys.stdout``. Safe to call again: the previous handler is replaced, never duplicated,
    and loggers from :func:`get_logger` follow the new level, format and stream. A logger
    returned by ``.bind()`` keeps the configuration it was bound under.
    """
    out = stream if stream is not None else sys.stdout
    resolved = _resolve_format(fmt, out)
    numeric_level = (
        logging.getLevelNamesMapping()[level.upper()] if isinstance(level, str) else level
    )
    shared = _shared_processors()
    renderer = _renderer_chain(resolved, out)

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    # structlog loggers write under the handler's own lock: one lock for every line that
    # reaches the stream, whichever path it took.
    lock = handler.lock
    assert lock is not None  # created by Handler.__init__

    wrapper_class, drop = _filtering_wrapper(numeric_level)
    structlog.configure(
        processors=[*drop, *shared, *renderer],
        logger_factory=_LineWriterFactory(out, lock),
        wrapper_class=wrapper_class,
        context_class=dict,
        # Not cached so that a second configure_logging() call takes effect everywhere.
        cache_logger_on_first_use=False,
    )

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
    logging.getLogger("grpc._cython.cygrpc").addFilter(_PEER_GONE)  # once: same object


def get_logger(name: str | None = None, **initial: Any) -> HiveLogger:
    """A structlog logger named ``name`` (``logger`` key) with ``initial`` fields bound.

    Without a name the ``logger`` key is ``root``, as for the stdlib root logger.
    """
    logger: HiveLogger = structlog.get_logger(name, **initial)
    return logger


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


# A client's request id goes into every log line of its request: only a sane token.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(candidate: str | None) -> str:
    """The request id a client sent (header or metadata), if it is a sane token (at most
    128 of ``A-Za-z0-9._:-``), else a fresh one."""
    if candidate is not None and _REQUEST_ID.fullmatch(candidate):
        return candidate
    return new_request_id()


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


__all__ = [
    "REQUEST_CONTEXT_KEYS",
    "HiveLogger",
    "bind_request_context",
    "clear_request_context",
    "configure_logging",
    "get_logger",
    "log_round_failure",
    "new_request_id",
    "request_id_from",
]
