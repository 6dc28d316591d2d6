"""The ``grpc.aio`` server every service runs: health, reflection and the interceptor chain.

:func:`build_grpc_server` returns a :class:`HiveGrpcServer` with

* the standard ``grpc.health.v1.Health`` service, NOT_SERVING for ``""`` and every service
  name until :meth:`HiveGrpcServer.set_serving` is called with True (``Watch`` streams
  end at shutdown so they cannot hold a graceful stop);
* server reflection (v1alpha) listing the services, health and reflection;
* interceptors, outermost first: :class:`ServerCallInterceptor` (one canonical line per
  RPC, ``request_id`` from ``x-request-id`` metadata or generated, bound in contextvars;
  metrics when given; ``HiveError`` -> status with ``google.rpc`` details, any other
  exception -> INTERNAL with a generic message, logged with its stack), then the caller's
  own interceptors (auth ...), so a ``HiveError`` raised by an auth interceptor's wrapped
  handler is mapped too.

A request message the server cannot decode (e.g. nested deeper than protobuf's limit of
100 levels) is answered INVALID_ARGUMENT ("the request could not be decoded: ...") and
logged by the canonical line like any other bad input; no inner interceptor (auth
included) or servicer sees it. grpc decodes a request before any interceptor code runs,
so :class:`ServerCallInterceptor` gives grpc a request deserializer that returns an
:class:`UndecodableRequest` instead of raising, and refuses that on entry.

Interceptors wrap unary and streaming handlers alike; a stream is measured and logged when
it ends. Servicers are plain ``async def`` methods (or async generators for streams).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hive_common import grpc_errors
from hive_common.errors import HiveError, InvalidArgument
from hive_common.grpc_client import SERVER_KEEPALIVE_OPTIONS
from hive_common.logging import (
    bind_request_context,
    clear_request_context,
    get_logger,
    request_id_from,
)
from hive_common.metrics import RpcMetrics
from hive_common.text import shown

REQUEST_ID_METADATA_KEY = "x-request-id"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
INTERNAL_ERROR_MESSAGE = "internal error"
"""The only text a client sees for an unexpected server exception."""

# Routine probes; logged at DEBUG so a kubelet polling health does not flood the logs.
QUIET_METHOD_PREFIXES: tuple[str, ...] = (
    f"/{health.SERVICE_NAME}/",
    f"/{reflection.SERVICE_NAME}/",
)

_SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})

Behaviour = Callable[..., Any]
Deserializer = Callable[[bytes], Any]

UNDECODABLE_REQUEST_MESSAGE = "the request could not be decoded"
"""Start of the INVALID_ARGUMENT message answering a request the server cannot decode."""


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Stands for a request message that could not be decoded (what the tolerant
    deserializer of :class:`ServerCallInterceptor` returns instead of raising)."""

    error: str
    """The decoder's own text (e.g. ``Error parsing message ...: Exceeded
    upb_DecodeOptions_MaxDepth``)."""


def tolerant_deserializer(deserializer: Deserializer) -> Deserializer:
    """``deserializer``, except that a ``DecodeError`` gives an :class:`UndecodableRequest`."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return UndecodableRequest(str(exc))

    return deserialize


@dataclass(frozen=True, slots=True)
class RpcCall:
    """What an interceptor knows about one RPC before its handler runs."""

    method: str
    """Full method name, ``/package.Service/Method``."""
    rpc_type: str
    """``unary_unary``, ``unary_stream``, ``stream_unary`` or ``stream_stream``."""
    metadata: tuple[tuple[str, str | bytes], ...]

    def metadata_value(self, key: str) -> str | None:
        """The first text value of metadata ``key`` (keys are lower-case on the wire)."""
        for k, v in self.metadata:
            if k == key and isinstance(v, str):
                return v
        return None


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    return (
        f"{'stream' if handler.request_streaming else 'unary'}_"
        f"{'stream' if handler.response_streaming else 'unary'}"
    )


def _behaviour(handler: grpc.RpcMethodHandler[Any, Any], rpc_type: str) -> Behaviour:
    behaviour: Behaviour | None = getattr(handler, rpc_type)
    if behaviour is None:  # pragma: no cover - grpc always fills the matching slot
        raise RuntimeError(f"handler has no {rpc_type} behaviour")
    return behaviour


async def _iterate(result: Any) -> AsyncIterator[Any]:
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            yield item


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    around: Callable[[Any, Any], AbstractAsyncContextManager[None]],
    *,
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of ``handler`` whose behaviour runs inside ``around(context, request)``
    (``request`` is None for client-streaming RPCs, whose requests arrive later).

    Exceptions from the behaviour propagate through the context manager, which may
    translate them. Streaming behaviours keep their flavour: an async generator stays an
    async generator; a coroutine using ``context.write`` stays a coroutine.
    ``request_deserializer`` replaces the handler's own when given.
    """
    rpc_type = _rpc_type(handler)
    inner = _behaviour(handler, rpc_type)
    serializers: dict[str, Any] = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    if not handler.response_streaming:

        async def unary_response(request: Any, context: Any) -> Any:
            async with around(context, None if handler.request_streaming else request):
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary_response, **serializers)
        return grpc.unary_unary_rpc_method_handler(unary_response, **serializers)

    if inspect.iscoroutinefunction(inner):

        async def writer_stream(request: Any, context: Any) -> None:
            async with around(context, None if handler.request_streaming else request):
                await inner(request, context)

        stream_behaviour: Behaviour = writer_stream
    else:

        async def generator_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async with around(context, None if handler.request_streaming else request):
                async for item in _iterate(inner(request, context)):
                    yield item

        stream_behaviour = generator_stream

    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_behaviour, **serializers)
    return grpc.unary_stream_rpc_method_handler(stream_behaviour, **serializers)


class HandlerWrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base for interceptors that run code around each RPC's handler (any RPC type).

    Subclasses implement :meth:`around`, an async context manager entered inside the
    RPC's own task, so contextvars bound there belong to that RPC only.
    """

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        """Wrap one RPC; exceptions from the handler propagate through it. ``request`` is
        the RPC's request message (None for client-streaming RPCs)."""
        raise NotImplementedError

    def request_deserializer(self, handler: grpc.RpcMethodHandler[Any, Any]) -> Deserializer | None:
        """The request deserializer of the wrapped handler (None: the handler's own)."""
        return None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        call = RpcCall(
            method=handler_call_details.method,
            rpc_type=_rpc_type(handler),
            metadata=tuple(
                (str(k), v) for k, v in (handler_call_details.invocation_metadata or ())
            ),
        )

        def around(context: Any, request: Any) -> AbstractAsyncContextManager[None]:
            return self.around(call, context, request)

        return wrap_handler(
            handler, around, request_deserializer=self.request_deserializer(handler)
        )


def status_code_name(context: Any, exc: BaseException | None) -> str:
    """The final status code name of an RPC, from its context and how the handler ended."""
    if isinstance(exc, HiveError):
        return exc.grpc_code
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return "CANCELLED" if _is_cancellation(exc) else "UNKNOWN"
    try:
        code = context.code()
    except Exception:  # pragma: no cover - defensive: older contexts lack code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "OK" if exc is None else "UNKNOWN"


def _is_dead_call_error(exc: BaseException) -> bool:
    # A write to a call whose client has gone fails with cygrpc's (private) ExecuteBatchError,
    # sometimes before the context reports the cancellation.
    kind = type(exc)
    return kind.__name__ == "ExecuteBatchError" and kind.__module__.startswith("grpc.")


def _is_cancellation(exc: BaseException) -> bool:
    # GeneratorExit: the server closed a response stream early (client went away).
    return isinstance(exc, asyncio.CancelledError | GeneratorExit)


class ServerCallInterceptor(HandlerWrappingInterceptor):
    """The outermost interceptor, one layer for what every RPC needs:

    * one canonical structured log line per RPC (method, code, duration_ms, peer,
      request_id): the RPC task's contextvars are cleared, then ``request_id`` (from
      ``x-request-id`` metadata, else generated) is bound so every line the handler writes
      carries it;
    * metrics (started / handled / latency) when ``metrics`` is given;
    * the one place where exceptions become gRPC statuses: ``HiveError`` -> its code,
      message and ``google.rpc`` details (BadRequest field violations, ErrorInfo) via
      :func:`hive_common.grpc_errors.abort`; a servicer's own ``context.abort`` passes
      through; anything else -> INTERNAL with a generic message, the exception and its
      stack logged here, never sent to the client.

    It also refuses, with INVALID_ARGUMENT, a request that could not be decoded, before
    any inner interceptor or the servicer runs: as the outermost interceptor its handler's
    request deserializer is the one grpc uses, and that one (:func:`tolerant_deserializer`)
    returns an :class:`UndecodableRequest` instead of raising (grpc would otherwise answer
    UNKNOWN and log the ``DecodeError`` as raised by the servicer). Client-streaming
    handlers keep their own deserializer (no contract has one).

    One layer rather than three: each interceptor layer costs every RPC a continuation,
    a handler copy and a context manager.
    """

    def __init__(
        self,
        *,
        metrics: RpcMetrics | None = None,
        logger: Any | None = None,
        quiet_method_prefixes: Sequence[str] = QUIET_METHOD_PREFIXES,
    ) -> None:
        self._metrics = metrics
        self._logger = logger if logger is not None else get_logger("hive.grpc")
        self._quiet = tuple(quiet_method_prefixes)

    def request_deserializer(self, handler: grpc.RpcMethodHandler[Any, Any]) -> Deserializer | None:
        deserializer = handler.request_deserializer
        if deserializer is None or handler.request_streaming:
            return None
        return tolerant_deserializer(deserializer)

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        return self._observe(call, context, request)

    @asynccontextmanager
    async def _observe(self, call: RpcCall, context: Any, request: Any) -> AsyncIterator[None]:
        clear_request_context()
        bind_request_context(
            request_id=request_id_from(call.metadata_value(REQUEST_ID_METADATA_KEY))
        )
        # Read now: peer() on a call torn down by a vanished client can crash the process.
        peer = _peer(context)
        if self._metrics is not None:
            self._metrics.rpc_started(call.method, call.rpc_type)
        started = time.perf_counter()
        code: str | None = None  # decided here when this layer turns an error into a status
        failure: BaseException | None = None
        try:
            try:
                if type(request) is UndecodableRequest:
                    # Raised on entry: the servicer and inner interceptors never run.
                    raise InvalidArgument(f"{UNDECODABLE_REQUEST_MESSAGE}: {request.error}")
                yield
            except grpc.aio.AbortError:
                raise
            except HiveError as err:
                code = err.grpc_code
                await grpc_errors.abort(context, err)
            except Exception as exc:
                if context.cancelled() or _is_dead_call_error(exc):
                    # The client went away and a write to the dead call failed: not a fault.
                    raise asyncio.CancelledError from None
                code = "INTERNAL"
                self._logger.exception("unhandled exception in rpc", method=call.method)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if code is None:
                code = status_code_name(context, failure)
            elapsed = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.rpc_finished(call.method, call.rpc_type, code, elapsed)
            fields: dict[str, Any] = {
                "method": call.method,
                "rpc_type": call.rpc_type,
                "code": code,
                "duration_ms": round(elapsed * 1000, 3),
                "peer": peer,
            }
            if code not in ("OK", "CANCELLED"):
                details = _details(context)
                if details:
                    fields["error"] = details
            self._log(call.method, code, fields)

    def _log(self, method: str, code: str, fields: dict[str, Any]) -> None:
        if code in _SERVER_FAULT_CODES:
            self._logger.error("rpc", **fields)
        elif code in _TRANSIENT_CODES:
            self._logger.warning("rpc", **fields)
        elif method.startswith(self._quiet):
            self._logger.debug("rpc", **fields)
        else:
            self._logger.info("rpc", **fields)


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # pragma: no cover - peer() can fail on a torn-down call
        return "unknown"


def _details(context: Any) -> str | None:
    try:
        details = context.details()
    except Exception:  # pragma: no cover - not every grpc version exposes details()
        return None
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details if isinstance(details, str) and details else None


@dataclass(frozen=True, slots=True)
class GrpcService:
    """A service to host: its full name and how to add its servicer to a server.

    Example: ``GrpcService(name=TICKET_SERVICE_FULL_NAME, register=lambda server:
    ticket_service_pb2_grpc.add_TicketServiceServicer_to_server(servicer, server))``.
    """

    name: str
    register: Callable[[grpc.aio.Server], None]


class DrainingHealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The standard health service, except that ``Watch`` streams end at shutdown.

    The stock servicer's ``Watch`` never returns, so one connected watcher (e.g. client-side
    health checking) would hold every graceful stop for its full grace period. Here, once
    :meth:`enter_graceful_shutdown` runs, each watcher is sent NOT_SERVING and its stream
    completes. (Wrapping the stock ``Watch`` and cancelling it races with its own write.)
    """

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(self, request: Any, context: Any) -> Any:
        status = self._status.get(request.service)
        if status is None:
            # Clipped: a 16 KiB name echoed whole outgrew the client's metadata limit.
            service = shown(request.service)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> None:
        last: int | None = None
        async with self._changed:
            while True:
                status = self._status.get(
                    request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._shutting_down:
                    return
                await self._changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Set ``service``'s status; ignored once shutdown has begun."""
        if self._shutting_down:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good; every ``Watch`` stream then ends."""
        async with self._changed:
            self._shutting_down = True
            for service in self._status:
                self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._changed.notify_all()


EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
"""Server option: grpc sets SO_REUSEPORT by default, so a second server on a port in use
would start and silently take a share of its connections instead of failing to bind."""


class HiveGrpcServer:
    """A built ``grpc.aio.Server`` plus its health servicer; see :func:`build_grpc_server`."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        health_servicer: DrainingHealthServicer,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.service_names: tuple[str, ...] = tuple(service_names)
        self.bound_ports: list[int] = []
        self._serving = False
        self._stopping = False

    @property
    def serving(self) -> bool:
        """Whether health currently reports SERVING."""
        return self._serving

    def add_insecure_port(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the port actually bound."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.50 raises; older ones returned 0
            bound = 0
        if bound == 0:
            raise OSError(
                f"could not bind the gRPC server to {address}: the port is in use "
                "or the host is not an address of this machine"
            )
        self.bound_ports.append(bound)
        return bound

    async def start(self) -> None:
        """Report NOT_SERVING for every service, then start accepting RPCs."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        """Flip health of ``""`` and every hosted service (ignored once shutting down)."""
        if self._stopping:
            return
        self._serving = serving
        await self._set_all(
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING for good, stop accepting, let in-flight RPCs run up to ``grace`` s."""
        self._stopping = True
        self._serving = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)


def build_grpc_server(
    *,
    services: Iterable[GrpcService],
    metrics: RpcMetrics | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
    logger: Any | None = None,
) -> HiveGrpcServer:
    """Build (not start) a ``grpc.aio`` server hosting ``services`` with health and reflection.

    ``interceptors`` run inside the built-in logging / metrics / error-mapping chain.
    The server accepts the keepalive pings of :func:`hive_common.grpc_client.create_channel`
    (otherwise idle watch streams are torn down with "too many pings"); ``options`` are
    extra gRPC channel arguments and override those defaults. Bind with
    :meth:`HiveGrpcServer.add_insecure_port`, then ``await start()``.
    """
    services = list(services)
    chain: list[grpc.aio.ServerInterceptor] = [
        ServerCallInterceptor(metrics=metrics, logger=logger),
        *interceptors,
    ]

    server = grpc.aio.server(
        interceptors=chain,
        options=[
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            ("grpc.max_send_message_length", max_send_message_bytes),
            EXCLUSIVE_PORT,
            *SERVER_KEEPALIVE_OPTIONS,
            *options,
        ],
    )
    for service in services:
        service.register(server)
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return HiveGrpcServer(server=server, health_servicer=health_servicer, service_names=names)


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INTERNAL_ERROR_MESSAGE",
    "QUIET_METHOD_PREFIXES",
    "REQUEST_ID_METADATA_KEY",
    "UNDECODABLE_REQUEST_MESSAGE",
    "DrainingHealthServicer",
    "GrpcService",
    "HandlerWrappingInterceptor",
    "HiveGrpcServer",
    "RpcCall",
    "ServerCallInterceptor",
    "UndecodableRequest",
    "build_grpc_server",
    "status_code_name",
    "tolerant_deserializer",
    "wrap_handler",
]
