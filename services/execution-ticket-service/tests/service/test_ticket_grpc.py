"""The real gRPC server (port 0) on real PostgreSQL + MongoDB, driven by the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.domain.paging import (
    Cursor,
    CursorPurged,
    decode_cursor,
    encode_cursor,
)
from execution_ticket_service.domain.state_machine import MAX_LOST_RUNS
from execution_ticket_service.domain.validation import Violations
from execution_ticket_service.transport.grpc.servicer import WATCH_BATCH_BYTES, WATCH_BATCH_EVENTS
from hive_common.auth import TokenIssuer
from hive_common.grpc_errors import rich_status_of
from hive_common.runtime import ServerStoppedUnexpectedly
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.service

if TYPE_CHECKING:
    Stub = pb_grpc.TicketServiceAsyncStub

# A number no TicketStatus has (what a newer client might send).
UNKNOWN_STATUS = cast(pb.TicketStatus.ValueType, 42)

Code = grpc.StatusCode
S = pb.TicketStatus


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def spec(task_id: str = "t1", plan_id: str = "plan-1", **kwargs: Any) -> pb.TicketSpec:
    return pb.TicketSpec(plan_id=plan_id, task_id=task_id, task_type="echo", **kwargs)


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


async def next_event(stream: Any) -> pb.TicketEvent:
    response = await stream.read()
    assert isinstance(response, pb.WatchTicketsResponse), response
    return response.event


async def code_of(call: Awaitable[Any]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


def violations(exc: grpc.aio.AioRpcError) -> set[str]:
    status = rich_status_of(exc)
    assert status is not None
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
    return fields


@dataclass
class Client:
    """The stub plus tokens, so tests read like the calls a peer makes."""

    stub: Stub
    issuer: TokenIssuer
    service_token: str

    @property
    def svc(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.service_token)

    def worker(self, worker_id: str) -> tuple[tuple[str, str], ...]:
        token, _ = self.issuer.issue_worker_token(worker_id=worker_id, ttl_seconds=600)
        return bearer(token)

    async def create(self, **kwargs: Any) -> pb.ExecutionTicket:
        response = await self.stub.CreateTicket(
            pb.CreateTicketRequest(ticket=spec(**kwargs)), metadata=self.svc
        )
        return response.ticket

    async def assign(
        self, ticket: pb.ExecutionTicket, worker_id: str = "w1", **kwargs: Any
    ) -> pb.ExecutionTicket:
        request = pb.AssignTicketRequest(
            ticket_id=ticket.ticket_id, worker_id=worker_id, attempt=ticket.attempt, **kwargs
        )
        return (await self.stub.AssignTicket(request, metadata=self.svc)).ticket

    async def ticket_token(self, ticket_id: str, worker_id: str = "w1") -> str:
        response = await self.stub.GenerateToken(
            pb.GenerateTokenRequest(ticket_id=ticket_id), metadata=self.worker(worker_id)
        )
        return response.token

    async def update(
        self, ticket: pb.ExecutionTicket, status: Any, token: str | None = None, **kwargs: Any
    ) -> pb.ExecutionTicket:
        request = pb.UpdateTicketStatusRequest(
            ticket_id=ticket.ticket_id, status=status, **{"attempt": ticket.attempt, **kwargs}
        )
        metadata = bearer(token) if token else self.svc
        return (await self.stub.UpdateTicketStatus(request, metadata=metadata)).ticket

    async def get(self, ticket_id: str) -> pb.ExecutionTicket:
        response = await self.stub.GetTicket(
            pb.GetTicketRequest(ticket_id=ticket_id), metadata=self.svc
        )
        return response.ticket


@pytest.fixture
def client(stub: Stub, issuer: TokenIssuer, service_token: str) -> Client:
    return Client(stub=stub, issuer=issuer, service_token=service_token)


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, what: str, deadline: float = 20.0
) -> None:
    """Wait for a condition the service reaches on its own (background loops)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not await probe():
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


# ---- create / get / list --------------------------------------------------------------------


async def test_create_is_idempotent_and_conflicts_name_fields(client: Client) -> None:
    first = await client.stub.CreateTicket(
        pb.CreateTicketRequest(ticket=spec(parameters=struct(a=1))), metadata=client.svc
    )
    assert first.created
    assert first.ticket.status == S.TICKET_STATUS_PENDING
    assert first.ticket.attempt == 1
    assert first.ticket.version == 1
    assert first.ticket.priority == pb.PRIORITY_NORMAL
    again = await client.stub.CreateTicket(
        pb.CreateTicketRequest(ticket=spec(parameters=struct(a=1))), metadata=client.svc
    )
    assert not again.created
    assert again.ticket == first.ticket
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.CreateTicket(
            pb.CreateTicketRequest(ticket=spec(parameters=struct(a=2), max_retries=3)),
            metadata=client.svc,
        )
    assert info.value.code() is Code.ALREADY_EXISTS
    assert violations(info.value) == {"ticket.parameters", "ticket.max_retries"}
    assert await client.get(first.ticket.ticket_id) == first.ticket


async def test_concurrent_create_retries_make_exactly_one_ticket(client: Client) -> None:
    request = pb.CreateTicketRequest(ticket=spec("racy"))
    responses = await asyncio.gather(
        *(client.stub.CreateTicket(request, metadata=client.svc) for _ in range(12))
    )
    assert len({r.ticket.ticket_id for r in responses}) == 1
    assert sum(r.created for r in responses) == 1


async def test_batch_create_is_all_or_nothing_and_idempotent(client: Client) -> None:
    batch = [spec(f"b{i}", priority=pb.PRIORITY_HIGH) for i in range(50)]
    created = await client.stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(tickets=batch), metadata=client.svc
    )
    assert created.created_count == 50
    assert [t.task_id for t in created.tickets] == [f"b{i}" for i in range(50)]
    retry = await client.stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(tickets=[*batch, spec("b50")]), metadata=client.svc
    )
    assert retry.created_count == 1
    assert list(retry.tickets[:50]) == list(created.tickets)
    conflicting = [spec("b51"), spec("b3", priority=pb.PRIORITY_HIGH, description="changed")]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.BatchCreateTickets(
            pb.BatchCreateTicketsRequest(tickets=conflicting), metadata=client.svc
        )
    assert info.value.code() is Code.ALREADY_EXISTS
    assert violations(info.value) == {"tickets[1].description"}
    listed = await client.stub.ListTickets(
        pb.ListTicketsRequest(plan_id="plan-1", page_size=1000), metadata=client.svc
    )
    assert len(listed.tickets) == 51  # b51 was not written


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.CreateTicketRequest(), {"ticket.plan_id", "ticket.task_id", "ticket.task_type"}),
        (pb.CreateTicketRequest(ticket=spec(priority=9)), {"ticket.priority"}),
        (
            pb.CreateTicketRequest(ticket=spec(parameters=struct(blob="x" * 2000))),
            {"ticket.parameters"},
        ),
        (pb.CreateTicketRequest(ticket=spec(max_retries=-1)), {"ticket.max_retries"}),
    ],
)
async def test_bad_create_is_invalid_argument_and_writes_nothing(
    client: Client, request_: pb.CreateTicketRequest, fields: set[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.CreateTicket(request_, metadata=client.svc)
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == fields
    listed = await client.stub.ListTickets(pb.ListTicketsRequest(), metadata=client.svc)
    assert list(listed.tickets) == []


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        ("get", {"ticket_id"}),
        ("assign", {"ticket_id", "worker_id", "attempt"}),
        ("update", {"ticket_id", "status", "attempt"}),
        ("list", {"statuses[0]", "page_token", "page_size"}),
        ("token", {"ticket_id"}),
        ("watch", {"include_ticket_tokens"}),
    ],
)
async def test_malformed_requests_name_their_fields(
    client: Client, call: str, fields: set[str]
) -> None:
    stub, md = client.stub, client.svc
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: stub.GetTicket(pb.GetTicketRequest(ticket_id="nope"), metadata=md),
        "assign": lambda: stub.AssignTicket(pb.AssignTicketRequest(ticket_id="x"), metadata=md),
        "update": lambda: stub.UpdateTicketStatus(
            pb.UpdateTicketStatusRequest(ticket_id="x", status=UNKNOWN_STATUS), metadata=md
        ),
        "list": lambda: stub.ListTickets(
            pb.ListTicketsRequest(statuses=[77], page_token="zz", page_size=-1),  # type: ignore[list-item]
            metadata=md,
        ),
        "token": lambda: stub.GenerateToken(pb.GenerateTokenRequest(ticket_id="1"), metadata=md),
        "watch": lambda: _first_event(
            stub.WatchTickets(
                pb.WatchTicketsRequest(plan_id="p", include_ticket_tokens=True), metadata=md
            )
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await calls[call]()
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == fields


NUL = "\u0000"


def _nul_cases(ticket_id: str) -> dict[str, tuple[Callable[[Stub, Any], Awaitable[Any]], set[str]]]:
    """A NUL character in every text input of every RPC (PostgreSQL text and jsonb refuse it)."""

    def create(**kwargs: Any) -> Callable[[Stub, Any], Awaitable[Any]]:
        return lambda stub, md: stub.CreateTicket(
            pb.CreateTicketRequest(ticket=spec(**kwargs)), metadata=md
        )

    def update(**kwargs: Any) -> Callable[[Stub, Any], Awaitable[Any]]:
        request = pb.UpdateTicketStatusRequest(
            ticket_id=ticket_id, status=S.TICKET_STATUS_FAILED, attempt=1, **kwargs
        )
        return lambda stub, md: stub.UpdateTicketStatus(request, metadata=md)

    nested = struct(foo={"bar": ["ok", f"b{NUL}d"]})
    bad_key = struct_pb2.Struct()
    bad_key.update({f"k{NUL}y": 1})
    deep_bad_key = struct_pb2.Struct()
    deep_bad_key.update({"outer": [{f"k{NUL}": 1}]})
    return {
        "description": (create(description=f"a{NUL}b"), {"ticket.description"}),
        "task_id": (create(task_id=f"t{NUL}"), {"ticket.task_id"}),
        "intent_id": (create(intent_id=f"i{NUL}"), {"ticket.intent_id"}),
        "capability": (
            create(required_capabilities=["gpu", f"x{NUL}"]),
            {"ticket.required_capabilities[1]"},
        ),
        "depends_on": (create(depends_on=[f"d{NUL}"]), {"ticket.depends_on[0]"}),
        "parameters value": (create(parameters=struct(foo=f"x{NUL}")), {"ticket.parameters.foo"}),
        "parameters nested": (create(parameters=nested), {"ticket.parameters.foo.bar[1]"}),
        "parameters key": (create(parameters=bad_key), {"ticket.parameters"}),
        "batch": (
            lambda stub, md: stub.BatchCreateTickets(
                pb.BatchCreateTicketsRequest(
                    tickets=[spec("fine"), spec("bad", description=f"{NUL}")]
                ),
                metadata=md,
            ),
            {"tickets[1].description"},
        ),
        "error_message": (update(error_message=f"boom{NUL}"), {"error_message"}),
        "result value": (update(result=struct(foo=f"{NUL}")), {"result.foo"}),
        "result nested": (update(result=nested), {"result.foo.bar[1]"}),
        "result key": (update(result=bad_key), {"result"}),
        "result deep key": (update(result=deep_bad_key), {"result.outer[0]"}),
        "assign worker_id": (
            lambda stub, md: stub.AssignTicket(
                pb.AssignTicketRequest(ticket_id=ticket_id, worker_id=f"w{NUL}", attempt=1),
                metadata=md,
            ),
            {"worker_id"},
        ),
        "get ticket_id": (
            lambda stub, md: stub.GetTicket(
                pb.GetTicketRequest(ticket_id=f"{ticket_id}{NUL}"), metadata=md
            ),
            {"ticket_id"},
        ),
        "token ticket_id": (
            lambda stub, md: stub.GenerateToken(
                pb.GenerateTokenRequest(ticket_id=f"{NUL}{ticket_id}"), metadata=md
            ),
            {"ticket_id"},
        ),
        "list": (
            lambda stub, md: stub.ListTickets(
                pb.ListTicketsRequest(
                    plan_id=f"p{NUL}", worker_id=f"w{NUL}", page_token=f"e30{NUL}"
                ),
                metadata=md,
            ),
            {"plan_id", "worker_id", "page_token"},
        ),
        "watch": (
            lambda stub, md: _first_event(
                stub.WatchTickets(
                    pb.WatchTicketsRequest(
                        plan_id=f"p{NUL}", worker_id=f"w{NUL}", cursor=f"e30{NUL}"
                    ),
                    metadata=md,
                )
            ),
            {"plan_id", "worker_id", "cursor"},
        ),
    }


@pytest.mark.parametrize("case", list(_nul_cases("")))
async def test_nul_characters_are_invalid_argument_and_write_nothing(
    client: Client, service: TicketService, case: str
) -> None:
    ticket = await client.assign(await client.create(task_id="target"))
    call, fields = _nul_cases(ticket.ticket_id)[case]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client.stub, client.svc)
    assert info.value.code() is Code.INVALID_ARGUMENT, info.value.details()
    assert violations(info.value) == fields
    listed = await client.stub.ListTickets(pb.ListTicketsRequest(), metadata=client.svc)
    assert [t.task_id for t in listed.tickets] == ["target"]
    assert await client.get(ticket.ticket_id) == ticket


def _nested_struct(levels: int) -> struct_pb2.Struct:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return struct(**value)


async def test_json_no_watcher_could_read_is_invalid_argument_and_writes_nothing(
    client: Client,
) -> None:
    # Non-finite numbers were INTERNAL; 33 levels were stored, and then every watch
    # message carrying the ticket was too deep to decode (the orchestrator's watch stuck).
    ticket = await client.assign(await client.create(task_id="target"))
    creates = {
        "nan": (spec("n", parameters=struct(x=math.nan)), "ticket.parameters.x"),
        "infinity": (spec("i", parameters=struct(x=[-math.inf])), "ticket.parameters.x[0]"),
        "deep": (spec("d", parameters=_nested_struct(33)), "ticket.parameters" + ".a" * 32),
    }
    for name, (ticket_spec, field) in creates.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.CreateTicket(
                pb.CreateTicketRequest(ticket=ticket_spec), metadata=client.svc
            )
        assert info.value.code() is Code.INVALID_ARGUMENT, name
        assert violations(info.value) == {field}, name
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.update(ticket, S.TICKET_STATUS_COMPLETED, result=struct(x=math.inf))
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == {"result.x"}
    # In a batch of reports only the bad one is refused, and says why.
    other = await client.assign(await client.create(task_id="other"))
    response = await client.stub.UpdateTicketStatuses(
        pb.UpdateTicketStatusesRequest(
            reports=[
                report(ticket, S.TICKET_STATUS_COMPLETED, result=struct(x=math.nan)),
                report(other, S.TICKET_STATUS_RUNNING),
            ]
        ),
        metadata=client.svc,
    )
    refused, applied = response.results
    assert _code(refused.error_code) is Code.INVALID_ARGUMENT
    assert "result.x: nan is not a JSON number" in refused.error_message
    assert applied.ticket.status == S.TICKET_STATUS_RUNNING
    assert await client.get(ticket.ticket_id) == ticket
    listed = await client.stub.ListTickets(pb.ListTicketsRequest(), metadata=client.svc)
    assert {t.task_id for t in listed.tickets} == {"target", "other"}
    # 32 levels: stored, and delivered to a watcher.
    watch = client.stub.WatchTickets(pb.WatchTicketsRequest(plan_id="deep"), metadata=client.svc)
    await watch.initial_metadata()
    deepest = await client.create(plan_id="deep", parameters=_nested_struct(32))
    assert (await next_event(watch)).ticket == deepest
    watch.cancel()


async def test_an_identical_create_with_numbers_beyond_2_to_the_53_is_idempotent(
    client: Client,
) -> None:
    # PostgreSQL writes 2**60 back as 1152921504606847000 and 1e308 as a 309-digit
    # integer: they compared unequal with the doubles sent (ALREADY_EXISTS on a retry).
    parameters = struct(big=2.0**60, huge=1e308, wide=[-(2.0**64), 12345.678, 2**53])
    request = pb.CreateTicketRequest(ticket=spec("numbers", parameters=parameters))
    first = await client.stub.CreateTicket(request, metadata=client.svc)
    again = await client.stub.CreateTicket(request, metadata=client.svc)
    assert first.created
    assert not again.created
    assert again.ticket == first.ticket
    assert (await client.get(first.ticket.ticket_id)).parameters == parameters
    batch = pb.BatchCreateTicketsRequest(tickets=[request.ticket])
    answer = await client.stub.BatchCreateTickets(batch, metadata=client.svc)
    assert answer.created_count == 0
    assert list(answer.tickets) == [first.ticket]


async def test_list_filters_and_cursor_pages(client: Client) -> None:
    await client.stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(tickets=[spec(f"t{i:02}") for i in range(25)]),
        metadata=client.svc,
    )
    await client.create(task_id="x", plan_id="plan-2")
    first = (await client.stub.ListTickets(pb.ListTicketsRequest(), metadata=client.svc)).tickets
    await client.assign(first[3], worker_id="w7")
    seen: list[str] = []
    token = ""
    while True:
        page = await client.stub.ListTickets(
            pb.ListTicketsRequest(plan_id="plan-1", page_size=10, page_token=token),
            metadata=client.svc,
        )
        seen += [t.task_id for t in page.tickets]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"t{i:02}" for i in range(25)]
    by_worker = await client.stub.ListTickets(
        pb.ListTicketsRequest(worker_id="w7"), metadata=client.svc
    )
    assert [t.task_id for t in by_worker.tickets] == ["t03"]
    assigned = await client.stub.ListTickets(
        pb.ListTicketsRequest(statuses=[S.TICKET_STATUS_ASSIGNED, S.TICKET_STATUS_RUNNING]),
        metadata=client.svc,
    )
    assert [t.task_id for t in assigned.tickets] == ["t03"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.ListTickets(
            pb.ListTicketsRequest(plan_id="plan-2", page_token=page.next_page_token or "x"),
            metadata=client.svc,
        )
    assert info.value.code() is Code.INVALID_ARGUMENT


# ---- the state machine, table-driven ---------------------------------------------------------

ASSIGN = -1  # pseudo status: the AssignTicket RPC

# (status to drive the ticket to, request) -> resulting status or the refusal code.
TRANSITIONS: list[tuple[Any, Any, Any]] = [
    (S.TICKET_STATUS_PENDING, ASSIGN, S.TICKET_STATUS_ASSIGNED),
    (S.TICKET_STATUS_PENDING, S.TICKET_STATUS_RUNNING, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_PENDING, S.TICKET_STATUS_COMPLETED, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_PENDING, S.TICKET_STATUS_FAILED, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_PENDING, S.TICKET_STATUS_CANCELLED, S.TICKET_STATUS_CANCELLED),
    (S.TICKET_STATUS_ASSIGNED, ASSIGN, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_ASSIGNED, S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_RUNNING),
    (S.TICKET_STATUS_ASSIGNED, S.TICKET_STATUS_COMPLETED, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_ASSIGNED, S.TICKET_STATUS_FAILED, S.TICKET_STATUS_FAILED),
    (S.TICKET_STATUS_ASSIGNED, S.TICKET_STATUS_CANCELLED, S.TICKET_STATUS_CANCELLED),
    (S.TICKET_STATUS_RUNNING, ASSIGN, Code.FAILED_PRECONDITION),
    (S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_COMPLETED, S.TICKET_STATUS_COMPLETED),
    (S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_FAILED, S.TICKET_STATUS_FAILED),
    (S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_CANCELLED, S.TICKET_STATUS_CANCELLED),
    *[
        (terminal, request, Code.FAILED_PRECONDITION)
        for terminal in (
            S.TICKET_STATUS_COMPLETED,
            S.TICKET_STATUS_FAILED,
            S.TICKET_STATUS_CANCELLED,
        )
        for request in (
            ASSIGN,
            S.TICKET_STATUS_RUNNING,
            S.TICKET_STATUS_COMPLETED,
            S.TICKET_STATUS_FAILED,
            S.TICKET_STATUS_CANCELLED,
        )
    ],
]


async def drive(client: Client, status: Any) -> pb.ExecutionTicket:
    """A ticket (no retries) brought to ``status`` through the public API."""
    ticket = await client.create(task_id=f"to-{status}")
    if status == S.TICKET_STATUS_PENDING:
        return ticket
    if status == S.TICKET_STATUS_CANCELLED:
        return await client.update(ticket, S.TICKET_STATUS_CANCELLED, attempt=0)
    ticket = await client.assign(ticket)
    if status == S.TICKET_STATUS_ASSIGNED:
        return ticket
    ticket = await client.update(ticket, S.TICKET_STATUS_RUNNING)
    if status == S.TICKET_STATUS_COMPLETED:
        return await client.update(ticket, S.TICKET_STATUS_COMPLETED, result=struct(ok=True))
    if status == S.TICKET_STATUS_FAILED:
        return await client.update(ticket, S.TICKET_STATUS_FAILED, error_message="boom")
    return ticket


@pytest.mark.parametrize(
    ("start", "request_", "expected"),
    TRANSITIONS,
    ids=[f"{S.Name(a)}->{'ASSIGN' if b == ASSIGN else S.Name(b)}" for a, b, _ in TRANSITIONS],
)
async def test_transition_table(client: Client, start: Any, request_: Any, expected: Any) -> None:
    ticket = await drive(client, start)
    assert ticket.status == start
    if request_ == ASSIGN:
        call = client.assign(ticket, worker_id="w2")
    else:
        # Content differs from how drive() got here, so no request is an idempotent repeat
        # (and is only what the requested status keeps).
        contents: dict[Any, dict[str, Any]] = {
            S.TICKET_STATUS_COMPLETED: {"result": struct(n=1)},
            S.TICKET_STATUS_FAILED: {"error_message": "table", "result": struct(n=1)},
            S.TICKET_STATUS_CANCELLED: {"error_message": "table"},
        }
        content = contents.get(request_, {})
        call = client.update(ticket, request_, **content)
    if isinstance(expected, Code):
        assert await code_of(call) is expected
        assert await client.get(ticket.ticket_id) == ticket  # nothing changed
        return
    after = await call
    assert after.status == expected
    assert after.version == ticket.version + 1


async def test_failure_with_retries_left_requeues_then_fails_for_good(client: Client) -> None:
    ticket = await client.assign(await client.create(max_retries=1))
    ticket = await client.update(ticket, S.TICKET_STATUS_FAILED, error_message="flaky")
    assert ticket.status == S.TICKET_STATUS_PENDING
    assert ticket.attempt == 2
    assert ticket.worker_id == ""
    assert ticket.error_message == "flaky"
    ticket = await client.assign(ticket)
    ticket = await client.update(ticket, S.TICKET_STATUS_RUNNING)
    assert ticket.HasField("started_at")
    ticket = await client.update(ticket, S.TICKET_STATUS_FAILED, error_message="again")
    assert ticket.status == S.TICKET_STATUS_FAILED
    assert ticket.HasField("completed_at")
    permanent = await client.assign(await client.create(task_id="p", max_retries=5))
    permanent = await client.update(
        permanent, S.TICKET_STATUS_FAILED, error_message="bad input", permanent=True
    )
    assert permanent.status == S.TICKET_STATUS_FAILED
    assert permanent.attempt == 1


async def test_repeated_identical_update_is_idempotent(client: Client) -> None:
    ticket = await client.update(
        await client.assign(await client.create()), S.TICKET_STATUS_RUNNING
    )
    done = await client.update(ticket, S.TICKET_STATUS_COMPLETED, result=struct(out="x"))
    again = await client.update(ticket, S.TICKET_STATUS_COMPLETED, result=struct(out="x"))
    assert again == done
    assert done.result == struct(out="x")
    assert done.HasField("completed_at")
    reassign = await client.assign(await client.create(task_id="t2"))
    assert await client.assign(reassign) == reassign


async def test_assign_tickets_applies_each_assignment_or_says_why_not(client: Client) -> None:
    a, b, c = [await client.create(task_id=t) for t in ("a", "b", "c")]
    await client.assign(c, worker_id="w9")
    unknown = "00000000-0000-4000-8000-0000000000ff"

    def item(ticket_id: str, worker_id: str, **kwargs: Any) -> pb.AssignTicketRequest:
        return pb.AssignTicketRequest(ticket_id=ticket_id, worker_id=worker_id, attempt=1, **kwargs)

    request = pb.AssignTicketsRequest(
        assignments=[
            item(a.ticket_id, "w1"),
            item(b.ticket_id, "w2", expected_version=b.version + 1),
            item(c.ticket_id, "w1"),
            item(unknown, "w1"),
        ]
    )
    response = await client.stub.AssignTickets(request, metadata=client.svc)
    first, stale, taken, missing = response.results
    assert first.error_code == 0
    assert (first.ticket.ticket_id, first.ticket.worker_id) == (a.ticket_id, "w1")
    assert first.ticket.status == S.TICKET_STATUS_ASSIGNED
    assert (stale.error_code, stale.HasField("ticket")) == (Code.ABORTED.value[0], False)
    assert taken.error_code == Code.FAILED_PRECONDITION.value[0]
    assert missing.error_code == Code.NOT_FOUND.value[0]
    assert all(r.error_message for r in (stale, taken, missing))
    # The refusals changed nothing; the assignment that held is stored.
    assert (await client.get(b.ticket_id)).status == S.TICKET_STATUS_PENDING
    assert (await client.get(c.ticket_id)).worker_id == "w9"
    assert await client.get(a.ticket_id) == first.ticket
    # Retrying the batch: the same answer for the assignment that held, no second change.
    again = await client.stub.AssignTickets(request, metadata=client.svc)
    assert again.results[0].ticket == first.ticket


async def test_an_assignment_past_the_workers_capacity_is_refused(client: Client) -> None:
    # Orchestrator replicas sharing workers each counted only their own assignments: two
    # of them filled a 4-slot worker with 8 tickets, and the queued ones timed out.
    tickets = [await client.create(task_id=f"t{n}") for n in range(6)]
    running = await client.update(
        await client.assign(tickets[0], worker_id="w1"), S.TICKET_STATUS_RUNNING
    )
    await client.assign(tickets[1], worker_id="w1")
    await client.update(await client.assign(tickets[2], worker_id="w1"), S.TICKET_STATUS_RUNNING)
    await client.update(running, S.TICKET_STATUS_COMPLETED)  # done: its slot is free

    def item(ticket: pb.ExecutionTicket, worker_id: str = "w1") -> pb.AssignTicketRequest:
        return pb.AssignTicketRequest(
            ticket_id=ticket.ticket_id, worker_id=worker_id, attempt=1, worker_capacity=3
        )

    # w1 holds 2 (one ASSIGNED, one RUNNING) of 3: one more fits, in request order.
    response = await client.stub.AssignTickets(
        pb.AssignTicketsRequest(
            assignments=[item(tickets[3]), item(tickets[4]), item(tickets[5], "w2")]
        ),
        metadata=client.svc,
    )
    fits, full, elsewhere = response.results
    assert (fits.error_code, elsewhere.error_code) == (0, 0)
    assert full.error_code == Code.RESOURCE_EXHAUSTED.value[0]
    assert full.error_message == "worker w1 holds 3 tickets, its capacity 3: no free slot"
    assert (await client.get(tickets[4].ticket_id)).status == S.TICKET_STATUS_PENDING
    # A repeated assignment holds its slot already: the same answer, not a refusal.
    again = await client.assign(tickets[3], worker_capacity=3)
    assert again == fits.ticket
    # AssignTicket checks it too.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.assign(tickets[4], worker_capacity=3)
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    # 0: not checked (as before the field existed).
    assert (await client.assign(tickets[4])).status == S.TICKET_STATUS_ASSIGNED


async def test_concurrent_assigners_never_take_one_worker_past_its_capacity(
    client: Client,
) -> None:
    tickets = [await client.create(task_id=f"c{n}") for n in range(24)]

    async def assigner(mine: list[pb.ExecutionTicket]) -> int:
        assigned = 0
        for ticket in mine:  # one call per ticket, as a busy replica's rounds
            response = await client.stub.AssignTickets(
                pb.AssignTicketsRequest(
                    assignments=[
                        pb.AssignTicketRequest(
                            ticket_id=ticket.ticket_id,
                            worker_id="shared",
                            attempt=1,
                            worker_capacity=5,
                        )
                    ]
                ),
                metadata=client.svc,
            )
            assigned += response.results[0].error_code == 0
        return assigned

    counts = await asyncio.gather(*(assigner(tickets[n::4]) for n in range(4)))
    assert sum(counts) == 5
    listing = await client.stub.ListTickets(
        pb.ListTicketsRequest(worker_id="shared", page_size=100), metadata=client.svc
    )
    assert len(listing.tickets) == 5


async def test_assign_tickets_refuses_bad_batches_whole_and_non_service_callers(
    client: Client,
) -> None:
    a = await client.create(task_id="a")
    good = pb.AssignTicketRequest(ticket_id=a.ticket_id, worker_id="w1", attempt=1)
    bad = pb.AssignTicketsRequest(
        assignments=[good, pb.AssignTicketRequest(ticket_id="x", worker_id="w1", attempt=1), good]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.AssignTickets(bad, metadata=client.svc)
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == {"assignments[1].ticket_id", "assignments[2].ticket_id"}
    assert (await client.get(a.ticket_id)).status == S.TICKET_STATUS_PENDING
    one = pb.AssignTicketsRequest(assignments=[good])
    code = await code_of(client.stub.AssignTickets(one, metadata=client.worker("w1")))
    assert code is Code.PERMISSION_DENIED
    assert (await client.get(a.ticket_id)).status == S.TICKET_STATUS_PENDING


def report(
    ticket: pb.ExecutionTicket, status: Any, token: str = "", **kwargs: Any
) -> pb.TicketStatusReport:
    update = pb.UpdateTicketStatusRequest(
        ticket_id=ticket.ticket_id, status=status, **{"attempt": ticket.attempt, **kwargs}
    )
    return pb.TicketStatusReport(update=update, ticket_token=token)


async def test_update_ticket_statuses_applies_each_report_or_says_why_not(
    client: Client,
) -> None:
    created = [await client.create(task_id=t, max_retries=1) for t in "abcdefgh"]
    a, b, c, d, e, f, g, late = [await client.assign(t) for t in created]
    tokens = {t.ticket_id: await client.ticket_token(t.ticket_id) for t in (a, b, c, d, e, g)}
    late_token = await client.ticket_token(late.ticket_id)
    late = await client.update(late, S.TICKET_STATUS_FAILED, error_message="retry")  # attempt 2
    unknown = pb.ExecutionTicket(ticket_id="00000000-0000-4000-8000-0000000000ff", attempt=1)
    unknown_token, _ = client.issuer.issue_ticket_token(
        worker_id="w1", ticket_id=unknown.ticket_id, plan_id="plan-1", attempt=1, ttl_seconds=60
    )
    request = pb.UpdateTicketStatusesRequest(
        reports=[
            report(a, S.TICKET_STATUS_RUNNING, tokens[a.ticket_id]),
            report(b, S.TICKET_STATUS_RUNNING, tokens[a.ticket_id]),  # a's token
            report(c, S.TICKET_STATUS_COMPLETED, tokens[c.ticket_id]),  # not RUNNING yet
            report(d, S.TICKET_STATUS_RUNNING, tokens[d.ticket_id], expected_version=1),
            report(e, S.TICKET_STATUS_FAILED, tokens[e.ticket_id], error_message="nul\x00"),
            report(f, S.TICKET_STATUS_RUNNING, "not-a-token"),
            report(unknown, S.TICKET_STATUS_RUNNING, unknown_token),
            report(created[7], S.TICKET_STATUS_COMPLETED, late_token),  # attempt 1: late
            report(g, S.TICKET_STATUS_RUNNING),  # no token of its own: the call's (a worker's)
        ]
    )
    watch = client.stub.WatchTickets(pb.WatchTicketsRequest(plan_id="plan-1"), metadata=client.svc)
    await watch.initial_metadata()
    response = await client.stub.UpdateTicketStatuses(request, metadata=client.worker("w1"))
    codes = [Code.OK if r.error_code == 0 else _code(r.error_code) for r in response.results]
    assert codes == [
        Code.OK,
        Code.PERMISSION_DENIED,
        Code.FAILED_PRECONDITION,
        Code.ABORTED,
        Code.INVALID_ARGUMENT,
        Code.UNAUTHENTICATED,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.PERMISSION_DENIED,
    ]
    applied, *refused = response.results
    assert all(r.error_message and not r.HasField("ticket") for r in refused)
    assert applied.ticket.status == S.TICKET_STATUS_RUNNING
    assert await client.get(a.ticket_id) == applied.ticket
    # The refusals changed nothing.
    for ticket in (b, c, d, e, f, g, late):
        assert await client.get(ticket.ticket_id) == ticket
    # The events (written in ticket id order): the update, by the worker its token names,
    # and the late result, recorded.
    events = [await next_event(watch) for _ in range(2)]
    assert {(e.type, e.ticket.ticket_id, e.actor) for e in events} == {
        (pb.TICKET_EVENT_TYPE_STATUS_CHANGED, a.ticket_id, "worker:w1"),
        (pb.TICKET_EVENT_TYPE_LATE_RESULT_REJECTED, late.ticket_id, "worker:w1"),
    }
    watch.cancel()
    # Sent again: the same answer for the update that held, without a second change.
    again = await client.stub.UpdateTicketStatuses(request, metadata=client.worker("w1"))
    assert again.results[0] == applied
    # The service token reports for any ticket without ticket tokens.
    by_service = await client.stub.UpdateTicketStatuses(
        pb.UpdateTicketStatusesRequest(
            reports=[report(b, S.TICKET_STATUS_RUNNING), report(g, S.TICKET_STATUS_CANCELLED)]
        ),
        metadata=client.svc,
    )
    assert [r.ticket.status for r in by_service.results] == [
        S.TICKET_STATUS_RUNNING,
        S.TICKET_STATUS_CANCELLED,
    ]


def _code(value: int) -> Code:
    return next(c for c in Code if c.value[0] == value)


async def test_update_ticket_statuses_refuses_bad_batches_whole(client: Client) -> None:
    ticket = await client.assign(await client.create())
    running = report(ticket, S.TICKET_STATUS_RUNNING)
    upper = pb.TicketStatusReport(
        update=pb.UpdateTicketStatusRequest(
            ticket_id=ticket.ticket_id.upper(), status=S.TICKET_STATUS_RUNNING, attempt=1
        )
    )
    cases = {
        "empty": (pb.UpdateTicketStatusesRequest(), {"reports"}),
        "too many": (pb.UpdateTicketStatusesRequest(reports=[running] * 10_001), {"reports"}),
        "a ticket twice": (
            pb.UpdateTicketStatusesRequest(reports=[running, upper]),
            {"reports[1].update.ticket_id"},
        ),
    }
    for name, (request, fields) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.UpdateTicketStatuses(request, metadata=client.svc)
        assert info.value.code() is Code.INVALID_ARGUMENT, name
        assert violations(info.value) == fields, name
    assert await client.get(ticket.ticket_id) == ticket
    unauthenticated = client.stub.UpdateTicketStatuses(
        pb.UpdateTicketStatusesRequest(reports=[running]), metadata=bearer("garbage")
    )
    assert await code_of(unauthenticated) is Code.UNAUTHENTICATED
    assert await client.get(ticket.ticket_id) == ticket


async def test_expected_version_mismatch_is_aborted(client: Client) -> None:
    ticket = await client.create()
    code = await code_of(client.assign(ticket, expected_version=ticket.version + 5))
    assert code is Code.ABORTED
    ticket = await client.assign(ticket, expected_version=ticket.version)
    code = await code_of(
        client.update(ticket, S.TICKET_STATUS_RUNNING, expected_version=ticket.version - 1)
    )
    assert code is Code.ABORTED


async def test_two_concurrent_conflicting_updates_exactly_one_wins(client: Client) -> None:
    ticket = await client.update(
        await client.assign(await client.create()), S.TICKET_STATUS_RUNNING
    )
    cases: list[dict[str, Any]] = [{}, {"expected_version": ticket.version}]
    for kwargs in cases:
        complete = client.update(ticket, S.TICKET_STATUS_COMPLETED, **kwargs)
        fail = client.update(
            ticket, S.TICKET_STATUS_FAILED, error_message="x", permanent=True, **kwargs
        )
        codes = await asyncio.gather(code_of(complete), code_of(fail))
        assert sorted(c.name for c in codes)[0] != "OK" or codes.count(Code.OK) == 1
        assert codes.count(Code.OK) == 1
        loser = next(c for c in codes if c is not Code.OK)
        assert loser in (Code.FAILED_PRECONDITION, Code.ABORTED)
        final = await client.get(ticket.ticket_id)
        assert final.version == ticket.version + 1
        winner = S.TICKET_STATUS_COMPLETED if codes[0] is Code.OK else S.TICKET_STATUS_FAILED
        assert final.status == winner
        ticket = await client.update(
            await client.assign(await client.create(task_id=f"again-{len(kwargs)}")),
            S.TICKET_STATUS_RUNNING,
        )


# ---- fencing, leases ---------------------------------------------------------------------------


async def test_attempt_fencing_rejects_and_records_late_results(
    client: Client, service: TicketService, advance_clock: Callable[[float], None]
) -> None:
    ticket = await client.assign(await client.create(max_retries=2), lease_seconds=30)
    old_token = await client.ticket_token(ticket.ticket_id)
    await client.update(ticket, S.TICKET_STATUS_RUNNING, token=old_token)
    advance_clock(ticket.timeout_seconds + 1)

    async def requeued() -> bool:
        return (await client.get(ticket.ticket_id)).attempt == 2

    await eventually(requeued, what="lease expiry re-queue")
    current = await client.get(ticket.ticket_id)
    assert current.status == S.TICKET_STATUS_PENDING
    # The old attempt's worker reports late: refused, never applied.
    for result in (struct(r=1), struct(r=1), struct(r=1), struct(r=2)):
        late = client.update(ticket, S.TICKET_STATUS_COMPLETED, token=old_token, result=result)
        assert await code_of(late) is Code.FAILED_PRECONDITION
    assert await client.get(ticket.ticket_id) == current
    late = client.update(ticket, S.TICKET_STATUS_FAILED, token=old_token, error_message="lost it")
    assert await code_of(late) is Code.FAILED_PRECONDITION
    # Recorded once per reported status: the first one. Neither a retrying worker nor a
    # stale token's holder varying the result (each up to 1 MiB) grows the log.
    async with service.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT details->>'reported_status' AS status, details->'result' AS result"
            " FROM ticket_events"
            " WHERE ticket_id = %s AND event_type = 'LATE_RESULT_REJECTED' ORDER BY seq",
            (ticket.ticket_id,),
        )
        recorded = [(row["status"], row["result"]) for row in await cur.fetchall()]
    assert recorded == [("COMPLETED", {"r": 1}), ("FAILED", None)]
    # A future attempt is refused too.
    future = client.update(current, S.TICKET_STATUS_RUNNING, attempt=3)
    assert await code_of(future) is Code.FAILED_PRECONDITION


async def _swept(client: Client, ticket: pb.ExecutionTicket) -> pb.ExecutionTicket:
    async def changed() -> bool:
        return (await client.get(ticket.ticket_id)).version > ticket.version

    await eventually(changed, what=f"lease expiry of attempt {ticket.attempt}")
    return await client.get(ticket.ticket_id)


async def test_lease_expiry_requeues_then_fails_timed_out(
    client: Client, advance_clock: Callable[[float], None]
) -> None:
    ticket = await client.create(max_retries=1, timeout_seconds=30)
    for attempt in (1, 2):
        ticket = await client.assign(ticket, lease_seconds=10)
        ticket = await client.update(ticket, S.TICKET_STATUS_RUNNING)
        assert ticket.attempt == attempt
        advance_clock(31)  # the RUNNING lease: the task's timeout
        ticket = await _swept(client, ticket)
        assert ticket.error_message == (
            "timed out: worker w1 did not report within the task's timeout (30s)"
        )
    assert ticket.status == S.TICKET_STATUS_FAILED
    assert ticket.attempt == 2
    assert ticket.lost_runs == 0
    assert not ticket.HasField("lease_expires_at")


async def test_an_assignment_never_started_is_requeued_without_using_a_retry(
    client: Client, advance_clock: Callable[[float], None]
) -> None:
    # The worker never reported RUNNING (lost, frozen): not the task's failure. It used to
    # take a retry, and with the default max_retries 0 fail the task it never ran.
    ticket = await client.create()
    for attempt in range(1, MAX_LOST_RUNS + 2):
        ticket = await client.assign(ticket, lease_seconds=10)
        advance_clock(11)
        ticket = await _swept(client, ticket)
        assert ticket.error_message == (
            "not started: worker w1 did not start it within its assignment lease"
        )
        if attempt <= MAX_LOST_RUNS:
            assert (ticket.status, ticket.attempt, ticket.lost_runs) == (
                S.TICKET_STATUS_PENDING,
                attempt + 1,
                attempt,
            )
    # Beyond MAX_LOST_RUNS it counts as an ordinary failure: no retries were left.
    assert ticket.status == S.TICKET_STATUS_FAILED
    assert ticket.lost_runs == MAX_LOST_RUNS


async def test_a_failure_reported_as_worker_lost_uses_no_retry(client: Client) -> None:
    ticket = await client.create()  # max_retries 0
    for attempt in range(1, MAX_LOST_RUNS + 2):
        ticket = await client.assign(ticket)
        ticket = await client.update(ticket, S.TICKET_STATUS_RUNNING)
        ticket = await client.update(
            ticket, S.TICKET_STATUS_FAILED, error_message="worker w1 lost", worker_lost=True
        )
        expected_status = (
            S.TICKET_STATUS_PENDING if attempt <= MAX_LOST_RUNS else S.TICKET_STATUS_FAILED
        )
        assert (ticket.status, ticket.lost_runs) == (
            expected_status,
            min(attempt, MAX_LOST_RUNS),
        )
    assert ticket.error_message == "worker w1 lost"
    # Only with FAILED.
    other = await client.create(task_id="t2")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.update(other, S.TICKET_STATUS_CANCELLED, worker_lost=True)
    assert refused.value.code() is Code.INVALID_ARGUMENT
    assert violations(refused.value) == {"worker_lost"}


# ---- tokens ------------------------------------------------------------------------------------


async def test_generate_token_only_for_assigned_tickets(client: Client) -> None:
    pending = await client.create()
    code = await code_of(
        client.stub.GenerateToken(
            pb.GenerateTokenRequest(ticket_id=pending.ticket_id), metadata=client.svc
        )
    )
    assert code is Code.FAILED_PRECONDITION
    assigned = await client.assign(pending, worker_id="w1")
    response = await client.stub.GenerateToken(
        pb.GenerateTokenRequest(ticket_id=assigned.ticket_id, ttl_seconds=120),
        metadata=client.worker("w1"),
    )
    assert response.attempt == 1
    claims = client.issuer  # same secret: verify what the service signed
    from hive_common.auth import TokenVerifier

    verified = TokenVerifier(secret=claims._key, audience="neuralhive").verify(response.token)
    assert verified.ticket_id == assigned.ticket_id
    assert verified.plan_id == "plan-1"
    assert verified.attempt == 1
    assert verified.worker_id == "w1"
    assert verified.subject == "w1"
    assert verified.jti
    assert (verified.expires_at - verified.issued_at).total_seconds() == 120
    assert response.expires_at.ToDatetime().replace(tzinfo=verified.expires_at.tzinfo) == (
        verified.expires_at
    )


@dataclass
class Scene:
    client: Client
    ticket: pb.ExecutionTicket  # assigned to w1, attempt 1
    other: pb.ExecutionTicket  # assigned to w2
    ticket_token: str


@pytest.fixture
async def scene(client: Client) -> Scene:
    ticket = await client.assign(await client.create(task_id="mine"), worker_id="w1")
    other = await client.assign(await client.create(task_id="theirs"), worker_id="w2")
    return Scene(client, ticket, other, await client.ticket_token(ticket.ticket_id, "w1"))


def _update(scene: Scene, md: Any, **overrides: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {
        "ticket_id": scene.ticket.ticket_id,
        "status": S.TICKET_STATUS_RUNNING,
        "attempt": 1,
    }
    values.update(overrides)
    return scene.client.stub.UpdateTicketStatus(pb.UpdateTicketStatusRequest(**values), metadata=md)


async def _first_event(call: Any) -> Any:
    async for item in call:
        return item
    return None


def _expired(scene: Scene) -> Any:
    issuer = scene.client.issuer
    token, _ = TokenIssuer(
        secret=issuer._key, issuer="hive-flow-c", audience="neuralhive", clock=lambda: 1_000_000.0
    ).issue_service_token(service="o", ttl_seconds=60)
    return bearer(token)


def _other_issuer(scene: Scene) -> Any:
    # Signed with the right secret, for the right audience, by an issuer not configured.
    token, _ = TokenIssuer(
        secret=scene.client.issuer._key, issuer="elsewhere", audience="neuralhive"
    ).issue_service_token(service="o", ttl_seconds=60)
    return bearer(token)


def _foreign(scene: Scene) -> Any:
    token, _ = TokenIssuer(
        secret="another-secret-that-is-long-enough-for-hs256", issuer="hive-flow-c"
    ).issue_service_token(service="o", ttl_seconds=60)
    return bearer(token)


REFUSALS: dict[str, tuple[Code, Callable[[Scene], Awaitable[Any]]]] = {
    "no token": (Code.UNAUTHENTICATED, lambda s: _update(s, ())),
    "garbage token": (Code.UNAUTHENTICATED, lambda s: _update(s, bearer("not.a.jwt"))),
    "expired token": (Code.UNAUTHENTICATED, lambda s: _update(s, _expired(s))),
    "wrong signing key": (Code.UNAUTHENTICATED, lambda s: _update(s, _foreign(s))),
    "another issuer": (Code.UNAUTHENTICATED, lambda s: _update(s, _other_issuer(s))),
    "no token on reads": (
        Code.UNAUTHENTICATED,
        lambda s: s.client.stub.GetTicket(pb.GetTicketRequest(ticket_id=s.ticket.ticket_id)),
    ),
    "worker creates": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.CreateTicket(
            pb.CreateTicketRequest(ticket=spec("w")), metadata=s.client.worker("w1")
        ),
    ),
    "worker batch-creates": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.BatchCreateTickets(
            pb.BatchCreateTicketsRequest(tickets=[spec("w")]), metadata=s.client.worker("w1")
        ),
    ),
    "worker assigns": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.AssignTicket(
            pb.AssignTicketRequest(ticket_id=s.ticket.ticket_id, worker_id="w1", attempt=1),
            metadata=s.client.worker("w1"),
        ),
    ),
    "worker token updates status": (
        Code.PERMISSION_DENIED,
        lambda s: _update(s, s.client.worker("w1")),
    ),
    "worker token for another ticket's token": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.GenerateToken(
            pb.GenerateTokenRequest(ticket_id=s.other.ticket_id), metadata=s.client.worker("w1")
        ),
    ),
    "worker watches another worker": (
        Code.PERMISSION_DENIED,
        lambda s: _first_event(
            s.client.stub.WatchTickets(
                pb.WatchTicketsRequest(worker_id="w2"), metadata=s.client.worker("w1")
            )
        ),
    ),
    "worker watches a whole plan": (
        Code.PERMISSION_DENIED,
        lambda s: _first_event(
            s.client.stub.WatchTickets(
                pb.WatchTicketsRequest(plan_id="plan-1"), metadata=s.client.worker("w1")
            )
        ),
    ),
    "ticket token for another ticket": (
        Code.PERMISSION_DENIED,
        lambda s: _update(s, bearer(s.ticket_token), ticket_id=s.other.ticket_id),
    ),
    "ticket token for another attempt": (
        Code.PERMISSION_DENIED,
        lambda s: _update(s, bearer(s.ticket_token), attempt=2),
    ),
    "ticket token cancels": (
        Code.PERMISSION_DENIED,
        lambda s: _update(s, bearer(s.ticket_token), status=S.TICKET_STATUS_CANCELLED),
    ),
    "ticket token assigns": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.AssignTicket(
            pb.AssignTicketRequest(ticket_id=s.ticket.ticket_id, worker_id="w1", attempt=1),
            metadata=bearer(s.ticket_token),
        ),
    ),
    "ticket token mints tokens": (
        Code.PERMISSION_DENIED,
        lambda s: s.client.stub.GenerateToken(
            pb.GenerateTokenRequest(ticket_id=s.ticket.ticket_id), metadata=bearer(s.ticket_token)
        ),
    ),
    "ticket token watches": (
        Code.PERMISSION_DENIED,
        lambda s: _first_event(
            s.client.stub.WatchTickets(
                pb.WatchTicketsRequest(worker_id="w1"), metadata=bearer(s.ticket_token)
            )
        ),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_token_refusals(scene: Scene, case: str) -> None:
    expected, make_call = REFUSALS[case]
    assert await code_of(make_call(scene)) is expected
    # Refused calls change nothing.
    assert await scene.client.get(scene.ticket.ticket_id) == scene.ticket


async def test_tokens_that_are_allowed(scene: Scene) -> None:
    client = scene.client
    worker_md = client.worker("w1")
    got = await client.stub.GetTicket(
        pb.GetTicketRequest(ticket_id=scene.ticket.ticket_id), metadata=worker_md
    )
    assert got.ticket == scene.ticket
    listed = await client.stub.ListTickets(
        pb.ListTicketsRequest(), metadata=bearer(scene.ticket_token)
    )
    assert len(listed.tickets) == 2
    running = await _update(scene, bearer(scene.ticket_token))
    assert running.ticket.status == S.TICKET_STATUS_RUNNING
    assert running.ticket.worker_id == "w1"


# ---- watch ---------------------------------------------------------------------------------------


async def test_worker_watch_sees_its_assignments_and_resumes_from_cursor(client: Client) -> None:
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id="w1"), metadata=client.worker("w1")
    )
    # Wait until the stream is established before producing events.
    await stream.initial_metadata()
    first = await client.assign(await client.create(task_id="a"), worker_id="w1")
    await client.assign(await client.create(task_id="b"), worker_id="w2")
    event = await next_event(stream)
    assert event.type == pb.TICKET_EVENT_TYPE_ASSIGNED
    assert event.ticket.ticket_id == first.ticket_id
    assert event.previous_status == S.TICKET_STATUS_PENDING
    assert event.actor == "service:orchestrator-dynamic"
    assert not event.HasField("ticket_token")  # not asked for
    stream.cancel()

    # Changes while disconnected are delivered after reconnecting with the cursor.
    token = await client.ticket_token(first.ticket_id)
    await client.update(first, S.TICKET_STATUS_RUNNING, token=token)
    second = await client.assign(await client.create(task_id="c"), worker_id="w1")
    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id="w1", cursor=event.cursor), metadata=client.worker("w1")
    )
    a = await next_event(resumed)
    b = await next_event(resumed)
    assert (a.type, a.ticket.ticket_id, a.actor) == (
        pb.TICKET_EVENT_TYPE_STATUS_CHANGED,
        first.ticket_id,
        "worker:w1",
    )
    assert (b.type, b.ticket.ticket_id) == (pb.TICKET_EVENT_TYPE_ASSIGNED, second.ticket_id)
    resumed.cancel()


async def test_a_worker_id_that_is_a_uuid_is_one_worker_in_any_case(client: Client) -> None:
    # The registry's worker ids are UUIDs, accepted in any case there: an upper-case one
    # was stored as sent, and listings, filters and watches in lower case missed it.
    worker_id = "5f0c1b9e-6a7d-4c2b-9e8f-0a1b2c3d4e5f"
    upper = worker_id.upper()
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id=upper), metadata=client.worker(worker_id)
    )
    await stream.initial_metadata()
    ticket = await client.assign(await client.create(task_id="u"), worker_id=upper)
    assert ticket.worker_id == worker_id
    event = await next_event(stream)
    assert event.ticket.ticket_id == ticket.ticket_id
    stream.cancel()
    for asked in (worker_id, upper):
        listed = await client.stub.ListTickets(
            pb.ListTicketsRequest(worker_id=asked), metadata=client.svc
        )
        assert [t.ticket_id for t in listed.tickets] == [ticket.ticket_id]


async def test_a_worker_watch_can_deliver_each_assignment_with_its_ticket_token(
    client: Client,
) -> None:
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id="w1", include_ticket_tokens=True),
        metadata=client.worker("w1"),
    )
    await stream.initial_metadata()
    mine = await client.assign(await client.create(task_id="a"), worker_id="w1")
    other = await client.assign(await client.create(task_id="b"), worker_id="w2")
    event = await next_event(stream)
    assert (event.type, event.ticket.ticket_id) == (pb.TICKET_EVENT_TYPE_ASSIGNED, mine.ticket_id)
    token = event.ticket_token
    assert token.token
    assert token.attempt == mine.attempt == 1
    assert token.expires_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC)
    # The token is a ticket token for this ticket and attempt, as GenerateToken's would be.
    assert await code_of(client.update(other, S.TICKET_STATUS_RUNNING, token=token.token)) is (
        Code.PERMISSION_DENIED
    )
    running = await client.update(mine, S.TICKET_STATUS_RUNNING, token=token.token)
    assert running.status == S.TICKET_STATUS_RUNNING
    changed = await next_event(stream)
    assert changed.type == pb.TICKET_EVENT_TYPE_STATUS_CHANGED
    assert not changed.HasField("ticket_token")  # only events that hand over a ticket
    stream.cancel()

    # A snapshot hands over every ticket the worker holds, each with its token.
    queued = await client.assign(await client.create(task_id="c"), worker_id="w1")
    snapshot = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id="w1", include_snapshot=True, include_ticket_tokens=True),
        metadata=client.worker("w1"),
    )
    held = {}
    for _ in range(2):
        e = await next_event(snapshot)
        assert e.type == pb.TICKET_EVENT_TYPE_SNAPSHOT
        held[e.ticket.ticket_id] = e.ticket_token
    snapshot.cancel()
    assert set(held) == {mine.ticket_id, queued.ticket_id}
    done = await client.update(running, S.TICKET_STATUS_COMPLETED, token=held[mine.ticket_id].token)
    assert done.status == S.TICKET_STATUS_COMPLETED


async def test_a_watch_can_skip_the_changes_its_caller_made(client: Client) -> None:
    # The worker's stream skips its own reports, the service's stream its own creates and
    # assignments; everyone else's changes still arrive, in order.
    worker_stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(worker_id="w1", exclude_own_changes=True),
        metadata=client.worker("w1"),
    )
    service_stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", exclude_own_changes=True),
        metadata=client.svc,
    )
    await worker_stream.initial_metadata()
    await service_stream.initial_metadata()
    first = await client.assign(await client.create(task_id="a"), worker_id="w1")
    token = await client.ticket_token(first.ticket_id)
    running = await client.update(first, S.TICKET_STATUS_RUNNING, token=token)
    await client.update(running, S.TICKET_STATUS_COMPLETED, token=token)
    second = await client.assign(await client.create(task_id="b"), worker_id="w1")
    cancelled = await client.update(second, S.TICKET_STATUS_CANCELLED, attempt=0)

    seen = [await next_event(worker_stream) for _ in range(3)]
    assert [(e.type, e.ticket.ticket_id, e.actor) for e in seen] == [
        (pb.TICKET_EVENT_TYPE_ASSIGNED, first.ticket_id, "service:orchestrator-dynamic"),
        (pb.TICKET_EVENT_TYPE_ASSIGNED, second.ticket_id, "service:orchestrator-dynamic"),
        (pb.TICKET_EVENT_TYPE_STATUS_CHANGED, second.ticket_id, "service:orchestrator-dynamic"),
    ]
    assert seen[-1].ticket == cancelled
    # One more change by the worker: the next event on the service's stream after the
    # worker's first two, so the service's own cancel in between was skipped.
    third = await client.assign(await client.create(task_id="c"), worker_id="w1")
    await client.update(
        third, S.TICKET_STATUS_RUNNING, token=await client.ticket_token(third.ticket_id)
    )
    seen = [await next_event(service_stream) for _ in range(3)]
    assert [(e.ticket.ticket_id, e.ticket.status, e.actor) for e in seen] == [
        (first.ticket_id, S.TICKET_STATUS_RUNNING, "worker:w1"),
        (first.ticket_id, S.TICKET_STATUS_COMPLETED, "worker:w1"),
        (third.ticket_id, S.TICKET_STATUS_RUNNING, "worker:w1"),
    ]
    worker_stream.cancel()
    service_stream.cancel()


async def watch_cursor_of(stream: Any) -> str:
    metadata = await stream.initial_metadata()
    cursors = [value for key, value in metadata if key == "x-watch-cursor"]
    assert len(cursors) == 1, metadata
    assert isinstance(cursors[0], str)
    assert cursors[0]
    return cursors[0]


async def test_a_cursor_ahead_of_the_event_log_is_refused(client: Client) -> None:
    # A forged cursor, or one from another database: the stream used to open and stay
    # silent for ever.
    ahead = encode_cursor(Cursor(xid=2**62, seq=0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _first_event(
            client.stub.WatchTickets(pb.WatchTicketsRequest(cursor=ahead), metadata=client.svc)
        )
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == {"cursor"}


async def test_a_cursor_in_a_snapshot_is_refused_by_a_watch_of_other_filters(
    client: Client,
) -> None:
    # It names the last ticket of *that* snapshot: another plan's watch resumed from it
    # sent nothing of its own snapshot.
    for plan in ("plan-x", "plan-y"):
        for task in ("a", "b"):
            await client.create(task_id=task, plan_id=plan)
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-y", include_snapshot=True), metadata=client.svc
    )
    first = await next_event(stream)
    stream.cancel()
    assert first.type == pb.TICKET_EVENT_TYPE_SNAPSHOT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _first_event(
            client.stub.WatchTickets(
                pb.WatchTicketsRequest(plan_id="plan-x", cursor=first.cursor), metadata=client.svc
            )
        )
    assert info.value.code() is Code.INVALID_ARGUMENT
    assert violations(info.value) == {"cursor"}
    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-y", cursor=first.cursor), metadata=client.svc
    )
    rest = await next_event(resumed)  # the same watch resumes with the rest of its snapshot
    assert (rest.type, rest.ticket.plan_id, rest.ticket.task_id) == (
        pb.TICKET_EVENT_TYPE_SNAPSHOT,
        "plan-y",
        "b",
    )
    resumed.cancel()


async def test_a_watch_dropped_before_its_first_event_resumes_from_its_header_cursor(
    client: Client,
) -> None:
    stream = client.stub.WatchTickets(pb.WatchTicketsRequest(plan_id="plan-w"), metadata=client.svc)
    start = await watch_cursor_of(stream)
    stream.cancel()  # dropped before any event: the header is all the client has
    created = await client.create(task_id="while-away", plan_id="plan-w")
    await client.create(task_id="other-plan", plan_id="plan-x")
    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-w", cursor=start), metadata=client.svc
    )
    assert await watch_cursor_of(resumed) == start  # a resumed stream echoes its cursor
    event = await next_event(resumed)
    assert (event.type, event.ticket.ticket_id) == (pb.TICKET_EVENT_TYPE_CREATED, created.ticket_id)
    resumed.cancel()


async def test_a_snapshot_watch_dropped_before_its_first_event_resumes_from_its_header(
    client: Client,
) -> None:
    waiting = await client.create(task_id="waiting")
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", include_snapshot=True), metadata=client.svc
    )
    start = await watch_cursor_of(stream)
    stream.cancel()
    # The header cursor resumes with the snapshot (as it is now), then the changes.
    later = await client.create(task_id="later")
    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", cursor=start), metadata=client.svc
    )
    first, second = await next_event(resumed), await next_event(resumed)
    assert [(e.type, e.ticket.ticket_id) for e in (first, second)] == [
        (pb.TICKET_EVENT_TYPE_SNAPSHOT, waiting.ticket_id),
        (pb.TICKET_EVENT_TYPE_SNAPSHOT, later.ticket_id),
    ]
    # At least once: the creation of "later" after the snapshot's position follows.
    created = await next_event(resumed)
    assert (created.type, created.ticket.ticket_id) == (
        pb.TICKET_EVENT_TYPE_CREATED,
        later.ticket_id,
    )
    resumed.cancel()


async def test_a_watch_dropped_in_the_middle_of_its_snapshot_gets_the_rest_of_it(
    client: Client,
) -> None:
    tickets = [await client.create(task_id=f"t{i}") for i in range(4)]
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", include_snapshot=True), metadata=client.svc
    )
    first, second = await next_event(stream), await next_event(stream)
    stream.cancel()
    assert [e.ticket.ticket_id for e in (first, second)] == [t.ticket_id for t in tickets[:2]]
    # Meanwhile one of the rest is assigned and one reaches a terminal status.
    assigned = await client.assign(tickets[2])
    await client.update(tickets[3], S.TICKET_STATUS_CANCELLED, attempt=0)

    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", cursor=second.cursor), metadata=client.svc
    )
    rest = await next_event(resumed)
    # The rest of the snapshot as the tickets are now (the cancelled one is not in it),
    assert (rest.type, rest.ticket.ticket_id, rest.ticket.status) == (
        pb.TICKET_EVENT_TYPE_SNAPSHOT,
        assigned.ticket_id,
        S.TICKET_STATUS_ASSIGNED,
    )
    # then every change after the snapshot's position: nothing is lost.
    changes = [await next_event(resumed) for _ in range(2)]
    assert [(e.type, e.ticket.ticket_id) for e in changes] == [
        (pb.TICKET_EVENT_TYPE_ASSIGNED, tickets[2].ticket_id),
        (pb.TICKET_EVENT_TYPE_STATUS_CHANGED, tickets[3].ticket_id),
    ]
    assert changes[1].ticket.status == S.TICKET_STATUS_CANCELLED
    resumed.cancel()


async def test_a_snapshot_is_read_a_page_at_a_time(
    client: Client, service: TicketService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All unfinished tickets were read at once: ~26,000 took a gigabyte per stream.
    tickets = [await client.create(task_id=f"t{i}") for i in range(5)]
    service.servicer._watch = replace(service.servicer._watch, batch_size=2)
    pages: list[int] = []
    read = service.repository.snapshot

    async def counted(*args: Any, **kwargs: Any) -> Any:
        cursor, page = await read(*args, **kwargs)
        pages.append(len(page))
        return cursor, page

    monkeypatch.setattr(service.repository, "snapshot", counted)
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", include_snapshot=True), metadata=client.svc
    )
    events = [await next_event(stream) for _ in tickets]
    stream.cancel()
    assert [e.ticket.ticket_id for e in events] == [t.ticket_id for t in tickets]
    assert {e.type for e in events} == {pb.TICKET_EVENT_TYPE_SNAPSHOT}
    assert pages == [2, 2, 1]


async def test_watch_snapshot_then_changes_by_plan(client: Client) -> None:
    done = await client.create(task_id="done")
    await client.update(done, S.TICKET_STATUS_CANCELLED, attempt=0)
    waiting = await client.create(task_id="waiting")
    await client.create(task_id="elsewhere", plan_id="plan-2")
    stream = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-1", include_snapshot=True), metadata=client.svc
    )
    snap = await next_event(stream)
    assert snap.type == pb.TICKET_EVENT_TYPE_SNAPSHOT
    assert snap.ticket.ticket_id == waiting.ticket_id
    await client.assign(waiting)
    # At least once: events racing the snapshot may repeat; skip up to the change we made.
    while True:
        event = await next_event(stream)
        if event.type == pb.TICKET_EVENT_TYPE_ASSIGNED:
            break
        assert event.ticket.plan_id == "plan-1"
    assert event.ticket.ticket_id == waiting.ticket_id
    stream.cancel()


async def test_a_stalled_watcher_does_not_hold_back_others(client: Client) -> None:
    stalled = client.stub.WatchTickets(pb.WatchTicketsRequest(), metadata=client.svc)
    await stalled.initial_metadata()
    live = client.stub.WatchTickets(pb.WatchTicketsRequest(plan_id="plan-9"), metadata=client.svc)
    await live.initial_metadata()
    # Far more events than fit in the stalled stream's flow-control window.
    await client.stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(
            tickets=[spec(f"n{i}", parameters=struct(pad="x" * 500)) for i in range(2000)]
        ),
        metadata=client.svc,
    )
    marker = await client.create(task_id="marker", plan_id="plan-9")
    event = await next_event(live)
    assert event.ticket.ticket_id == marker.ticket_id
    live.cancel()
    # The stalled subscriber still gets everything, in order, once it reads again.
    # (It is drained before cancelling: cancelling a stream blocked in a write crashes
    # grpc in hive_common's logging interceptor, see the service README.)
    seen = [(await next_event(stalled)).ticket.task_id for _ in range(2001)]
    assert seen == [*(f"n{i}" for i in range(2000)), "marker"]
    stalled.cancel()


async def test_a_batched_watch_sends_the_same_events_several_to_a_message(
    client: Client,
) -> None:
    plain = client.stub.WatchTickets(pb.WatchTicketsRequest(plan_id="plan-b"), metadata=client.svc)
    start = await watch_cursor_of(plain)
    small = [spec(f"s{i}", plan_id="plan-b") for i in range(150)]
    large = [spec(f"l{i}", plan_id="plan-b") for i in range(30)]
    for tickets in (small, large):
        response = await client.stub.BatchCreateTickets(
            pb.BatchCreateTicketsRequest(tickets=tickets), metadata=client.svc
        )
    # ~3 MiB of events: 30 results of 100 KB, more than one message may carry.
    for ticket in response.tickets:
        running = await client.update(await client.assign(ticket), S.TICKET_STATUS_RUNNING)
        await client.update(running, S.TICKET_STATUS_COMPLETED, result=struct(pad="x" * 100_000))
    count = 150 + 4 * 30
    expected = [await next_event(plain) for _ in range(count)]
    plain.cancel()

    async def read_batches(stream: Any, count: int) -> list[list[pb.TicketEvent]]:
        messages: list[list[pb.TicketEvent]] = []
        while sum(map(len, messages)) < count:
            response = await stream.read()
            assert not response.HasField("event")
            messages.append(list(response.events))
        return messages

    # From the same start, with every event already written: read in large chunks.
    batched = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-b", cursor=start, batch_events=True),
        metadata=client.svc,
    )
    messages = await read_batches(batched, count)
    batched.cancel()
    # The same events, cursors and order as one per message,
    assert [e for m in messages for e in m] == expected
    # several to a message, within the count and size bounds (one larger event goes alone).
    assert max(map(len, messages)) == WATCH_BATCH_EVENTS
    for message in messages:
        assert len(message) <= WATCH_BATCH_EVENTS
        assert len(message) == 1 or sum(e.ByteSize() for e in message) <= WATCH_BATCH_BYTES
    with_results = [m for m in messages if any(e.ticket.HasField("result") for e in m)]
    assert len(with_results) >= 3

    # A snapshot is batched the same way; resuming from an event in the middle of a
    # message sends the rest of the snapshot.
    snapshot = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-b", include_snapshot=True, batch_events=True),
        metadata=client.svc,
    )
    first = (await read_batches(snapshot, 1))[0]
    snapshot.cancel()
    assert len(first) == WATCH_BATCH_EVENTS
    assert {e.type for e in first} == {pb.TICKET_EVENT_TYPE_SNAPSHOT}
    resumed = client.stub.WatchTickets(
        pb.WatchTicketsRequest(plan_id="plan-b", cursor=first[49].cursor, batch_events=True),
        metadata=client.svc,
    )
    rest = [e for m in await read_batches(resumed, 100) for e in m]
    resumed.cancel()
    # Every ticket not COMPLETED (the 150 small ones), in creation order.
    assert [e.ticket.task_id for e in first[:50] + rest] == [t.task_id for t in small]


# ---- health and reflection -----------------------------------------------------------------


async def test_reflection_lists_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert "neuralhive.ticket.v1.TicketService" in names
        assert "grpc.health.v1.Health" in names
        break


async def test_health_is_serving_only_while_ready(
    service: TicketService, channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    async def status_is(expected: int) -> bool:
        names = ("", "neuralhive.ticket.v1.TicketService")
        for name in names:
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            if response.status != expected:
                return False
        return True

    await eventually(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), what="SERVING")
    # Take the schema away (as if migrations were missing): readiness is down.
    pool = service.pool
    async with pool.connection() as conn:
        await conn.execute("ALTER TABLE tickets RENAME TO tickets_hidden")
    await eventually(
        lambda: status_is(health_pb2.HealthCheckResponse.NOT_SERVING), what="NOT_SERVING"
    )
    async with pool.connection() as conn:
        await conn.execute("ALTER TABLE tickets_hidden RENAME TO tickets")
    await eventually(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), what="SERVING")


async def test_stop_ends_watch_streams_instead_of_waiting_for_the_grace(
    client: Client, service: TicketService
) -> None:
    stream = client.stub.WatchTickets(pb.WatchTicketsRequest(), metadata=client.svc)
    await stream.initial_metadata()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await service.stop(30)
    assert await stream.read() is grpc.aio.EOF
    assert await stream.code() is Code.OK
    # Far below the 30 s grace: the stream ended because of the drain, not the deadline.
    assert loop.time() - started < 15


async def test_stop_does_not_wait_forever_for_a_background_loop(service: TicketService) -> None:
    release = asyncio.Event()
    cancels = 0

    async def stubborn() -> None:
        # What a loop that lost its cancellation looks like from stop()'s side.
        nonlocal cancels
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels += 1

    task = asyncio.create_task(stubborn())
    service.tasks.append(task)
    service.task_stop_timeout = 0.2
    try:
        await service.stop(0.5)
        assert cancels == 1
        assert not task.done()
        # The other loops did stop, and the pools were closed regardless.
        assert all(t.done() for t in service.tasks if t is not task)
        assert service.pool.closed
    finally:
        release.set()
        await task


async def test_run_until_signal_stops_everything_when_a_server_dies(
    settings: Any, clock: Any
) -> None:
    built = await build_service(settings, clock=clock)
    running = asyncio.create_task(built.run_until_signal())
    try:
        await eventually(
            lambda: _true(built.runtime.started and len(built.tasks) == 5), what="started"
        )
        assert built.runtime.grpc_server is not None
        await built.runtime.grpc_server.server.stop(0)  # dies without being asked to
        with pytest.raises(ServerStoppedUnexpectedly):
            async with asyncio.timeout(30):  # a hang guard, not a timing assertion
                await running
        assert not built.runtime.started
        assert all(task.done() for task in built.tasks)
        assert built.pool.closed
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        await built.stop(0)


async def _true(value: bool) -> bool:
    return value


async def test_tokens_of_the_accepted_secret_are_valid_during_a_rotation(
    settings: Any, clock: Any
) -> None:
    # Rotating the shared secret: every service accepts the old and the new one for a
    # while, so tokens signed with either work whichever replica restarted first.
    rotating = settings.model_copy(
        update={"jwt_accepted_secret": SecretStr("the-next-secret-being-rotated-in-0123456")}
    )
    built = await build_service(rotating, clock=clock)
    await built.start()

    def token(secret: str) -> tuple[tuple[str, str]]:
        issuer = TokenIssuer(
            secret=secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )
        value, _ = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=60)
        return (("authorization", f"Bearer {value}"),)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{built.runtime.grpc_port}") as ch:
            stub = pb_grpc.TicketServiceStub(ch)
            current = settings.jwt_secret.get_secret_value()
            for secret in (current, "the-next-secret-being-rotated-in-0123456"):
                await stub.ListTickets(pb.ListTicketsRequest(), metadata=token(secret))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListTickets(
                    pb.ListTicketsRequest(), metadata=token("some-other-secret-0123456789abcdef")
                )
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "signature is invalid" in (refused.value.details() or "")
    finally:
        await built.stop(0)


async def test_a_cursor_older_than_the_event_retention_is_refused(
    settings: Any, clock: Any, service_token: str
) -> None:
    # Events older than EVENT_RETENTION_HOURS are purged once relayed: a stream resumed
    # from before them used to go on without them, silently.
    small_window = settings.model_copy(update={"watch_window_events": 1})
    built = await build_service(small_window, clock=clock)
    await built.start()
    svc = bearer(service_token)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{built.runtime.grpc_port}") as ch:
            stub = pb_grpc.TicketServiceStub(ch)
            for task in ("s0", "s1"):
                await stub.CreateTicket(
                    pb.CreateTicketRequest(ticket=spec(plan_id="p-old", task_id=task)),
                    metadata=svc,
                )
            snapshot = stub.WatchTickets(
                pb.WatchTicketsRequest(plan_id="p-old", include_snapshot=True), metadata=svc
            )
            in_snapshot = (await next_event(snapshot)).cursor  # s1 is still to come
            snapshot.cancel()
            stream = stub.WatchTickets(pb.WatchTicketsRequest(plan_id="p-old"), metadata=svc)
            before = await watch_cursor_of(stream)
            await stub.CreateTicket(
                pb.CreateTicketRequest(ticket=spec(plan_id="p-old", task_id="a")), metadata=svc
            )
            old = await next_event(stream)
            stream.cancel()
            clock.advance(settings.event_retention_hours * 3600 + 60)
            recent = await stub.CreateTicket(
                pb.CreateTicketRequest(ticket=spec(plan_id="p-old", task_id="b")), metadata=svc
            )

            start = decode_cursor(before, Violations())
            assert start is not None

            async def purged() -> bool:  # "a"'s event, once the relay has delivered it
                await built.purger.purge_once()
                try:
                    await built.repository.check_resumable(start)
                except CursorPurged:
                    return True
                return False

            await eventually(purged, what="the old event purged")

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _first_event(
                    stub.WatchTickets(
                        pb.WatchTicketsRequest(plan_id="p-old", cursor=before), metadata=svc
                    )
                )
            assert info.value.code() is Code.INVALID_ARGUMENT
            assert violations(info.value) == {"cursor"}
            assert "older than the event retention" in str(rich_status_of(info.value))
            # A cursor in the middle of a snapshot too, before any of the snapshot's rest.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _first_event(
                    stub.WatchTickets(
                        pb.WatchTicketsRequest(plan_id="p-old", cursor=in_snapshot), metadata=svc
                    )
                )
            assert info.value.code() is Code.INVALID_ARGUMENT
            # From the old event's own cursor nothing was deleted: the stream goes on.
            resumed = stub.WatchTickets(
                pb.WatchTicketsRequest(plan_id="p-old", cursor=old.cursor), metadata=svc
            )
            event = await next_event(resumed)
            assert event.ticket.ticket_id == recent.ticket.ticket_id
            resumed.cancel()
    finally:
        await built.stop(0)
