"""The gRPC server builder against a real grpc.aio server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import pytest
import structlog
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hive_common.errors import FieldViolation, InvalidArgument, NotFound
from hive_common.grpc_errors import MAX_MESSAGE_CHARS, from_rpc_error, rich_status_of
from hive_common.grpc_server import (
    INTERNAL_ERROR_MESSAGE,
    GrpcService,
    HandlerWrappingInterceptor,
    HiveGrpcServer,
    RpcCall,
    build_grpc_server,
)
from hive_common.logging import configure_logging
from hive_common.metrics import RpcMetrics, new_registry

SERVICE = "test.Echo"
SECRET = "db password is hunter2"


class EchoServicer:
    """Raw-bytes handlers (no protobuf needed) covering each outcome."""

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def invalid(self, request: bytes, context: Any) -> bytes:
        raise InvalidArgument(
            "bad ticket",
            violations=[
                FieldViolation("tasks[0].task_id", "must not be empty"),
                FieldViolation("priority", "unknown value"),
            ],
        )

    async def invalid_everywhere(self, request: bytes, context: Any) -> bytes:
        """As many violations as the request says, each naming a long field."""
        raise InvalidArgument(
            "plan is invalid " + "x" * 5000,
            violations=[
                FieldViolation(f"tasks[{i}].depends_on[0]", f"unknown task '{'s' * 40}'")
                for i in range(int(request))
            ],
        )

    async def crash(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError(SECRET)

    async def request_id(self, request: bytes, context: Any) -> bytes:
        return str(structlog.contextvars.get_contextvars().get("request_id")).encode()

    async def own_abort(self, request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "servicer aborted")
        raise AssertionError("unreachable")

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def count_then_fail(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise NotFound("ticket vanished mid-stream")

    async def stream_crash(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError(SECRET)

    async def write_style(self, request: bytes, context: Any) -> None:
        for chunk in (b"a", b"b"):
            await context.write(chunk)

    async def flood(self, request: bytes, context: Any) -> None:
        while True:
            await context.write(b"x" * 1_000_000)


def echo_service(servicer: EchoServicer) -> GrpcService:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Echo": grpc.unary_unary_rpc_method_handler(servicer.echo),
        "Invalid": grpc.unary_unary_rpc_method_handler(servicer.invalid),
        "InvalidEverywhere": grpc.unary_unary_rpc_method_handler(servicer.invalid_everywhere),
        "Crash": grpc.unary_unary_rpc_method_handler(servicer.crash),
        "RequestId": grpc.unary_unary_rpc_method_handler(servicer.request_id),
        "OwnAbort": grpc.unary_unary_rpc_method_handler(servicer.own_abort),
        "Count": grpc.unary_stream_rpc_method_handler(servicer.count),
        "CountThenFail": grpc.unary_stream_rpc_method_handler(servicer.count_then_fail),
        "StreamCrash": grpc.unary_stream_rpc_method_handler(servicer.stream_crash),
        "WriteStyle": grpc.unary_stream_rpc_method_handler(servicer.write_style),
        "Flood": grpc.unary_stream_rpc_method_handler(servicer.flood),
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return GrpcService(name=SERVICE, register=register)


class TagInterceptor(HandlerWrappingInterceptor):
    """An extra (auth-like) interceptor: rejects calls whose metadata says so."""

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        return self._check(call)

    @asynccontextmanager
    async def _check(self, call: RpcCall) -> AsyncIterator[None]:
        if call.metadata_value("x-reject") == "yes":
            raise InvalidArgument("rejected", violations=[FieldViolation("x-reject", "no")])
        yield


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=stream)
    return stream


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
async def server(log_stream: io.StringIO) -> AsyncIterator[tuple[HiveGrpcServer, int]]:
    registry = new_registry()
    built = build_grpc_server(
        services=[echo_service(EchoServicer())],
        metrics=RpcMetrics(registry),
        interceptors=[TagInterceptor()],
    )
    port = built.add_insecure_port("127.0.0.1", 0)
    await built.start()
    try:
        yield built, port
    finally:
        await built.stop(None)


@pytest.fixture
async def channel(server: tuple[HiveGrpcServer, int]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as ch:
        yield ch


def unary(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{name}")


def stream(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_stream(f"/{SERVICE}/{name}")


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    status: int = reply.status
    return status


async def test_health_is_not_serving_until_set_serving(
    server: tuple[HiveGrpcServer, int], channel: grpc.aio.Channel
) -> None:
    built, _ = server
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(channel, "") == not_serving
    assert await health_status(channel, SERVICE) == not_serving

    await built.set_serving(True)
    assert built.serving
    assert await health_status(channel, "") == serving
    assert await health_status(channel, SERVICE) == serving

    await built.set_serving(False)
    assert await health_status(channel, SERVICE) == not_serving


async def test_unknown_health_service_is_not_found(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_status(channel, "no.Such")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_long_unknown_health_service_name_is_not_found_clipped(
    channel: grpc.aio.Channel,
) -> None:
    # Echoed whole, a 20 KiB name made the status outgrow the client's metadata limit:
    # RESOURCE_EXHAUSTED instead of NOT_FOUND.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_status(channel, "x" * 20_000)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(raised.value.details() or "") < 300


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    replies = [reply async for reply in call]
    names = {s.name for s in replies[0].list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_unary_ok_and_canonical_log_line(
    channel: grpc.aio.Channel, log_stream: io.StringIO
) -> None:
    reply = await unary(channel, "Echo")(b"hello", metadata=(("x-request-id", "req-42"),))
    assert reply == b"hello"
    rpc_lines = [line for line in log_lines(log_stream) if line.get("event") == "rpc"]
    assert len(rpc_lines) == 1
    line = rpc_lines[0]
    assert line["method"] == f"/{SERVICE}/Echo"
    assert line["code"] == "OK"
    assert line["request_id"] == "req-42"
    assert line["level"] == "info"
    assert isinstance(line["duration_ms"], float)
    assert "127.0.0.1" in line["peer"]


async def test_request_id_is_bound_in_handler_context(channel: grpc.aio.Channel) -> None:
    given = await unary(channel, "RequestId")(b"", metadata=(("x-request-id", "abc"),))
    assert given == b"abc"
    generated = await unary(channel, "RequestId")(b"")
    assert len(generated) == 32
    assert generated != b"abc"
    # Each RPC gets its own id: nothing leaks from the previous call.
    assert await unary(channel, "RequestId")(b"") != generated
    # A client's id goes into every log line: as over HTTP, only a sane token is kept.
    for bad in ('x y"z<' * 100, "a" * 129, "ab;cd"):
        replaced = await unary(channel, "RequestId")(b"", metadata=(("x-request-id", bad),))
        assert len(replaced) == 32
        assert replaced != bad.encode()
    kept = "a" * 128
    assert (
        await unary(channel, "RequestId")(b"", metadata=(("x-request-id", kept),)) == kept.encode()
    )


async def test_invalid_argument_arrives_with_bad_request_details(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Invalid")(b"")
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "bad ticket"
    status = rich_status_of(err)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("tasks[0].task_id", "must not be empty"),
        ("priority", "unknown value"),
    ]
    translated = from_rpc_error(err)
    assert isinstance(translated, InvalidArgument)
    assert translated.violations[0] == FieldViolation("tasks[0].task_id", "must not be empty")


async def test_unexpected_exception_is_internal_without_text(
    channel: grpc.aio.Channel, log_stream: io.StringIO
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Crash")(b"")
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == INTERNAL_ERROR_MESSAGE
    assert SECRET not in str(err)
    assert SECRET not in repr(err.trailing_metadata())

    lines = log_lines(log_stream)
    crash = [line for line in lines if line.get("event") == "unhandled exception in rpc"]
    assert len(crash) == 1
    assert crash[0]["level"] == "error"
    assert SECRET in json.dumps(crash[0]["exception"])  # the stack stays in the logs
    rpc = [line for line in lines if line.get("event") == "rpc"]
    assert rpc[0]["code"] == "INTERNAL"
    assert rpc[0]["level"] == "error"


async def test_servicer_abort_passes_through(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "OwnAbort")(b"")
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == "servicer aborted"


async def test_server_streaming_ok(channel: grpc.aio.Channel, log_stream: io.StringIO) -> None:
    items = [item async for item in stream(channel, "Count")(b"3")]
    assert items == [b"0", b"1", b"2"]
    written = [item async for item in stream(channel, "WriteStyle")(b"")]
    assert written == [b"a", b"b"]
    codes = {
        line["method"]: line["code"] for line in log_lines(log_stream) if line.get("event") == "rpc"
    }
    assert codes == {f"/{SERVICE}/Count": "OK", f"/{SERVICE}/WriteStyle": "OK"}


async def test_server_streaming_hive_error_after_messages(channel: grpc.aio.Channel) -> None:
    received: list[bytes] = []

    async def consume() -> None:
        async for item in stream(channel, "CountThenFail")(b""):
            received.append(item)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await consume()
    assert received == [b"first"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(from_rpc_error(info.value), NotFound)


async def test_server_streaming_crash_is_internal(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [item async for item in stream(channel, "StreamCrash")(b"")]
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in str(info.value)


async def test_client_gone_mid_write_is_cancelled_not_a_fault(
    server: tuple[HiveGrpcServer, int], log_stream: io.StringIO
) -> None:
    # The handler is blocked writing when the client cancels: that is CANCELLED, logged as
    # such with the peer read while the call was alive, and never an "unhandled exception".
    for _ in range(3):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as ch:
            call = stream(ch, "Flood")(b"")
            await call.read()
            call.cancel()
    async with asyncio.timeout(10):
        while len([e for e in log_lines(log_stream) if e.get("method") == f"/{SERVICE}/Flood"]) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    lines = [e for e in log_lines(log_stream) if e.get("method") == f"/{SERVICE}/Flood"]
    assert [e["event"] for e in lines] == ["rpc"] * 3
    assert {e["code"] for e in lines} == {"CANCELLED"}
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in lines)


async def test_extra_interceptor_errors_are_mapped(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Echo")(b"x", metadata=(("x-reject", "yes"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(info.value).violations == [FieldViolation("x-reject", "no")]


_BIND_TWICE = """
import sys
from hive_common.grpc_server import build_grpc_server
try:
    build_grpc_server(services=[]).add_insecure_port("127.0.0.1", int(sys.argv[1]))
except OSError as exc:
    print(exc)
    sys.exit(3)
"""


async def test_a_second_server_on_a_port_in_use_fails_to_bind(
    server: tuple[HiveGrpcServer, int], channel: grpc.aio.Channel
) -> None:
    # grpc's default SO_REUSEPORT let a second server start on the same port and take a
    # share of its connections. (In a process of its own: a grpc.aio server whose bind
    # failed made a pytest process with other servers crash at exit.)
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BIND_TWICE, str(server[1]), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await second.communicate()
    assert second.returncode == 3
    assert f"127.0.0.1:{server[1]}: the port is in use" in out.decode()
    assert await unary(channel, "Echo")(b"still here") == b"still here"


@pytest.mark.parametrize("count", [200, 5000])
async def test_many_violations_arrive_as_invalid_argument_within_the_trailer_limits(
    channel: grpc.aio.Channel, count: int
) -> None:
    # 200 violations made a ~17 KiB trailer: clients refused it as RESOURCE_EXHAUSTED
    # (always beyond 16 KiB, at random beyond 8 KiB) and saw no violation at all.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "InvalidEverywhere")(str(count).encode())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(info.value)
    assert error.message.startswith("plan is invalid xxx")
    assert len(error.message) == MAX_MESSAGE_CHARS
    *shown, last = error.violations
    assert shown[0] == FieldViolation("tasks[0].depends_on[0]", f"unknown task '{'s' * 40}'")
    assert [v.field for v in shown] == [f"tasks[{i}].depends_on[0]" for i in range(len(shown))]
    assert last == FieldViolation("request", f"{count - len(shown)} more violations not shown")
    assert len(shown) >= 20


async def test_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Nope")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_metrics_record_codes(log_stream: io.StringIO) -> None:
    registry = new_registry()
    built = build_grpc_server(services=[echo_service(EchoServicer())], metrics=RpcMetrics(registry))
    port = built.add_insecure_port("127.0.0.1", 0)
    await built.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await unary(ch, "Echo")(b"1")
            await unary(ch, "Echo")(b"2")
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(ch, "Invalid")(b"")
            _ = [item async for item in stream(ch, "Count")(b"2")]
    finally:
        await built.stop(None)

    def handled(method: str, code: str, rpc_type: str = "unary_unary") -> float | None:
        return registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_service": SERVICE,
                "grpc_method": method,
                "grpc_type": rpc_type,
                "grpc_code": code,
            },
        )

    assert handled("Echo", "OK") == 2
    assert handled("Invalid", "INVALID_ARGUMENT") == 1
    assert handled("Count", "OK", "unary_stream") == 1
    assert (
        registry.get_sample_value(
            "grpc_server_handling_seconds_count",
            {"grpc_service": SERVICE, "grpc_method": "Echo", "grpc_code": "OK"},
        )
        == 2
    )


async def test_message_size_limit(log_stream: io.StringIO) -> None:
    built = build_grpc_server(
        services=[echo_service(EchoServicer())], max_receive_message_bytes=1024
    )
    port = built.add_insecure_port("127.0.0.1", 0)
    await built.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert await unary(ch, "Echo")(b"x" * 1000) == b"x" * 1000
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(ch, "Echo")(b"x" * 2048)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await built.stop(None)


async def test_health_checks_log_at_debug_only(
    channel: grpc.aio.Channel, log_stream: io.StringIO
) -> None:
    await health_status(channel, "")
    lines = [line for line in log_lines(log_stream) if line.get("event") == "rpc"]
    assert [line["level"] for line in lines] == ["debug"]


async def test_stop_refuses_set_serving(server: tuple[HiveGrpcServer, int]) -> None:
    built, _ = server
    await built.set_serving(True)
    await built.stop(5)
    await built.set_serving(True)  # ignored once shutting down
    assert not built.serving


async def test_health_watch_ends_at_shutdown(server: tuple[HiveGrpcServer, int]) -> None:
    built, port = server
    await built.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        # A stock Watch never ends and would hold this stop for the whole 60 s grace;
        # the guard below is far shorter, so a hang fails the test instead of passing slowly.
        async with asyncio.timeout(20):
            stopping = asyncio.create_task(built.stop(60))
            rest: list[int] = []
            while (reply := await watch.read()) is not grpc.aio.EOF:
                rest.append(reply.status)
            await stopping
        assert rest
        assert set(rest) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        assert await watch.code() == grpc.StatusCode.OK
