"""Client interceptors against a real grpc.aio server on 127.0.0.1:0 (bytes in, bytes out)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import structlog

from hive_common.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from hive_common.grpc_client import (
    HiveUnaryUnaryInterceptor,
    channel_options,
    create_channel,
    server_keepalive_options,
)
from hive_common.grpc_errors import abort
from hive_common.grpc_server import EXCLUSIVE_PORT

VIOLATIONS = [
    FieldViolation("tasks[0].task_id", "must not be empty"),
    FieldViolation("priority", "unknown priority 'URGENT'"),
]


class Recorder:
    """What the server saw."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.stream_cancelled = asyncio.Event()
        self.never = asyncio.Event()


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _handlers(recorder: Recorder) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        recorder.metadata.append(_metadata(context))
        return json.dumps(
            {"request": request.decode(), "time_remaining": context.time_remaining()}
        ).encode()

    async def invalid(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await abort(
            context,
            InvalidArgument("plan is invalid", violations=VIOLATIONS, details={"plan_id": "p-1"}),
        )

    async def hang(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await recorder.never.wait()
        return b""

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        recorder.metadata.append(_metadata(context))
        yield json.dumps({"time_remaining": context.time_remaining()}).encode()
        yield b"two"
        await abort(context, NotFound("plan p-1 not found", violations=VIOLATIONS[:1]))

    async def endless(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await recorder.never.wait()
        except asyncio.CancelledError:
            recorder.stream_cancelled.set()
            raise

    return grpc.method_handlers_generic_handler(
        "test.Svc",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
            "Hang": grpc.unary_unary_rpc_method_handler(hang),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Endless": grpc.unary_stream_rpc_method_handler(endless),
        },
    )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@asynccontextmanager
async def _server(
    recorder: Recorder, options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[str]:
    server = grpc.aio.server(options=[EXCLUSIVE_PORT, *options])
    server.add_generic_rpc_handlers((_handlers(recorder),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        recorder.never.set()
        await server.stop(grace=None)


@pytest.fixture
async def target(recorder: Recorder) -> AsyncIterator[str]:
    async with _server(recorder) as address:
        yield address


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    tokens = iter(f"tok-{i}" for i in range(1, 100))
    channel = create_channel(target, token_provider=lambda: next(tokens), default_timeout=5.0)
    try:
        yield channel
    finally:
        await channel.close()


def _unary(channel: grpc.aio.Channel, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/test.Svc/{name}")


def _stream(
    channel: grpc.aio.Channel, name: str
) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(f"/test.Svc/{name}")


async def _read(call: grpc.aio.UnaryStreamCall[bytes, bytes]) -> bytes:
    message = await call.read()
    assert isinstance(message, bytes)
    return message


async def _collect(call: grpc.aio.UnaryStreamCall[bytes, bytes], into: list[bytes]) -> None:
    async for message in call:
        into.append(message)


async def test_bad_request_arrives_as_invalid_argument_with_violations(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await _unary(channel, "Invalid")(b"{}")
    error = raised.value
    assert error.message == "plan is invalid"
    assert error.violations == VIOLATIONS
    assert error.details == {"plan_id": "p-1"}
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)


async def test_token_is_attached_and_refreshed_per_call(
    channel: grpc.aio.Channel, recorder: Recorder
) -> None:
    await _unary(channel, "Echo")(b"a")
    await _unary(channel, "Echo")(b"b")
    assert [m["authorization"] for m in recorder.metadata] == ["Bearer tok-1", "Bearer tok-2"]


async def test_async_token_provider_and_no_token(target: str, recorder: Recorder) -> None:
    async def provider() -> str | None:
        await asyncio.sleep(0)
        return "async-tok"

    async with create_channel(target, token_provider=provider) as channel:
        await _unary(channel, "Echo")(b"a")
    async with create_channel(target, token_provider=lambda: None) as channel:
        await _unary(channel, "Echo")(b"b")
    async with create_channel(target) as channel:
        await _unary(channel, "Echo")(b"c")
    assert recorder.metadata[0]["authorization"] == "Bearer async-tok"
    assert "authorization" not in recorder.metadata[1]
    assert "authorization" not in recorder.metadata[2]


async def test_callers_own_metadata_wins(channel: grpc.aio.Channel, recorder: Recorder) -> None:
    await _unary(channel, "Echo")(
        b"a",
        metadata=grpc.aio.Metadata(
            ("authorization", "Bearer explicit"), ("x-request-id", "mine"), ("x-other", "kept")
        ),
    )
    seen = recorder.metadata[0]
    assert seen["authorization"] == "Bearer explicit"
    assert seen["x-request-id"] == "mine"
    assert seen["x-other"] == "kept"


async def test_request_id_comes_from_structlog_contextvars(
    channel: grpc.aio.Channel, recorder: Recorder
) -> None:
    with structlog.contextvars.bound_contextvars(request_id="req-42"):
        await _unary(channel, "Echo")(b"a")
    await _unary(channel, "Echo")(b"b")
    await _unary(channel, "Echo")(b"c")
    ids = [m["x-request-id"] for m in recorder.metadata]
    assert ids[0] == "req-42"
    assert len(ids[1]) == 32
    assert ids[1] != ids[2]  # fresh per call when nothing is bound


async def test_default_deadline_is_applied_and_explicit_one_kept(
    channel: grpc.aio.Channel,
) -> None:
    default = json.loads(await _unary(channel, "Echo")(b"a"))
    explicit = json.loads(await _unary(channel, "Echo")(b"b", timeout=60.0))
    # The wire deadline is rounded up a little (grpc-timeout units); bounds, not timing.
    assert 0 < default["time_remaining"] <= 5.5
    assert 5.5 < explicit["time_remaining"] <= 60.5


async def test_deadline_expiry_is_deadline_exceeded(target: str) -> None:
    async with create_channel(target, default_timeout=0.2) as channel:
        with pytest.raises(DeadlineExceeded):
            await _unary(channel, "Hang")(b"")


async def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with create_channel(f"127.0.0.1:{port}", default_timeout=5.0) as channel:
            with pytest.raises(Unavailable):
                await _unary(channel, "Echo")(b"")


async def test_stream_errors_are_translated_mid_iteration(
    channel: grpc.aio.Channel, recorder: Recorder
) -> None:
    received: list[bytes] = []
    with pytest.raises(NotFound) as raised:
        await _collect(_stream(channel, "Stream")(b""), received)
    assert len(received) == 2
    assert received[1] == b"two"
    # Streams get no default deadline: watch streams stay open.
    assert json.loads(received[0])["time_remaining"] is None
    assert raised.value.message == "plan p-1 not found"
    assert raised.value.violations == VIOLATIONS[:1]
    assert recorder.metadata[0]["authorization"] == "Bearer tok-1"
    assert "x-request-id" in recorder.metadata[0]


async def test_stream_read_api_also_works(channel: grpc.aio.Channel) -> None:
    call = _stream(channel, "Stream")(b"")
    assert json.loads(await _read(call))["time_remaining"] is None
    assert await _read(call) == b"two"
    with pytest.raises(NotFound):
        await call.read()


async def test_stream_timeout_applies_when_configured(target: str) -> None:
    async with create_channel(target, stream_timeout=30.0) as channel:
        call = _stream(channel, "Stream")(b"")
        first = json.loads(await _read(call))
        call.cancel()
    assert 0 < first["time_remaining"] <= 30.5


async def test_cancelling_a_stream_reaches_the_server(
    channel: grpc.aio.Channel, recorder: Recorder
) -> None:
    call = _stream(channel, "Endless")(b"")
    assert await _read(call) == b"first"
    call.cancel()
    await asyncio.wait_for(recorder.stream_cancelled.wait(), timeout=10)


async def test_decorated_details_exactly() -> None:
    """The interceptor in isolation: what it hands to the next step of the chain."""
    seen: list[grpc.aio.ClientCallDetails] = []

    class FakeCall:
        def __await__(self) -> Any:
            yield from asyncio.sleep(0).__await__()
            return b"response"

    async def continuation(details: grpc.aio.ClientCallDetails, request: bytes) -> Any:
        seen.append(details)
        return FakeCall()

    interceptor = HiveUnaryUnaryInterceptor(token_provider=lambda: "t", default_timeout=7.5)
    call: Callable[..., Awaitable[Any]] = interceptor.intercept_unary_unary
    original = grpc.aio.ClientCallDetails("/m", None, None, None, None)
    assert await call(continuation, original, b"req") == b"response"
    assert seen[0].timeout == 7.5
    assert seen[0].metadata is not None
    assert dict(seen[0].metadata)["authorization"] == "Bearer t"
    with_timeout = grpc.aio.ClientCallDetails("/m", 1.5, None, None, True)
    await call(continuation, with_timeout, b"req")
    assert seen[1].timeout == 1.5
    assert seen[1].wait_for_ready is True


async def test_server_without_keepalive_options_refuses_frequent_pings(
    recorder: Recorder,
) -> None:
    # Documents why servers need server_keepalive_options(): the stream is torn down.
    async with (
        _server(recorder) as address,
        create_channel(address, keepalive_time_ms=200) as channel,
    ):
        call = _stream(channel, "Endless")(b"")
        assert await _read(call) == b"first"
        with pytest.raises(Unavailable):
            await asyncio.wait_for(call.read(), timeout=30)


async def test_server_keepalive_options_keep_an_idle_stream_open(recorder: Recorder) -> None:
    async with (
        _server(recorder, server_keepalive_options(200)) as address,
        create_channel(address, keepalive_time_ms=200) as channel,
    ):
        call = _stream(channel, "Endless")(b"")
        assert await _read(call) == b"first"
        # Ten ping intervals with no data: the stream must still be open (the read
        # only ends by our timeout, never with an error).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call.read(), timeout=2.0)


async def test_a_new_channel_connects_afresh_while_another_backs_off(
    recorder: Recorder,
) -> None:
    # With grpc's process-wide subchannel pool the second channel shared the first one's
    # connection in back-off and failed at once with its stale "connection refused" (a
    # flaky CI failure of another test here, against a server just started).
    async with _server(recorder) as address:
        backing_off = create_channel(address, default_timeout=5.0)
        await _unary(backing_off, "Echo")(b"")
    try:
        with pytest.raises(Unavailable):
            await _unary(backing_off, "Echo")(b"")
        port = address.rsplit(":", 1)[1]
        restarted = grpc.aio.server(options=[EXCLUSIVE_PORT])
        restarted.add_generic_rpc_handlers((_handlers(recorder),))
        assert restarted.add_insecure_port(address) == int(port)
        await restarted.start()
        try:
            async with create_channel(address, default_timeout=5.0) as fresh:
                reply = json.loads(await _unary(fresh, "Echo")(b"hello"))
            assert reply["request"] == "hello"
        finally:
            await restarted.stop(grace=None)
    finally:
        await backing_off.close()


def test_channel_options_are_sane() -> None:
    options = dict(channel_options(max_message_bytes=1024))
    assert options["grpc.max_send_message_length"] == 1024
    assert options["grpc.max_receive_message_length"] == 1024
    assert options["grpc.keepalive_time_ms"] > 0
    assert options["grpc.http2.max_pings_without_data"] == 0


@pytest.mark.parametrize("kwargs", [{"default_timeout": 0}, {"stream_timeout": -1}])
def test_create_channel_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        create_channel("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]
