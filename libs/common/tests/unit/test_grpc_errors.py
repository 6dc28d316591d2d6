"""HiveError <-> gRPC status translation, both directions, without a network."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from hive_common.errors import (
    ERRORS_BY_CODE,
    Aborted,
    FieldViolation,
    HiveError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    not_shown,
)
from hive_common.grpc_errors import (
    ERROR_DOMAIN,
    MAX_STATUS_BYTES,
    STATUS_DETAILS_KEY,
    abort,
    from_rpc_error,
    to_status,
    to_status_proto,
)


class FakeRpcError(grpc.RpcError):
    """Shape of a failed grpc call as the client sees it (code/details/trailers)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
        return self._trailing


def _as_rpc_error(status: grpc.Status) -> FakeRpcError:
    return FakeRpcError(status.code, status.details, tuple(status.trailing_metadata))


def _rich(status: grpc.Status) -> Any:
    (key, value), *_ = status.trailing_metadata
    assert key == STATUS_DETAILS_KEY
    return status_pb2.Status.FromString(value)


def test_to_status_carries_code_message_and_bad_request() -> None:
    error = InvalidArgument(
        "plan is invalid",
        violations=[
            FieldViolation("tasks[0].task_id", "must not be empty"),
            FieldViolation("tasks[1].depends_on[0]", "unknown task 'x'"),
        ],
    )
    status = to_status(error)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "plan is invalid"
    rich = _rich(status)
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rich.message == "plan is invalid"
    assert len(rich.details) == 1  # no ErrorInfo without details
    bad_request = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("tasks[0].task_id", "must not be empty"),
        ("tasks[1].depends_on[0]", "unknown task 'x'"),
    ]


def test_to_status_puts_details_in_error_info_as_strings() -> None:
    status = to_status(Aborted("version conflict", details={"current_version": 7, "id": "t-1"}))
    assert status.code is grpc.StatusCode.ABORTED
    rich = _rich(status)
    assert len(rich.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "ABORTED"
    assert info.domain == ERROR_DOMAIN
    assert dict(info.metadata) == {"current_version": "7", "id": "t-1"}


def test_to_status_plain_error_has_no_details() -> None:
    status = to_status(NotFound("ticket t-1 not found"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert list(_rich(status).details) == []


@pytest.mark.parametrize("cls", [ERRORS_BY_CODE[k] for k in sorted(ERRORS_BY_CODE)])
def test_every_error_class_round_trips(cls: type[HiveError]) -> None:
    original = cls(
        "boom",
        violations=[FieldViolation("a.b", "bad")],
        details={"n": 1, "s": "x", "nested": {"k": [1, 2]}},
    )
    decoded = from_rpc_error(_as_rpc_error(to_status(original)))
    assert type(decoded) is cls
    assert decoded.message == "boom"
    assert decoded.violations == [FieldViolation("a.b", "bad")]
    assert decoded.details == {"n": "1", "s": "x", "nested": '{"k":[1,2]}'}


def test_plain_status_without_trailer_maps_by_code() -> None:
    decoded = from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "no such worker"))
    assert isinstance(decoded, NotFound)
    assert decoded.message == "no such worker"
    assert decoded.violations == []
    assert decoded.details == {}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.CANCELLED, Unavailable),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument),
        (grpc.StatusCode.UNKNOWN, Internal),
        (grpc.StatusCode.UNIMPLEMENTED, Internal),
        (grpc.StatusCode.DATA_LOSS, Internal),
    ],
)
def test_codes_without_a_class_keep_their_name(
    code: grpc.StatusCode, expected: type[HiveError]
) -> None:
    decoded = from_rpc_error(FakeRpcError(code, "x"))
    assert type(decoded) is expected
    assert decoded.details == {"grpc_code": code.name}


def test_garbage_trailer_is_ignored() -> None:
    decoded = from_rpc_error(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down", ((STATUS_DETAILS_KEY, b"\xff\xff\xff"),))
    )
    assert isinstance(decoded, Unavailable)
    assert decoded.message == "down"


def test_rich_status_with_mismatched_code_is_not_trusted() -> None:
    forged = to_status(InvalidArgument("bad", violations=[FieldViolation("f", "d")]))
    decoded = from_rpc_error(
        FakeRpcError(grpc.StatusCode.INTERNAL, "crash", tuple(forged.trailing_metadata))
    )
    assert isinstance(decoded, Internal)
    assert decoded.message == "crash"
    assert decoded.violations == []


def test_error_without_call_shape_is_internal() -> None:
    decoded = from_rpc_error(grpc.RpcError("opaque"))
    assert isinstance(decoded, Internal)
    assert decoded.message == "opaque"
    assert decoded.details == {"grpc_code": "UNKNOWN"}


class RecordingContext:
    """Stands in for grpc.aio.ServicerContext: abort_with_status raises like the real one."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise RuntimeError("aborted")


async def test_abort_sends_the_status_and_unwinds() -> None:
    context = RecordingContext()
    with pytest.raises(RuntimeError, match="aborted"):
        await abort(context, InvalidArgument("bad", violations=[FieldViolation("f", "d")]))  # type: ignore[arg-type]
    assert context.status is not None
    assert context.status.code is grpc.StatusCode.INVALID_ARGUMENT
    decoded = from_rpc_error(_as_rpc_error(context.status))
    assert decoded.violations == [FieldViolation("f", "d")]


def test_the_status_stays_within_its_budget_cutting_long_texts_and_counting_the_rest() -> None:
    error = InvalidArgument(
        "bad " * 200,
        violations=[FieldViolation("f" * 1000, "d" * 1000)]
        + [FieldViolation(f"tasks[{i}]", "unknown") for i in range(3000)],
        details={"plan_id": "p" * 1000},
    )
    status = to_status_proto(error)
    assert status.ByteSize() <= MAX_STATUS_BYTES
    decoded = from_rpc_error(_as_rpc_error(to_status(error)))
    first, *middle, last = decoded.violations
    assert first == FieldViolation("f" * 255 + "\u2026", "d" * 255 + "\u2026")
    assert [v.field for v in middle] == [f"tasks[{i}]" for i in range(len(middle))]
    assert last == FieldViolation("request", f"{3000 - len(middle)} more violations not shown")
    assert decoded.details == {"plan_id": "p" * 255 + "\u2026"}
    assert decoded.message.endswith("\u2026")


def test_a_summary_entry_cut_off_counts_the_violations_it_stood_for() -> None:
    shown_by_the_service = [FieldViolation(f"tasks[{i}]", "unknown") for i in range(2000)]
    error = InvalidArgument("bad", violations=[*shown_by_the_service, not_shown(4000)])
    decoded = from_rpc_error(_as_rpc_error(to_status(error)))
    *middle, last = decoded.violations
    assert last == FieldViolation("request", f"{6000 - len(middle)} more violations not shown")


def test_a_status_within_its_budget_is_sent_whole() -> None:
    violations = [FieldViolation(f"tasks[{i}].task_id", "must not be empty") for i in range(20)]
    decoded = from_rpc_error(
        _as_rpc_error(to_status(InvalidArgument("bad", violations=violations)))
    )
    assert decoded.violations == violations
