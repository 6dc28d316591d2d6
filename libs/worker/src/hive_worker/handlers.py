"""What a task handler is, what it gets, how it fails, and where handlers are kept.

A handler is an async function ``(params, ctx) -> dict``: ``params`` is the ticket's
``parameters`` object, ``ctx`` a :class:`TaskContext`; the returned JSON object becomes
the ticket's ``result``. Raising :class:`TaskError` reports a failure with its message
(``permanent=True`` when retrying cannot help); any other exception is a retryable
failure; running past the ticket's timeout is a retryable failure too.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hive_common.logging import get_logger

TaskHandler = Callable[[dict[str, Any], "TaskContext"], Awaitable[Mapping[str, Any]]]
"""``async def handler(params: dict, ctx: TaskContext) -> dict``."""

_TASK_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler knows about the ticket it runs."""

    ticket_id: str
    plan_id: str
    task_id: str
    task_type: str
    attempt: int
    max_retries: int
    timeout_seconds: float
    worker_id: str
    description: str = ""
    logger: Any = field(default_factory=lambda: get_logger("hive_worker.task"))
    lost_runs: int = 0
    """Earlier attempts that ended with their worker (drained, lost), not with the task:
    they used no retry."""

    @property
    def last_attempt(self) -> bool:
        """True when a retryable failure would not be retried (the ticket service's rule:
        attempts that used a retry, ``attempt - lost_runs``, beyond ``max_retries``)."""
        return self.attempt - self.lost_runs > self.max_retries


class TaskError(Exception):
    """A task failure to report; ``permanent`` failures are not retried.

    ``result`` (a JSON object) is stored with the failure, e.g. a command's output.
    """

    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        permanent: bool | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if permanent is not None:
            self.permanent = permanent
        self.result: dict[str, Any] | None = dict(result) if result is not None else None


class PermanentTaskError(TaskError):
    """A failure that retrying cannot fix."""

    permanent = True


class InvalidParameters(PermanentTaskError):
    """The ticket's parameters are unusable; ``field`` names the offending one."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"parameters.{field_name}: {problem}")
        self.field = field_name


def _is_async(handler: object) -> bool:
    """True for an ``async def`` function (also through ``functools.partial``) or an
    object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__
    )


class TaskRegistry:
    """Task type -> handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, TaskHandler] = {}

    def register(self, task_type: str, handler: TaskHandler, *, replace: bool = False) -> None:
        """Add ``handler`` for ``task_type``; ``ValueError`` for a bad or taken name,
        ``TypeError`` for a handler that is not ``async def``."""
        if not _TASK_TYPE.fullmatch(task_type):
            raise ValueError(
                f"task type {task_type!r} must be 1-128 characters of letters, digits "
                "and _ . : / - (starting with a letter or digit)"
            )
        if not _is_async(handler):
            # A plain function would only fail once a ticket runs it.
            raise TypeError(
                f"handler for {task_type!r} must be an async def function (or an object "
                f"whose __call__ is async def), not {handler!r}"
            )
        if task_type in self._handlers and not replace:
            raise ValueError(f"task type {task_type!r} already has a handler")
        self._handlers[task_type] = handler

    def get(self, task_type: str) -> TaskHandler | None:
        """The handler of ``task_type``, or ``None``."""
        return self._handlers.get(task_type)

    def task_types(self) -> list[str]:
        """Registered task types, sorted."""
        return sorted(self._handlers)

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._handlers


__all__ = [
    "InvalidParameters",
    "PermanentTaskError",
    "TaskContext",
    "TaskError",
    "TaskHandler",
    "TaskRegistry",
]
