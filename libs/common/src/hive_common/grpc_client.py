"""gRPC client channels for calls between Hive Flow C services.

:func:`create_channel` builds a ``grpc.aio`` channel with keepalive and message-size
options and the client interceptors of this module, which, on every unary-unary and
unary-stream call:

* attach ``authorization: Bearer <token>`` from a token provider (called per call, so
  a refreshed token is picked up) unless the call already carries one;
* attach ``x-request-id``: the caller's own if set, else ``request_id`` bound in the
  structlog contextvars (so one id follows a request across services), else a new one;
* apply a default deadline to unary calls that have none (streams get
  ``stream_timeout``, ``None`` by default, because watch streams are meant to stay open);
* translate ``grpc.aio.AioRpcError`` into :class:`~hive_common.errors.HiveError` via
  :func:`hive_common.grpc_errors.from_rpc_error`: unary calls raise it when awaited,
  streaming calls raise it from the iteration that meets the failure.

Limitations (deliberate): after translation, a unary call's ``trailing_metadata()`` /
``code()`` are no longer those of the wire call, and a streaming call must be consumed
with ``async for`` or ``read()`` on the returned call object. Client-streaming and
bidirectional calls are not intercepted (no contract uses them).

Keepalive: while a call is open, clients ping every ``keepalive_time_ms`` (default 30 s)
even when the stream carries no data, so a dead peer under a long WatchTickets stream is
noticed. gRPC servers by default answer pings more frequent than one per 5 minutes
without data with GOAWAY "too many pings" (the client sees UNAVAILABLE); servers must
therefore be started with :data:`SERVER_KEEPALIVE_OPTIONS`.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog

from hive_common.grpc_errors import from_rpc_error

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

TokenProvider = Callable[[], str | Awaitable[str | None] | None]
"""Returns the bearer token to send (or ``None`` for none); may be sync or async."""

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_KEEPALIVE_TIME_MS = 30_000
DEFAULT_KEEPALIVE_TIMEOUT_MS = 10_000


def server_keepalive_options(
    client_keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
) -> tuple[tuple[str, int], ...]:
    """Server options that accept pings from clients pinging every ``client_keepalive_time_ms``.

    grpcio (checked with 1.85) polices received pings with
    ``grpc.http2.min_ping_interval_without_data_ms``; older cores used the ``_recv_``
    variant, so both are set, to a third of the client's interval.
    """
    floor = max(client_keepalive_time_ms // 3, 1)
    return (
        ("grpc.http2.min_ping_interval_without_data_ms", floor),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", floor),
        ("grpc.keepalive_permit_without_calls", 1),
    )


SERVER_KEEPALIVE_OPTIONS = server_keepalive_options()
"""Pass to the gRPC server so this module's default client keepalive is not refused."""


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS,
) -> list[tuple[str, Any]]:
    """The channel arguments :func:`create_channel` uses."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        # Ping only while calls are open; idle channels go IDLE on their own.
        ("grpc.keepalive_permit_without_calls", 0),
        # 0 = keep pinging an open stream that carries no data (idle watch streams).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.primary_user_agent", "hive-flow-c"),
        # Connections of its own: with grpc's process-wide pool a new channel shares the
        # connection attempts of any other channel to the same address, and fails at once
        # with their stale "connection refused" while they back off.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def current_request_id() -> str:
    """The ``request_id`` bound in structlog contextvars, else a fresh one."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    if isinstance(bound, str) and bound:
        return bound
    return uuid.uuid4().hex


class _CallDecorator:
    """Shared by both interceptors: metadata and deadline for an outgoing call."""

    def __init__(
        self,
        *,
        token_provider: TokenProvider | None,
        default_timeout: float | None,
    ) -> None:
        self._token_provider = token_provider
        self._default_timeout = default_timeout

    async def decorate(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata()
        keys: set[str] = set()
        for key, value in details.metadata or ():
            metadata.add(key, value)
            keys.add(key.lower())
        if REQUEST_ID_KEY not in keys:
            metadata.add(REQUEST_ID_KEY, current_request_id())
        if AUTHORIZATION_KEY not in keys and self._token_provider is not None:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = await token
            if token:
                metadata.add(AUTHORIZATION_KEY, f"Bearer {token}")
        timeout = details.timeout if details.timeout is not None else self._default_timeout
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class HiveUnaryUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Bearer token, request id, default deadline and typed errors for unary calls."""

    def __init__(
        self,
        *,
        token_provider: TokenProvider | None = None,
        default_timeout: float | None = 10.0,
    ) -> None:
        self._decorator = _CallDecorator(
            token_provider=token_provider, default_timeout=default_timeout
        )

    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, RequestT],
            Awaitable[grpc.aio.UnaryUnaryCall[RequestT, ResponseT]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: RequestT,
    ) -> ResponseT | grpc.aio.UnaryUnaryCall[RequestT, ResponseT]:
        details = await self._decorator.decorate(client_call_details)
        try:
            call = await continuation(details, request)
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc


class HiveUnaryStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Bearer token, request id, optional deadline and typed errors for server streams."""

    def __init__(
        self,
        *,
        token_provider: TokenProvider | None = None,
        stream_timeout: float | None = None,
    ) -> None:
        self._decorator = _CallDecorator(
            token_provider=token_provider, default_timeout=stream_timeout
        )

    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, RequestT],
            Awaitable[grpc.aio.UnaryStreamCall[RequestT, ResponseT]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: RequestT,
    ) -> AsyncIterator[ResponseT] | grpc.aio.UnaryStreamCall[RequestT, ResponseT]:
        details = await self._decorator.decorate(client_call_details)
        try:
            call = await continuation(details, request)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return _translated_stream(call)


async def _translated_stream(
    call: grpc.aio.UnaryStreamCall[Any, ResponseT],
) -> AsyncIterator[ResponseT]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        # An abandoned or closed iterator must not leave the stream open on the server.
        if not call.done():
            call.cancel()


def client_interceptors(
    *,
    token_provider: TokenProvider | None = None,
    default_timeout: float | None = 10.0,
    stream_timeout: float | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors :func:`create_channel` installs (one per call arity, as grpc needs)."""
    return [
        HiveUnaryUnaryInterceptor(token_provider=token_provider, default_timeout=default_timeout),
        HiveUnaryStreamInterceptor(token_provider=token_provider, stream_timeout=stream_timeout),
    ]


def create_channel(
    target: str,
    *,
    token_provider: TokenProvider | None = None,
    default_timeout: float | None = 10.0,
    stream_timeout: float | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS,
    extra_options: Sequence[tuple[str, Any]] = (),
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An ``grpc.aio`` channel to ``target`` (``host:port``) with Hive interceptors.

    Insecure unless ``credentials`` are given. ``extra_options`` override the defaults
    by name; ``extra_interceptors`` run inside (after) the Hive ones, so they see the
    token, request id and deadline. Close the channel with ``await channel.close()``.
    """
    if default_timeout is not None and default_timeout <= 0:
        raise ValueError("default_timeout must be positive or None")
    if stream_timeout is not None and stream_timeout <= 0:
        raise ValueError("stream_timeout must be positive or None")
    merged = dict(
        channel_options(
            max_message_bytes=max_message_bytes,
            keepalive_time_ms=keepalive_time_ms,
            keepalive_timeout_ms=keepalive_timeout_ms,
        )
    )
    merged.update(dict(extra_options))
    options = list(merged.items())
    interceptors = [
        *client_interceptors(
            token_provider=token_provider,
            default_timeout=default_timeout,
            stream_timeout=stream_timeout,
        ),
        *extra_interceptors,
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


__all__ = [
    "AUTHORIZATION_KEY",
    "DEFAULT_KEEPALIVE_TIMEOUT_MS",
    "DEFAULT_KEEPALIVE_TIME_MS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "REQUEST_ID_KEY",
    "SERVER_KEEPALIVE_OPTIONS",
    "HiveUnaryStreamInterceptor",
    "HiveUnaryUnaryInterceptor",
    "TokenProvider",
    "channel_options",
    "client_interceptors",
    "create_channel",
    "current_request_id",
    "server_keepalive_options",
]
