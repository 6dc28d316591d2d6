"""Retry policies for the edges of the system (tenacity, asyncio).

Two uses only (CONVENTIONS.md): retrying *idempotent* client calls that failed with
UNAVAILABLE / DEADLINE_EXCEEDED, and waiting for a dependency at start-up. Both always
have an overall deadline and use exponential backoff with full jitter, so replicas that
lost the same dependency do not retry in lock step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from hive_common.errors import DeadlineExceeded, HiveError, Unavailable, describe_error
from hive_common.logging import get_logger

RETRYABLE_STATUS_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
"""Raw gRPC codes worth retrying for an idempotent call."""

_log = get_logger(__name__)


def is_retryable(exc: BaseException) -> bool:
    """True for errors that say "try again later" and nothing else.

    ``Unavailable`` / ``DeadlineExceeded`` (including CANCELLED, which
    :func:`hive_common.grpc_errors.from_rpc_error` maps to ``Unavailable``) and raw
    ``grpc.RpcError`` with code UNAVAILABLE or DEADLINE_EXCEEDED. Every other
    ``HiveError`` (INVALID_ARGUMENT, NOT_FOUND, ABORTED, FAILED_PRECONDITION ...) is a
    definite answer that retrying would not change.
    """
    if isinstance(exc, HiveError):
        return isinstance(exc, Unavailable | DeadlineExceeded)
    if isinstance(exc, grpc.RpcError):
        code_fn = getattr(exc, "code", None)
        return callable(code_fn) and code_fn() in RETRYABLE_STATUS_CODES
    return False


def _log_retry(call: str | None, retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    sleep = retry_state.next_action.sleep if retry_state.next_action is not None else None
    _log.info(
        "retrying call",
        call=call or getattr(retry_state.fn, "__qualname__", repr(retry_state.fn)),
        attempt=retry_state.attempt_number,
        error=repr(error),
        sleep_seconds=sleep,
    )


def retry_policy(
    *,
    deadline_seconds: float = 10.0,
    initial_wait: float = 0.1,
    max_wait: float = 2.0,
    max_attempts: int | None = None,
    retry_on: Callable[[BaseException], bool] = is_retryable,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    call: str | None = None,
) -> AsyncRetrying:
    """A policy for idempotent async calls; its "retrying call" log lines name ``call``
    (e.g. the RPC), else the function retried.

    Waits are drawn uniformly from ``[0, min(max_wait, initial_wait * 2**(n-1))]`` (full
    jitter). No attempt starts once the next wait would cross ``deadline_seconds`` from
    the first attempt, and at most ``max_attempts`` attempts run when given. When it
    gives up, the last error is re-raised unchanged (not a ``tenacity.RetryError``).
    ``sleep`` is replaceable for tests. Run it as ``await policy(fn, *args)``, one policy
    per call: tenacity keeps a run's state in the policy object (a thread-local that every
    coroutine of the event loop shares).
    """
    if deadline_seconds <= 0:
        raise ValueError("deadline_seconds must be positive")
    if initial_wait <= 0 or max_wait < initial_wait:
        raise ValueError("need 0 < initial_wait <= max_wait")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    stop: stop_base = stop_before_delay(deadline_seconds)
    if max_attempts is not None:
        stop = stop | stop_after_attempt(max_attempts)
    return AsyncRetrying(
        retry=retry_if_exception(retry_on),
        wait=wait_random_exponential(multiplier=initial_wait, max=max_wait),
        stop=stop,
        sleep=sleep,
        before_sleep=functools.partial(_log_retry, call),
        reraise=True,
    )


async def wait_for_dependency(
    check: Callable[[], Awaitable[Any]],
    *,
    name: str,
    deadline_seconds: float,
    initial_wait: float = 0.2,
    max_wait: float = 5.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    fatal: Callable[[Exception], bool] = lambda exc: False,
) -> None:
    """Block start-up until ``check()`` succeeds, logging every failed attempt.

    ``check`` succeeds when it returns anything but ``False`` without raising; any
    exception counts as "not yet" (a database that is still starting raises driver
    errors of every kind), except one ``fatal`` says trying again cannot help: that one is
    raised at once. After ``deadline_seconds`` it raises
    :class:`~hive_common.errors.Unavailable` naming the dependency and the last error,
    chained to it.
    """
    log = _log.bind(dependency=name)
    attempts = 0
    last_error: BaseException | None = None

    async def attempt() -> None:
        nonlocal attempts, last_error
        attempts += 1
        try:
            result = await check()
        except Exception as exc:
            last_error = exc
            if not fatal(exc):  # a fatal one is the caller's to report, once
                log.warning("dependency not ready", attempt=attempts, error=describe_error(exc))
            raise
        if result is False:
            last_error = None
            log.warning("dependency not ready", attempt=attempts, error="check returned False")
            raise _NotReady(name)
        log.info("dependency ready", attempt=attempts)

    policy = AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and not fatal(exc)),
        wait=wait_random_exponential(multiplier=initial_wait, max=max_wait),
        stop=stop_before_delay(deadline_seconds),
        sleep=sleep,
        reraise=True,
    )
    try:
        await policy(attempt)
    except Exception as exc:
        if fatal(exc):
            raise
        why = f": {describe_error(last_error)}" if last_error is not None else ""
        raise Unavailable(
            f"{name} not available after {deadline_seconds:g}s ({attempts} attempts){why}",
            details={"dependency": name, "attempts": attempts},
        ) from (last_error or exc)


class _NotReady(Exception):
    """Internal marker: the check answered, but "not ready"."""


__all__ = [
    "RETRYABLE_STATUS_CODES",
    "is_retryable",
    "retry_policy",
    "wait_for_dependency",
]
