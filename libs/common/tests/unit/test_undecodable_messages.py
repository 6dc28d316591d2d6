"""Messages protobuf refuses to decode, on both sides of a real grpc.aio connection.

upb refuses to decode a message nested deeper than 100 levels, and a
``google.protobuf.Struct`` costs 3 levels per JSON object level, so ~34 nested objects in a
ticket's ``parameters`` are enough. Such bytes can still be *encoded*, which is how these
tests make them.

* Server side (the ``build_grpc_server`` chain): a request that cannot be decoded is
  answered INVALID_ARGUMENT before any inner interceptor or the servicer runs, and logged
  by the canonical ``rpc`` line like any other bad input.
* Client side (``TicketClient``; ``RegistryClient`` shares the machinery): a response
  that cannot be decoded is an ``UndecodableResponse`` (INTERNAL, not retried), from
  unary calls and from streams, never an ``AttributeError`` on ``None``.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from hive_common.clients import CallPolicy, ReconnectPolicy, TicketClient
from hive_common.errors import Internal, InvalidArgument, UndecodableResponse
from hive_common.grpc_client import create_channel
from hive_common.grpc_errors import from_rpc_error
from hive_common.grpc_server import (
    EXCLUSIVE_PORT,
    UNDECODABLE_REQUEST_MESSAGE,
    GrpcService,
    HandlerWrappingInterceptor,
    HiveGrpcServer,
    RpcCall,
    build_grpc_server,
)
from hive_common.logging import configure_logging
from hive_common.retry import is_retryable
from hive_testsupport.fakes import UnscriptedTickets
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "test.Deep"
TOO_DEEP = 40  # object levels: 120 protobuf levels in a Struct, over upb's 100
SHALLOW = 3


def nested(levels: int) -> dict[str, Any]:
    """A JSON object ``levels`` objects deep."""
    value: dict[str, Any] = {"leaf": "x"}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def struct_of(levels: int) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(nested(levels))
    return struct


def make_deep(ticket: pb.ExecutionTicket) -> None:
    """Nest ``ticket``'s parameters too deep, in place (copying the message would decode
    it, and fail)."""
    ticket.ticket_id = "t-deep"
    ticket.parameters.update(nested(TOO_DEEP))


def test_the_deep_messages_are_really_undecodable() -> None:
    response = pb.GetTicketResponse()
    make_deep(response.ticket)
    data = response.SerializeToString()
    with pytest.raises(DecodeError, match="MaxDepth"):
        pb.GetTicketResponse.FromString(data)


# ---------------------------------------------------------------------- server side


class Recorder:
    def __init__(self) -> None:
        self.servicer_calls: list[str] = []
        self.interceptor_calls: list[str] = []


class InnerInterceptor(HandlerWrappingInterceptor):
    """An auth-like interceptor that looks at the request."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        return self._record(call, request)

    @asynccontextmanager
    async def _record(self, call: RpcCall, request: Any) -> AsyncIterator[None]:
        if call.method.startswith(f"/{SERVICE}/"):
            assert isinstance(request, struct_pb2.Struct)
            self._recorder.interceptor_calls.append(call.method)
        yield


def deep_service(recorder: Recorder) -> GrpcService:
    """Struct requests, raw-bytes answers."""

    async def keys(request: struct_pb2.Struct, context: Any) -> bytes:
        recorder.servicer_calls.append("Keys")
        return ",".join(sorted(request.keys())).encode()

    async def stream_keys(request: struct_pb2.Struct, context: Any) -> AsyncIterator[bytes]:
        recorder.servicer_calls.append("StreamKeys")
        for key in sorted(request.keys()):
            yield key.encode()

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Keys": grpc.unary_unary_rpc_method_handler(
            keys, request_deserializer=struct_pb2.Struct.FromString
        ),
        "StreamKeys": grpc.unary_stream_rpc_method_handler(
            stream_keys, request_deserializer=struct_pb2.Struct.FromString
        ),
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return GrpcService(name=SERVICE, register=register)


class CreateOnlyTickets(UnscriptedTickets):
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    async def CreateTicket(self, request: pb.CreateTicketRequest, context: Context) -> Any:
        self._recorder.servicer_calls.append("CreateTicket")
        return pb.CreateTicketResponse(
            ticket=pb.ExecutionTicket(ticket_id="t-1", plan_id=request.ticket.plan_id),
            created=True,
        )


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=stream)
    return stream


def rpc_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "rpc"]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def server_port(recorder: Recorder, log_stream: io.StringIO) -> AsyncIterator[int]:
    tickets = CreateOnlyTickets(recorder)
    built: HiveGrpcServer = build_grpc_server(
        services=[
            deep_service(recorder),
            GrpcService(
                name="neuralhive.ticket.v1.TicketService",
                register=lambda server: pb_grpc.add_TicketServiceServicer_to_server(
                    tickets, server
                ),
            ),
        ],
        interceptors=[InnerInterceptor(recorder)],
    )
    port = built.add_insecure_port("127.0.0.1", 0)
    await built.start()
    try:
        yield port
    finally:
        await built.stop(None)


async def test_an_undecodable_request_is_invalid_argument_and_reaches_no_handler(
    server_port: int, recorder: Recorder, log_stream: io.StringIO
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        keys: Any = channel.unary_unary(f"/{SERVICE}/Keys")  # raw bytes both ways
        # A decodable request still goes all the way through.
        assert await keys(struct_of(SHALLOW).SerializeToString()) == b"a"
        assert recorder.servicer_calls == ["Keys"]
        assert recorder.interceptor_calls == [f"/{SERVICE}/Keys"]

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await keys(struct_of(TOO_DEEP).SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith(f"{UNDECODABLE_REQUEST_MESSAGE}: ")
    assert "google.protobuf.Struct" in details
    assert recorder.servicer_calls == ["Keys"]
    assert recorder.interceptor_calls == [f"/{SERVICE}/Keys"]

    line = rpc_lines(log_stream)[-1]
    assert line["method"] == f"/{SERVICE}/Keys"
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["level"] == "info"  # bad input, not a server fault
    assert line["error"] == details
    assert "Traceback" not in log_stream.getvalue()


async def test_an_undecodable_request_of_a_server_stream_is_invalid_argument(
    server_port: int, recorder: Recorder, log_stream: io.StringIO
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        stream_keys: Any = channel.unary_stream(f"/{SERVICE}/StreamKeys")
        assert [m async for m in stream_keys(struct_of(SHALLOW).SerializeToString())] == [b"a"]
        call = stream_keys(struct_of(TOO_DEEP).SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(UNDECODABLE_REQUEST_MESSAGE)
    assert recorder.servicer_calls == ["StreamKeys"]
    assert rpc_lines(log_stream)[-1]["code"] == "INVALID_ARGUMENT"


async def test_a_too_deep_create_ticket_request_is_invalid_argument(
    server_port: int, recorder: Recorder
) -> None:
    # Built in place, as a foreign client would (copying it would decode it).
    request = pb.CreateTicketRequest()
    request.ticket.plan_id, request.ticket.task_id = "p", "t"
    request.ticket.parameters.update(nested(34))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.TicketServiceStub(channel).CreateTicket(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgument)
    assert error.message.startswith(UNDECODABLE_REQUEST_MESSAGE)
    assert "neuralhive.ticket.v1.CreateTicketRequest" in error.message
    assert recorder.servicer_calls == []


# ---------------------------------------------------------------------- client side


class DeepAnswers(UnscriptedTickets):
    """Answers the client can encode but not decode."""

    def __init__(self) -> None:
        self.get_calls = 0
        self.watch_requests: list[pb.WatchTicketsRequest] = []

    async def GetTicket(self, request: pb.GetTicketRequest, context: Context) -> Any:
        self.get_calls += 1
        response = pb.GetTicketResponse()
        response.ticket.ticket_id = request.ticket_id
        if request.ticket_id == "t-deep":
            make_deep(response.ticket)
        return response

    async def WatchTickets(
        self, request: pb.WatchTicketsRequest, context: Context
    ) -> AsyncIterator[pb.WatchTicketsResponse]:
        self.watch_requests.append(request)
        await context.send_initial_metadata((("x-watch-cursor", "c0"),))
        yield pb.WatchTicketsResponse(
            events=[pb.TicketEvent(event_id="e1", cursor="c1", ticket=pb.ExecutionTicket())]
        )
        deep = pb.WatchTicketsResponse()
        event = deep.events.add(event_id="e2", cursor="c2")
        make_deep(event.ticket)
        yield deep
        yield pb.WatchTicketsResponse(
            events=[pb.TicketEvent(event_id="e3", cursor="c3", ticket=pb.ExecutionTicket())]
        )
        await asyncio.Event().wait()


@asynccontextmanager
async def serve(servicer: DeepAnswers) -> AsyncIterator[int]:
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    pb_grpc.add_TicketServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def client_for(port: int) -> TicketClient:
    return TicketClient(
        channel=create_channel(f"127.0.0.1:{port}"),
        policy=CallPolicy(timeout_seconds=5, deadline_seconds=10),
        reconnect=ReconnectPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05),
        owns_channel=True,
        sleep=no_sleep,
    )


async def test_an_undecodable_unary_response_is_a_typed_error_not_retried() -> None:
    servicer = DeepAnswers()
    async with serve(servicer) as port, client_for(port) as client:
        assert (await client.get_ticket(ticket_id="t-ok")).ticket_id == "t-ok"
        with pytest.raises(UndecodableResponse) as info:
            await client.get_ticket(ticket_id="t-deep")
    error = info.value
    assert isinstance(error, Internal)
    assert error.grpc_code == "INTERNAL"
    assert not is_retryable(error)
    assert error.details["method"] == "/neuralhive.ticket.v1.TicketService/GetTicket"
    assert "could not be decoded" in error.message
    assert servicer.get_calls == 2  # the undecodable answer was not asked for again


async def test_an_undecodable_stream_message_is_a_typed_error_and_ends_that_call() -> None:
    servicer = DeepAnswers()
    async with serve(servicer) as port, client_for(port) as client:
        watch = client.watch_tickets(worker_id="w-1")
        assert (await anext(watch)).event_id == "e1"
        with pytest.raises(UndecodableResponse) as info:
            await anext(watch)
        # The position is still that of the last event delivered: the consumer decides
        # whether to resume there (where the same message waits) or start afresh.
        assert watch.cursor == "c1"
        await watch.aclose()
    assert info.value.details == {
        "method": "/neuralhive.ticket.v1.TicketService/WatchTickets",
        "stream": "TicketWatch",
    }
    assert not is_retryable(info.value)
    assert len(servicer.watch_requests) == 1  # not reconnected as if transient


async def test_an_undecodable_stream_message_is_raised_even_without_reconnect() -> None:
    servicer = DeepAnswers()
    async with serve(servicer) as port, client_for(port) as client:
        watch = client.watch_tickets(worker_id="w-1", reconnect=False)
        assert (await anext(watch)).event_id == "e1"
        with pytest.raises(UndecodableResponse):
            await anext(watch)
        await watch.aclose()
