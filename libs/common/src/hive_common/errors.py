"""The one error hierarchy of Hive Flow C.

Domain and storage code raise these; a single gRPC interceptor and a single HTTP
exception handler map them to status codes (DESIGN.md section 3). Clients translate
``grpc.aio.AioRpcError`` back into the same classes, so callers never see raw gRPC errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem with one input field; ``field`` is a JSON path or proto field path.

    ``omitted``: this entry stands for that many violations left out of a long list
    (:func:`not_shown`), so a transport that has to cut the list further counts them
    right.
    """

    field: str
    description: str
    omitted: int = 0


def not_shown(count: int, *, field: str = "request", what: str = "violations") -> FieldViolation:
    """The last entry of a list cut short: ``count`` more were left out."""
    return FieldViolation(field=field, description=f"{count} more {what} not shown", omitted=count)


class HiveError(Exception):
    """Base of every error that crosses a service boundary.

    ``grpc_code`` is the name of a ``grpc.StatusCode`` member (kept as a string so this
    module imports no transport library); ``http_status`` is the HTTP mirror.
    """

    grpc_code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations: list[FieldViolation] = list(violations or [])
        self.details: dict[str, Any] = dict(details or {})

    @property
    def code(self) -> str:
        """The stable, machine-readable code (``INVALID_ARGUMENT``, ``NOT_FOUND`` ...)."""
        return self.grpc_code

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body ``{"error": {"code", "message", "details"}}`` of the HTTP APIs."""
        details: dict[str, Any] = dict(self.details)
        if self.violations:
            details["field_violations"] = [
                {"field": v.field, "description": v.description} for v in self.violations
            ]
        return {"error": {"code": self.code, "message": self.message, "details": details}}

    def violations_text(self) -> str:
        """The field violations on one line (``field: description; ...``), for places
        that carry only text (a batch item's message, a log line)."""
        return "; ".join(f"{v.field}: {v.description}" for v in self.violations)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(HiveError):
    """Bad input; ``violations`` name every offending field."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(HiveError):
    grpc_code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(HiveError):
    """Only where idempotency cannot apply (same key, different content)."""

    grpc_code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(HiveError):
    """Illegal transition, terminal ticket, stale attempt."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 412


class Aborted(HiveError):
    """Optimistic-concurrency conflict (``expected_version`` mismatch)."""

    grpc_code = "ABORTED"
    http_status = 409


class Unauthenticated(HiveError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(HiveError):
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class ResourceExhausted(HiveError):
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unavailable(HiveError):
    """A dependency is down; the caller may retry."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    retryable = True


class DeadlineExceeded(HiveError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    retryable = True


class Internal(HiveError):
    grpc_code = "INTERNAL"
    http_status = 500


class UndecodableResponse(Internal):
    """A client could not decode a response (or a stream message), e.g. one nested deeper
    than protobuf's decoding limit. Not transient: the same call would get the same
    bytes; a stream that resumes from the same position meets the same message again."""


ERRORS_BY_CODE: dict[str, type[HiveError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


WORKER_NAME_IN_USE = "WORKER_NAME_IN_USE"
"""``details["reason"]`` of the registry's ALREADY_EXISTS for a worker name another live
process holds (the registry raises it, the worker recognises it)."""


def describe_error(exc: BaseException) -> str:
    """``exc`` for a log line: type, message and every field violation it carries.

    ``repr`` of a :class:`HiveError` is only its message; a refusal such as Register's
    INVALID_ARGUMENT says which setting is wrong only in its violations.
    """
    if not isinstance(exc, HiveError):
        said = str(exc)  # none (e.g. CancelledError()): the type alone, no "Type: "
        return f"{type(exc).__name__}: {said}" if said else type(exc).__name__
    text = f"{type(exc).__name__}: {exc.message}"
    if exc.violations:
        text += f" ({exc.violations_text()})"
    return text
