"""Translation between :class:`hive_common.errors.HiveError` and gRPC statuses.

Server side, :func:`abort` ends an RPC with the error's code, its message and the
standard rich-status details (``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer): a ``google.rpc.BadRequest`` carrying every field violation, and a
``google.rpc.ErrorInfo`` carrying ``error.details`` when there are any.

Client side, :func:`from_rpc_error` turns an ``AioRpcError`` back into the matching
``HiveError`` subclass, decoding the same details, so callers never see raw gRPC errors.

Mapping decisions for codes that have no class of their own:

* ``CANCELLED`` -> :class:`Unavailable`. A caller's own cancellation surfaces as
  ``asyncio.CancelledError`` in ``grpc.aio``, never as an ``AioRpcError``; a CANCELLED
  status therefore comes from the other side (typically a server stopping after its
  grace period, or a proxy dropping the stream), which is transient and retryable.
* ``OUT_OF_RANGE`` -> :class:`InvalidArgument` (it is bad input about a range).
* ``UNKNOWN``, ``UNIMPLEMENTED``, ``DATA_LOSS`` and anything else -> :class:`Internal`.

Whenever the mapping is not one-to-one, the original code name is kept in
``details["grpc_code"]``.

``ErrorInfo.metadata`` is a ``map<string, string>``: string values travel unchanged,
other values as compact JSON. Decoded details are therefore always ``dict[str, str]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from hive_common.errors import (
    ERRORS_BY_CODE,
    FieldViolation,
    HiveError,
    Internal,
    InvalidArgument,
    Unavailable,
    not_shown,
)

ERROR_DOMAIN = "neuralhive"
"""``ErrorInfo.domain`` of every error raised by a Hive Flow C service."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing-metadata key that carries the serialized ``google.rpc.Status``."""

_FALLBACK_CLASSES: dict[str, type[HiveError]] = {
    "CANCELLED": Unavailable,
    "OUT_OF_RANGE": InvalidArgument,
}


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # e.g. circular structures
        return str(value)


MAX_STATUS_BYTES = 3000
"""Budget of the serialized ``google.rpc.Status``. It travels base64-encoded in a trailer
beside the message, and gRPC clients refuse trailers beyond 8 KiB at random and beyond
16 KiB always (as RESOURCE_EXHAUSTED, with no details at all): violations past the budget
are counted in a last one, not sent."""
MAX_MESSAGE_CHARS = 256
"""The status message is cut to this (it travels twice: percent-encoded and in the Status)."""
_MAX_TEXT_CHARS = 256
"""One violation's field or description, or one ErrorInfo value, is cut to this."""
_ROOM_FOR_THE_COUNT = 64


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _bounded_violations(
    violations: Sequence[FieldViolation], room: int
) -> list[error_details_pb2.BadRequest.FieldViolation]:
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    for v in violations:
        item = error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, _MAX_TEXT_CHARS),
            description=_clip(v.description, _MAX_TEXT_CHARS),
        )
        room -= item.ByteSize() + 4  # the tag and length around it
        if room < _ROOM_FOR_THE_COUNT:
            break
        kept.append(item)
    left = sum(v.omitted or 1 for v in violations[len(kept) :])
    if left:
        summary = not_shown(left)
        kept.append(
            error_details_pb2.BadRequest.FieldViolation(
                field=summary.field, description=summary.description
            )
        )
    return kept


def to_status_proto(error: HiveError) -> Any:
    """Build the ``google.rpc.Status`` message describing ``error``, within
    :data:`MAX_STATUS_BYTES` (message, violations and detail values cut or counted)."""
    code = grpc.StatusCode[error.grpc_code]
    status = status_pb2.Status(code=code.value[0], message=_clip(error.message, MAX_MESSAGE_CHARS))
    info = None
    if error.details:
        info = error_details_pb2.ErrorInfo(
            reason=error.code,
            domain=ERROR_DOMAIN,
            metadata={
                _clip(str(k), _MAX_TEXT_CHARS): _clip(_stringify(v), _MAX_TEXT_CHARS)
                for k, v in error.details.items()
            },
        )
    if error.violations:
        room = MAX_STATUS_BYTES - status.ByteSize() - (info.ByteSize() + 64 if info else 0)
        bad_request = error_details_pb2.BadRequest(
            field_violations=_bounded_violations(error.violations, room)
        )
        status.details.add().Pack(bad_request)
    if info is not None:
        status.details.add().Pack(info)
    return status


def to_status(error: HiveError) -> grpc.Status:
    """The ``grpc.Status`` (code, message, rich-details trailer) for ``error``."""
    status: grpc.Status = rpc_status.to_status(to_status_proto(error))
    return status


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: HiveError) -> NoReturn:
    """End the current RPC with ``error``; never returns (gRPC raises to unwind the handler)."""
    await context.abort_with_status(to_status(error))
    # abort_with_status always raises; this guards against a context that does not.
    raise AssertionError("context.abort_with_status returned")  # pragma: no cover


def _status_code(exc: grpc.RpcError) -> grpc.StatusCode:
    code_fn = getattr(exc, "code", None)
    if callable(code_fn):
        code = code_fn()
        if isinstance(code, grpc.StatusCode):
            return code
    return grpc.StatusCode.UNKNOWN


def _status_message(exc: grpc.RpcError) -> str:
    details_fn = getattr(exc, "details", None)
    if callable(details_fn):
        details = details_fn()
        if isinstance(details, str) and details:
            return details
    return str(exc) or "remote call failed"


def _trailing_metadata(exc: grpc.RpcError) -> Iterable[tuple[str, str | bytes]]:
    trailing_fn = getattr(exc, "trailing_metadata", None)
    if not callable(trailing_fn):
        return ()
    metadata = trailing_fn()
    if metadata is None:
        return ()
    items: Iterable[tuple[str, str | bytes]] = metadata
    return items


def rich_status_of(exc: grpc.RpcError) -> Any | None:
    """The ``google.rpc.Status`` carried by ``exc``'s trailers, or ``None``.

    A trailer that does not parse is ignored: a broken detail must not hide the code.
    """
    for key, value in _trailing_metadata(exc):
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # protobuf DecodeError; the plain code still applies
                return None
    return None


def _decode_details(
    status: Any,
) -> tuple[list[FieldViolation], dict[str, Any]]:
    violations: list[FieldViolation] = []
    details: dict[str, Any] = {}
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            violations.extend(
                FieldViolation(field=v.field, description=v.description)
                for v in bad_request.field_violations
            )
        elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            details.update(dict(info.metadata))
    return violations, details


def error_class_for(code: grpc.StatusCode) -> type[HiveError]:
    """The ``HiveError`` subclass a client raises for a gRPC status ``code``."""
    return ERRORS_BY_CODE.get(code.name) or _FALLBACK_CLASSES.get(code.name) or Internal


def from_rpc_error(exc: grpc.RpcError) -> HiveError:
    """Translate a failed call (``grpc.aio.AioRpcError`` or sync ``grpc.RpcError``).

    The class follows the status code (see the module docstring for codes without a
    class of their own); violations and details come from the rich-status trailer.
    """
    code = _status_code(exc)
    message = _status_message(exc)
    violations: list[FieldViolation] = []
    details: dict[str, Any] = {}
    status = rich_status_of(exc)
    # Only trust the rich status when it agrees with the transport status code.
    if status is not None and status.code == code.value[0]:
        violations, details = _decode_details(status)
        if status.message:
            message = status.message
    cls = error_class_for(code)
    if cls.grpc_code != code.name:
        details.setdefault("grpc_code", code.name)
    return cls(message, violations=violations, details=details)


__all__ = [
    "ERROR_DOMAIN",
    "STATUS_DETAILS_KEY",
    "abort",
    "error_class_for",
    "from_rpc_error",
    "rich_status_of",
    "to_status",
    "to_status_proto",
]
