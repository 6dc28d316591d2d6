"""Tickets whose parameters are large: no answer may exceed what one gRPC message holds
(4 MiB by default, the server's send limit and a default client's receive limit)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

from execution_ticket_service.app import TicketService
from execution_ticket_service.config import TicketSettings
from execution_ticket_service.transport.grpc.servicer import NEW_TICKET_EXTRA_BYTES
from hive_common.grpc_errors import rich_status_of
from hive_common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    Stub = pb_grpc.TicketServiceAsyncStub

pytestmark = pytest.mark.service

TICKETS = 100
BLOB = 50_000  # bytes of parameters per ticket: 100 of them are ~5 MB


@pytest.fixture
def settings(settings: TicketSettings) -> TicketSettings:
    return settings.model_copy(update={"max_parameters_bytes": 64 * 1024})


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def large_spec(n: int) -> pb.TicketSpec:
    parameters = struct_pb2.Struct()
    parameters.update({"blob": "x" * BLOB, "n": n})
    return pb.TicketSpec(plan_id="big", task_id=f"t{n:03}", task_type="echo", parameters=parameters)


async def create_large_tickets(stub: Stub, service_token: str) -> list[pb.ExecutionTicket]:
    created: list[pb.ExecutionTicket] = []
    for start in range(0, TICKETS, 20):  # ~1 MB per call
        response = await stub.BatchCreateTickets(
            pb.BatchCreateTicketsRequest(tickets=[large_spec(n) for n in range(start, start + 20)]),
            metadata=bearer(service_token),
        )
        created += response.tickets
    return created


async def test_list_tickets_pages_stay_within_a_message_and_hold_every_ticket_once(
    stub: Stub, service_token: str
) -> None:
    created = await create_large_tickets(stub, service_token)
    pages: list[pb.ListTicketsResponse] = []
    token = ""
    while True:  # the default page size (100) asks for every ticket in one page
        page = await stub.ListTickets(
            pb.ListTicketsRequest(plan_id="big", page_token=token),
            metadata=bearer(service_token),
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    listed = [t.ticket_id for page in pages for t in page.tickets]
    assert listed == [t.ticket_id for t in created]  # each once, in creation order
    assert len(pages) > 1
    assert all(page.tickets for page in pages)
    assert max(page.ByteSize() for page in pages) < DEFAULT_MAX_MESSAGE_BYTES


async def test_the_http_listing_is_paged_by_size_too(
    service: TicketService, stub: Stub, service_token: str
) -> None:
    created = await create_large_tickets(stub, service_token)
    pages: list[list[str]] = []
    token = ""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}",
        headers={"authorization": f"Bearer {service_token}"},
    ) as http:
        while True:
            response = await http.get(
                "/api/v1/tickets", params={"plan_id": "big", "page_token": token}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            pages.append([t["ticket_id"] for t in body["tickets"]])
            assert len(response.content) < DEFAULT_MAX_MESSAGE_BYTES
            token = body["next_page_token"]
            if not token:
                break
    assert [ticket_id for page in pages for ticket_id in page] == [t.ticket_id for t in created]
    assert len(pages) > 1


async def test_a_batch_create_whose_answer_would_not_fit_is_refused_up_front(
    stub: Stub, service_token: str
) -> None:
    # ~3.9 MB of specs (under the 4 MiB the server receives); the answer adds each ticket's
    # id, status, version and timestamps, so it could not be sent.
    specs = [
        pb.TicketSpec(plan_id="many", task_id=f"t{n:05}", task_type="echo", description="d" * 370)
        for n in range(10_000)
    ]
    request = pb.BatchCreateTicketsRequest(tickets=specs)
    assert request.ByteSize() < DEFAULT_MAX_MESSAGE_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.BatchCreateTickets(request, metadata=bearer(service_token))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "fewer tickets per call" in (info.value.details() or "")
    listed = await stub.ListTickets(
        pb.ListTicketsRequest(plan_id="many"), metadata=bearer(service_token)
    )
    assert not listed.tickets  # nothing was written


async def test_a_new_ticket_adds_at_most_the_bytes_reckoned_with_to_its_spec(
    stub: Stub, service_token: str
) -> None:
    # Defaults filled in (priority, timeout) and an intent id written without hyphens
    # (stored in its canonical form) make a ticket longest beyond its spec.
    request = pb.BatchCreateTicketsRequest(
        tickets=[
            pb.TicketSpec(
                plan_id="extra", task_id=f"t{n}", task_type="e", intent_id=uuid.uuid4().hex
            )
            for n in range(50)
        ]
    )
    response = await stub.BatchCreateTickets(request, metadata=bearer(service_token))
    assert response.ByteSize() <= request.ByteSize() + 50 * NEW_TICKET_EXTRA_BYTES


async def test_an_answer_too_large_to_send_is_a_clear_resource_exhausted(
    stub: Stub, service_token: str
) -> None:
    created = await create_large_tickets(stub, service_token)
    assignments = [
        pb.AssignTicketRequest(ticket_id=t.ticket_id, worker_id="w1", attempt=1) for t in created
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AssignTickets(
            pb.AssignTicketsRequest(assignments=assignments), metadata=bearer(service_token)
        )
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fewer per call" in (info.value.details() or "")
    # The assignments stand (the call is idempotent): repeated in smaller calls, each
    # answers with its ticket.
    for start in range(0, TICKETS, 25):
        response = await stub.AssignTickets(
            pb.AssignTicketsRequest(assignments=assignments[start : start + 25]),
            metadata=bearer(service_token),
        )
        assert [r.ticket.status for r in response.results] == [pb.TICKET_STATUS_ASSIGNED] * 25


async def test_a_result_of_small_numbers_is_bounded_as_protobuf_too(
    stub: Stub, service_token: str
) -> None:
    # Within MAX_RESULT_BYTES as JSON (each "0," two bytes), 5.5 times that as a Struct:
    # a ticket holding it could not be sent by any answer.
    [ticket] = (
        await stub.BatchCreateTickets(
            pb.BatchCreateTicketsRequest(tickets=[large_spec(0)]), metadata=bearer(service_token)
        )
    ).tickets
    await stub.AssignTicket(
        pb.AssignTicketRequest(ticket_id=ticket.ticket_id, worker_id="w1", attempt=1),
        metadata=bearer(service_token),
    )

    def report(status: pb.TicketStatus.ValueType, zeros: int = 0) -> pb.UpdateTicketStatusRequest:
        request = pb.UpdateTicketStatusRequest(ticket_id=ticket.ticket_id, status=status, attempt=1)
        if zeros:
            request.result.update({"r": [0] * zeros})
        return request

    await stub.UpdateTicketStatus(report(pb.TICKET_STATUS_RUNNING), metadata=bearer(service_token))
    too_many = report(pb.TICKET_STATUS_COMPLETED, 300_000)  # 600 KB as JSON, 3.3 MB as Struct
    assert too_many.ByteSize() < DEFAULT_MAX_MESSAGE_BYTES  # it arrives
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateTicketStatus(too_many, metadata=bearer(service_token))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes as a protobuf Struct, at most 2,883,584" in str(rich_status_of(info.value))
    fits = report(pb.TICKET_STATUS_COMPLETED, 250_000)  # 2.75 MB as Struct
    await stub.UpdateTicketStatus(fits, metadata=bearer(service_token))
    stored = await stub.GetTicket(
        pb.GetTicketRequest(ticket_id=ticket.ticket_id), metadata=bearer(service_token)
    )
    assert len(stored.ticket.result.fields["r"].list_value.values) == 250_000
    assert stored.ByteSize() < DEFAULT_MAX_MESSAGE_BYTES
