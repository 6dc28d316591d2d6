"""Retry policy: what is retried, how long, with what waits. No real sleeping except the
deadline test, which asserts on attempt counts only."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hive_common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HiveError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from hive_common.retry import is_retryable, retry_policy, wait_for_dependency


class CodedRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class RecordingSleep:
    """Records requested waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class Flaky:
    """Fails with the given errors in order, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return value


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("down"),
        DeadlineExceeded("slow"),
        CodedRpcError(grpc.StatusCode.UNAVAILABLE),
        CodedRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
    ids=repr,
)
async def test_retries_transient_errors_then_succeeds(error: BaseException) -> None:
    sleep = RecordingSleep()
    fn = Flaky(error, error)
    policy = retry_policy(deadline_seconds=60, initial_wait=0.1, max_wait=1.0, sleep=sleep)
    assert await policy(fn, "value") == "value"
    assert fn.calls == 3
    assert len(sleep.waits) == 2


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad"),
        NotFound("gone"),
        Aborted("conflict"),
        FailedPrecondition("terminal"),
        AlreadyExists("dup"),
        Unauthenticated("who"),
        PermissionDenied("no"),
        Internal("bug"),
        CodedRpcError(grpc.StatusCode.INVALID_ARGUMENT),
        CodedRpcError(grpc.StatusCode.NOT_FOUND),
        CodedRpcError(grpc.StatusCode.ABORTED),
        CodedRpcError(grpc.StatusCode.CANCELLED),
        ValueError("programming error"),
    ],
    ids=repr,
)
async def test_never_retries_definite_answers(error: BaseException) -> None:
    sleep = RecordingSleep()
    fn = Flaky(error)
    with pytest.raises(type(error)) as raised:
        await retry_policy(deadline_seconds=60, initial_wait=0.1, max_wait=1.0, sleep=sleep)(fn)
    assert raised.value is error
    assert fn.calls == 1
    assert sleep.waits == []


async def test_max_attempts_gives_up_with_the_last_error() -> None:
    sleep = RecordingSleep()
    errors = [Unavailable(f"down {i}") for i in range(10)]
    fn = Flaky(*errors)
    policy = retry_policy(
        deadline_seconds=60, initial_wait=0.1, max_wait=1.0, max_attempts=4, sleep=sleep
    )
    with pytest.raises(Unavailable) as raised:
        await policy(fn)
    assert fn.calls == 4
    assert raised.value is errors[3]
    assert len(sleep.waits) == 3


async def test_gives_up_at_the_deadline() -> None:
    # Real (tiny) sleeps so the deadline clock advances; assert on attempts, not time.
    fn = Flaky(*[Unavailable("down") for _ in range(10_000)])
    policy = retry_policy(deadline_seconds=0.2, initial_wait=0.005, max_wait=0.02)
    with pytest.raises(Unavailable):
        await policy(fn)
    assert 2 <= fn.calls < 10_000


async def test_wait_that_would_cross_the_deadline_is_not_taken() -> None:
    # The deadline has passed once the first attempt fails, so no wait is taken at all.
    sleep = RecordingSleep()
    fn = Flaky(Unavailable("down"), Unavailable("down"))
    policy = retry_policy(deadline_seconds=1e-9, initial_wait=1.0, max_wait=1.0, sleep=sleep)
    with pytest.raises(Unavailable):
        await policy(fn)
    assert fn.calls == 1
    assert sleep.waits == []


async def test_waits_are_jittered_capped_and_growing_windows() -> None:
    sleep = RecordingSleep()
    fn = Flaky(*[Unavailable("down") for _ in range(40)])
    policy = retry_policy(
        deadline_seconds=1e6, initial_wait=0.1, max_wait=0.4, max_attempts=41, sleep=sleep
    )
    assert await policy(fn) == "ok"
    assert len(sleep.waits) == 40
    assert len(set(sleep.waits)) > 1  # jitter: not a fixed schedule
    assert all(0 <= w <= 0.4 for w in sleep.waits)  # cap per wait
    assert sleep.waits[0] <= 0.1  # first window is initial_wait
    assert max(sleep.waits[2:]) > 0.1  # windows grow beyond the first one


def test_is_retryable_on_plain_exceptions() -> None:
    assert not is_retryable(asyncio.CancelledError())
    assert not is_retryable(grpc.RpcError())
    assert is_retryable(Unavailable("x"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deadline_seconds": 0},
        {"initial_wait": 0},
        {"initial_wait": 2.0, "max_wait": 1.0},
        {"max_attempts": 0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        retry_policy(**kwargs)  # type: ignore[arg-type]


async def test_wait_for_dependency_retries_until_ready() -> None:
    sleep = RecordingSleep()
    outcomes: list[bool | Exception] = [ConnectionRefusedError("refused"), False, True]
    calls = 0

    async def check() -> bool:
        nonlocal calls
        calls += 1
        outcome = outcomes[calls - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    await wait_for_dependency(check, name="postgres", deadline_seconds=60, sleep=sleep)
    assert calls == 3
    assert len(sleep.waits) == 2


async def test_wait_for_dependency_raises_unavailable_at_the_deadline() -> None:
    calls = 0

    async def check() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("refused")

    with pytest.raises(Unavailable) as raised:
        await wait_for_dependency(
            check, name="mongo", deadline_seconds=0.1, initial_wait=0.005, max_wait=0.01
        )
    error: HiveError = raised.value
    assert "mongo" in error.message
    assert error.message.endswith(": ConnectionRefusedError: refused")  # why, not only that
    assert error.details == {"dependency": "mongo", "attempts": calls}
    assert calls >= 2
    assert isinstance(error.__cause__, ConnectionRefusedError)


async def test_wait_for_dependency_raises_a_fatal_error_at_once() -> None:
    # A migration that fails the same way every time was retried for the whole start-up
    # timeout, each attempt logged as the database not being ready.
    sleep = RecordingSleep()
    calls = 0

    async def check() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad migration") if calls > 1 else ConnectionRefusedError("refused")

    with pytest.raises(ValueError, match="bad migration"):
        await wait_for_dependency(
            check,
            name="postgresql",
            deadline_seconds=60,
            sleep=sleep,
            fatal=lambda exc: isinstance(exc, ValueError),
        )
    assert (calls, len(sleep.waits)) == (2, 1)
