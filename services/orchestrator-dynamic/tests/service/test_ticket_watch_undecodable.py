"""One ticket event the orchestrator cannot decode does not stop its ticket watch.

protobuf refuses to decode messages nested deeper than 100 levels; a ticket whose
``parameters`` nest ~33 objects makes every WatchTicketsResponse carrying it undecodable,
and resuming from the cursor before it meets it again, forever. Here the orchestrator's
WatchTickets calls use a response deserializer that refuses (as upb does, raising
``DecodeError``) every message carrying a ticket of the plan ``poison``; everything else,
grpc's handling of the failure and the hive client included, is the real thing against
the real ticket service.

``RESYNC_INTERVAL_SECONDS`` is an hour, so the periodic resync cannot be what makes the
test pass.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf.message import DecodeError

from hive_common.clients import TicketClient, TicketWatch
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.engine.health import TICKET_SERVICE, DependencyHealth

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service

AN_HOUR = 3600.0
SEEN_WITHIN_SECONDS = 30.0
POISON_PLAN = "poison"
WATCH_METHOD = "/neuralhive.ticket.v1.TicketService/WatchTickets"


class PoisonedWatches:
    """Patches ``TicketClient.watch_tickets``: every watch decodes its messages with a
    deserializer that fails on a ticket of :data:`POISON_PLAN`; records the cursor each
    watch was opened with, the poisoned reads, the listings per plan and every health
    failure reported."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.watches: list[tuple[str, TicketWatch]] = []
        self.poisoned_reads = 0
        self.listings: dict[str, int] = {}
        self.health_failures: list[tuple[str, str]] = []
        watch_tickets = TicketClient.watch_tickets
        list_tickets = TicketClient.list_tickets
        health_failed = DependencyHealth.failed

        def deserialize(data: bytes) -> ticket_pb.WatchTicketsResponse:
            response = ticket_pb.WatchTicketsResponse.FromString(data)
            if any(e.ticket.plan_id == POISON_PLAN for e in (*response.events, response.event)):
                self.poisoned_reads += 1
                raise DecodeError("Exceeded upb_DecodeOptions_MaxDepth (simulated)")
            return response

        def poisoned_watch(client: TicketClient, **kwargs: Any) -> TicketWatch:
            watch = watch_tickets(client, **kwargs)
            watch._method = client._channel.unary_stream(
                WATCH_METHOD,
                request_serializer=ticket_pb.WatchTicketsRequest.SerializeToString,
                response_deserializer=deserialize,
            )
            self.watches.append((kwargs.get("cursor", ""), watch))
            return watch

        async def counted_list(client: TicketClient, **kwargs: Any) -> Any:
            response = await list_tickets(client, **kwargs)
            plan_id = kwargs.get("plan_id", "")
            self.listings[plan_id] = self.listings.get(plan_id, 0) + 1
            return response

        def recorded_failure(health: DependencyHealth, name: str, detail: str) -> None:
            self.health_failures.append((name, detail))
            health_failed(health, name, detail)

        monkeypatch.setattr(TicketClient, "watch_tickets", poisoned_watch)
        monkeypatch.setattr(TicketClient, "list_tickets", counted_list)
        monkeypatch.setattr(DependencyHealth, "failed", recorded_failure)


def waiting_plan(plan_id: str) -> dict[str, Any]:
    """One task no worker can take: only a change from outside moves its ticket."""
    return {
        "plan_id": plan_id,
        "tasks": [
            {"task_id": "only", "task_type": "echo", "required_capabilities": ["nobody-has-it"]}
        ],
    }


async def test_an_undecodable_event_restarts_the_watch_from_now_and_rereads_every_plan(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = PoisonedWatches(monkeypatch)
    await flow.start_orchestrator(resync_interval_seconds=AN_HOUR)
    submitted = await flow.submit(waiting_plan("driven"))
    assert submitted.status_code == 202, submitted.text
    ticket_id = submitted.json()["ticket_ids"]["only"]

    async def watching() -> bool:
        return bool(spy.watches) and spy.watches[-1][1].positioned and "driven" in spy.listings

    await flow.wait_for(watching, what="the plan taken up and the watch positioned")
    listed_before = spy.listings["driven"]
    first_cursor, first = spy.watches[0]
    assert first_cursor == ""

    # A ticket the orchestrator's watch cannot decode (of no plan it drives).
    async with flow.ticket_client() as tickets:
        await tickets.create_ticket(
            spec=ticket_pb.TicketSpec(plan_id=POISON_PLAN, task_id="t", task_type="echo")
        )

    async def rebuilt_and_reread() -> bool:
        return len(spy.watches) >= 2 and spy.listings["driven"] > listed_before

    await flow.wait_for(rebuilt_and_reread, what="the watch rebuilt and the plan re-read")
    assert spy.poisoned_reads == 1
    assert first.cursor  # it had a position (the header's cursor) ...
    assert spy.watches[1][0] == ""  # ... but the new watch starts from "now", not there
    assert any(
        name == TICKET_SERVICE and "could not be decoded" in detail
        for name, detail in spy.health_failures
    ), spy.health_failures

    # The new watch follows changes (the hour-long resync is not what sees this) ...
    async with flow.ticket_client() as tickets:
        ticket = await tickets.get_ticket(ticket_id=ticket_id)
        await tickets.update_ticket_status(
            ticket_id=ticket_id,
            status=ticket_pb.TICKET_STATUS_CANCELLED,
            attempt=ticket.attempt,
            error_message="cancelled by an operator",
        )

    async def seen() -> bool:
        body = await flow.plan("driven")
        return bool(flow.tasks(body)["only"]["status"] == "CANCELLED")

    await flow.wait_for(seen, what="the outside cancel seen", limit_seconds=SEEN_WITHIN_SECONDS)
    # ... and never went back to the undecodable event.
    await asyncio.sleep(0.5)
    assert spy.poisoned_reads == 1
    assert len(spy.watches) == 2
