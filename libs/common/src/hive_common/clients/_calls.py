"""Machinery shared by the typed clients: unary calls under a retry policy with an
overall deadline, and server streams that reconnect after transient failures.

A response the client cannot decode (e.g. nested deeper than protobuf's limit of 100
levels) is raised as :class:`~hive_common.errors.UndecodableResponse` (INTERNAL, not
retried), from a unary call and from a stream's iteration alike. grpc itself only logs
"Exception deserializing message!" (with the decoder's text) and hands over ``None``.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import grpc

from hive_common.errors import DeadlineExceeded, HiveError, UndecodableResponse
from hive_common.grpc_client import TokenProvider, create_channel
from hive_common.logging import get_logger
from hive_common.retry import is_retryable, retry_policy

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ItemT = TypeVar("ItemT")

Metadata = Sequence[tuple[str, str]]
Sleep = Callable[[float], Awaitable[None]]

_log = get_logger("hive_common.clients")


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Deadlines and retries of a client's unary calls.

    ``timeout_seconds`` bounds one attempt; ``deadline_seconds`` bounds the whole call,
    retries included (no attempt outlives it). Retries back off exponentially with full
    jitter between ``initial_backoff_seconds`` and ``max_backoff_seconds``.
    """

    timeout_seconds: float = 10.0
    deadline_seconds: float = 30.0
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.deadline_seconds <= 0:
            raise ValueError("timeout_seconds and deadline_seconds must be positive")
        if not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("need 0 < initial_backoff_seconds <= max_backoff_seconds")


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a watch stream reconnects after a transient failure.

    Waits grow exponentially (full jitter) up to ``max_backoff_seconds`` and start over
    once a connection delivers something. ``give_up_after_seconds`` (``None``: never)
    bounds one outage; after it the last error is raised from the iteration.
    """

    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 5.0
    give_up_after_seconds: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("need 0 < initial_backoff_seconds <= max_backoff_seconds")
        if self.give_up_after_seconds is not None and self.give_up_after_seconds <= 0:
            raise ValueError("give_up_after_seconds must be positive or None")

    def backoff(self, failures: int) -> float:
        """The wait before reconnection number ``failures`` (1-based), with full jitter."""
        exponent = min(max(failures - 1, 0), 30)  # beyond that the cap applies anyway
        ceiling = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2**exponent)
        return random.uniform(0, ceiling)


# Reconnections in a row logged at INFO; the following ones at WARNING.
_QUIET_FAILURES = 3

RECONNECT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
"""Channel options of the clients' own channels: gRPC's default reconnect back-off grows
to 120 s, which would keep a client away from a service long after it came back."""


def _method_name(method: object) -> str:
    # Best effort, for messages only: grpc's multi-callables keep their path privately.
    name = getattr(method, "_method", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name if isinstance(name, str) else "unknown"


def _undecodable_response(method: object, *, stream: str | None = None) -> UndecodableResponse:
    """The error for a message of ``method`` that grpc could not decode (it gave ``None``)."""
    name = _method_name(method)
    what = "a message of the stream" if stream else "the response of"
    details = {"method": name}
    if stream:
        details["stream"] = stream
    return UndecodableResponse(
        f"{what} {name} could not be decoded (see grpc's 'Exception deserializing "
        "message!' log line for why, e.g. nested deeper than protobuf's limit)",
        details=details,
    )


def bearer_metadata(token: str | None) -> Metadata | None:
    """``authorization: Bearer <token>`` metadata overriding the channel's token provider."""
    return (("authorization", f"Bearer {token}"),) if token else None


class UnaryInvoker:
    """Runs unary calls under a :class:`CallPolicy`."""

    def __init__(self, *, policy: CallPolicy, sleep: Sleep = asyncio.sleep) -> None:
        self.policy = policy
        self._sleep = sleep

    async def __call__(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        idempotent: bool,
        metadata: Metadata | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> ResponseT:
        """Call ``method``; retry transient failures when ``idempotent``.

        ``attempt_timeout`` / ``deadline`` override the policy's per-attempt and overall
        bounds.
        Errors arrive as :class:`~hive_common.errors.HiveError` (the channel translates);
        a response that cannot be decoded as :class:`~hive_common.errors.UndecodableResponse`.
        """
        loop = asyncio.get_running_loop()
        per_attempt = self.policy.timeout_seconds if attempt_timeout is None else attempt_timeout
        overall = deadline if deadline is not None else self.policy.deadline_seconds
        ends_at = loop.time() + overall

        async def attempt() -> ResponseT:
            remaining = ends_at - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"no time left within the call's {overall:g}s deadline",
                    details={"deadline_seconds": overall},
                )
            response: ResponseT | None = await method(
                request, timeout=min(per_attempt, remaining), metadata=metadata
            )
            if response is None:  # grpc's answer to bytes it could not decode
                raise _undecodable_response(method)
            return response

        if not idempotent:
            return await attempt()
        # The first attempt runs outside tenacity: most calls succeed at once, and setting
        # up a tenacity run costs more CPU than a small RPC's own client side.
        try:
            return await attempt()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            first_failure: BaseException | None = exc

        async def retry() -> ResponseT:
            # Tenacity's first "attempt" reports the failure already seen, so its first
            # back-off comes before the second real attempt, as if it had run the first.
            nonlocal first_failure
            if first_failure is not None:
                failure, first_failure = first_failure, None
                raise failure
            return await attempt()

        policy = retry_policy(
            deadline_seconds=max(ends_at - loop.time(), 1e-3),
            initial_wait=self.policy.initial_backoff_seconds,
            max_wait=self.policy.max_backoff_seconds,
            sleep=self._sleep,
            call=_method_name(method),
        )
        return await policy(retry)


class ReconnectingStream(Generic[ResponseT, ItemT]):
    """An async iterator over a server stream that reopens it after transient failures.

    Subclasses say which request to (re)open with and what to yield per response (and
    remember their resume position there). UNAVAILABLE, DEADLINE_EXCEEDED and a stream
    the server ends on its own (e.g. at shutdown) cause a reconnect; any other error is
    raised from the iteration, including
    :class:`~hive_common.errors.UndecodableResponse` for a message that cannot be decoded
    (the call is dropped; iterating again reopens the stream from the same position, where
    the same message may wait: the consumer decides). Close with :meth:`aclose` (or
    ``async with``).
    """

    def __init__(
        self,
        *,
        method: grpc.aio.UnaryStreamMultiCallable[Any, ResponseT],
        metadata: Metadata | None,
        reconnect: ReconnectPolicy | None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._method = method
        self._metadata = metadata
        self._reconnect = reconnect
        self._sleep = sleep
        self._call: grpc.aio.UnaryStreamCall[Any, ResponseT] | None = None
        self._iterator: AsyncIterator[ResponseT] | None = None
        # Items of the last message not yet handed out (a message may carry several).
        self._pending: collections.deque[ItemT] = collections.deque()
        self._closed = False
        self._failures = 0
        self._outage_started: float | None = None
        self._live = False
        self.on_live_change: Callable[[], None] | None = None
        """Called when :attr:`live` changes (e.g. to tell someone at once)."""
        self.connections = 0
        """How many times the stream was opened (1 + reconnections)."""

    @property
    def down(self) -> bool:
        """True from a failure until the stream is established again (a message, or a
        subclass's :meth:`_established`): while the server cannot be reached."""
        return self._outage_started is not None

    @property
    def live(self) -> bool:
        """True while the stream delivers: from the server's first answer on it (a
        message, or a subclass's :meth:`_established`) to a failure, a refusal or the
        end. False before, while reconnecting, and after a refusal ended it."""
        return self._live

    def _established(self) -> None:
        """Subclasses: the server answered the (re)opened stream (e.g. its headers)."""
        self._outage_started = None
        self._failures = 0
        self._set_live(True)

    def _set_live(self, live: bool) -> None:
        if live is not self._live:
            self._live = live
            if self.on_live_change is not None:
                self.on_live_change()

    def _request(self) -> Any:
        raise NotImplementedError

    def _accept(self, response: ResponseT) -> Iterable[ItemT]:
        """The items of one message, in order."""
        raise NotImplementedError

    def _delivered(self, item: ItemT) -> None:
        """Hook run as ``item`` is handed to the consumer (e.g. to move a resume cursor)."""

    async def _connected(self, call: grpc.aio.UnaryStreamCall[Any, ResponseT]) -> None:
        """Hook run right after a stream is opened (before its first message)."""

    def __aiter__(self) -> ReconnectingStream[ResponseT, ItemT]:
        return self

    async def __aenter__(self) -> ReconnectingStream[ResponseT, ItemT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __anext__(self) -> ItemT:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._pending:
                item = self._pending.popleft()
                self._delivered(item)
                return item
            try:
                if self._iterator is None:
                    await self._open()
                assert self._iterator is not None
                response = await self._iterator.__anext__()
            except StopAsyncIteration:
                if self._reconnect is None:
                    self._drop()
                    self._closed = True
                    raise
                await self._failed(None)
                continue
            except HiveError as exc:
                if self._reconnect is None or not is_retryable(exc):
                    self._drop()
                    raise
                await self._failed(exc)
                continue
            except asyncio.CancelledError:
                # aclose() from another task cancels the call under a pending read: that
                # reader sees the end of the stream, unless it is itself being cancelled.
                task = asyncio.current_task()
                if self._closed and (task is None or task.cancelling() == 0):
                    raise StopAsyncIteration from None
                raise
            if response is None:  # grpc's answer to a message it could not decode
                self._drop()
                raise _undecodable_response(self._method, stream=type(self).__name__)
            self._established()
            self._pending.extend(self._accept(response))

    async def _open(self) -> None:
        call = self._method(self._request(), metadata=self._metadata)
        self._call = call
        self._iterator = call.__aiter__()
        self.connections += 1
        await self._connected(call)

    def _drop(self) -> None:
        self._set_live(False)
        if self._call is not None and not self._call.done():
            self._call.cancel()
        self._call = None
        self._iterator = None

    async def _failed(self, error: HiveError | None) -> None:
        assert self._reconnect is not None
        self._drop()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._outage_started is None:
            self._outage_started = now
        limit = self._reconnect.give_up_after_seconds
        if limit is not None and now - self._outage_started >= limit:
            self._closed = True
            if error is not None:
                raise error
            raise StopAsyncIteration
        self._failures += 1
        wait = self._reconnect.backoff(self._failures)
        # Loud once it is an outage rather than a blip (a restart of the server).
        log = _log.warning if self._failures > _QUIET_FAILURES else _log.info
        log(
            "watch stream lost; reconnecting",
            stream=type(self).__name__,
            error=repr(error) if error else "stream ended",
            attempt=self._failures,
            sleep_seconds=round(wait, 3),
        )
        await self._sleep(wait)

    async def aclose(self) -> None:
        """Stop the stream (cancels the open call); later iterations end at once."""
        self._closed = True
        self._drop()


__all__ = [
    "RECONNECT_CHANNEL_OPTIONS",
    "CallPolicy",
    "Metadata",
    "ReconnectPolicy",
    "ReconnectingStream",
    "UnaryInvoker",
    "bearer_metadata",
]


class GrpcClient:
    """What every typed client shares: the channel, the unary call policy, the stream
    reconnect policy, and closing the channel it created. Subclasses build their stub."""

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        policy: CallPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        owns_channel: bool = False,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._channel = channel
        self._invoke = UnaryInvoker(policy=policy or CallPolicy(), sleep=sleep)
        self._reconnect = reconnect or ReconnectPolicy()
        self._owns_channel = owns_channel
        self._sleep = sleep

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        token_provider: TokenProvider | None = None,
        policy: CallPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> Self:
        """A client with its own channel to ``target`` (closed by :meth:`close`)."""
        policy = policy or CallPolicy()
        channel = create_channel(
            target,
            token_provider=token_provider,
            default_timeout=policy.timeout_seconds,
            credentials=credentials,
            extra_options=RECONNECT_CHANNEL_OPTIONS,
        )
        return cls(channel=channel, policy=policy, reconnect=reconnect, owns_channel=True)

    @property
    def policy(self) -> CallPolicy:
        """The deadlines and retries of unary calls."""
        return self._invoke.policy

    async def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
