"""Audit relay to MongoDB (including an outage), the HTTP API and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from execution_ticket_service.app import TicketService
from execution_ticket_service.background import OutboxRelay, RelaySettings
from execution_ticket_service.config import TicketSettings
from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.metrics import TicketMetrics
from execution_ticket_service.signals import ChangeSignal
from execution_ticket_service.storage.audit import AuditStore
from execution_ticket_service.storage.tickets import OutboxEntry, TicketRepository
from hive_common.auth import TokenIssuer
from hive_testsupport.databases import MongoServer
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.service

S = pb.TicketStatus


def typed(value: Any) -> str:
    """``value`` as JSON, in which 3 and 3.0 differ (they are equal in Python)."""
    return json.dumps(value, sort_keys=True)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, what: str, deadline: float = 30.0
) -> None:
    """Wait for a condition the service reaches on its own (background loops)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not await probe():
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


async def run_lifecycle(
    stub: pb_grpc.TicketServiceAsyncStub, md: Any, task_id: str
) -> pb.ExecutionTicket:
    """create -> assign -> running -> failed (re-queued) -> late result -> assign -> completed."""
    ticket = (
        await stub.CreateTicket(
            pb.CreateTicketRequest(
                ticket=pb.TicketSpec(
                    plan_id="plan-a", task_id=task_id, task_type="echo", max_retries=1
                )
            ),
            metadata=md,
        )
    ).ticket
    for attempt in (1, 2):
        await stub.AssignTicket(
            pb.AssignTicketRequest(ticket_id=ticket.ticket_id, worker_id="w1", attempt=attempt),
            metadata=md,
        )
        await stub.UpdateTicketStatus(
            pb.UpdateTicketStatusRequest(
                ticket_id=ticket.ticket_id, status=S.TICKET_STATUS_RUNNING, attempt=attempt
            ),
            metadata=md,
        )
        failed = attempt == 1
        await stub.UpdateTicketStatus(
            pb.UpdateTicketStatusRequest(
                ticket_id=ticket.ticket_id,
                status=S.TICKET_STATUS_FAILED if failed else S.TICKET_STATUS_COMPLETED,
                attempt=attempt,
                error_message="e" if failed else "",
            ),
            metadata=md,
        )
        if attempt == 2:
            break
        # A late result from attempt 1 after the re-queue: refused, but audited.
        with pytest.raises(Exception, match="stale"):
            await stub.UpdateTicketStatus(
                pb.UpdateTicketStatusRequest(
                    ticket_id=ticket.ticket_id, status=S.TICKET_STATUS_COMPLETED, attempt=1
                ),
                metadata=md,
            )
    return (
        await stub.GetTicket(pb.GetTicketRequest(ticket_id=ticket.ticket_id), metadata=md)
    ).ticket


EXPECTED_TYPES = [
    "CREATED",
    "ASSIGNED",
    "STATUS_CHANGED",
    "REQUEUED",
    "LATE_RESULT_REJECTED",
    "ASSIGNED",
    "STATUS_CHANGED",
    "STATUS_CHANGED",
]


async def test_every_event_reaches_mongodb_even_after_an_outage(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    mongo_server: MongoServer,
    mongo_uri: str,
    settings: TicketSettings,
) -> None:
    md = bearer(service_token)
    before = await run_lifecycle(stub, md, "before")
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_uri, serverSelectionTimeoutMS=2000
    )
    db = mongo[settings.mongo_database]
    try:

        async def delivered(ticket_id: str, n: int) -> bool:
            return await db.audit_trail.count_documents({"ticket_id": ticket_id}) >= n

        await eventually(lambda: delivered(before.ticket_id, 8), what="relay before the outage")

        mongo_server.stop()
        # Ticket operations go on while MongoDB is down.
        during = await run_lifecycle(stub, md, "during")
        assert during.status == S.TICKET_STATUS_COMPLETED
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{service.runtime.http_port}"
        ) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 200
            assert ready.json()["checks"]["mongodb"]["status"] == "degraded"
            events = await http.get(
                f"/api/v1/tickets/{during.ticket_id}/events",
                headers={"authorization": f"Bearer {service_token}"},
            )
            assert events.status_code == 503
            assert events.json()["error"]["code"] == "UNAVAILABLE"
        pending, _ = await service.repository.outbox_backlog()
        assert pending >= 8
        mongo_server.start()

        await eventually(lambda: delivered(during.ticket_id, 8), what="relay after the outage")
        trail = [
            doc
            async for doc in db.audit_trail.find({"ticket_id": during.ticket_id}).sort(
                "sequence", 1
            )
        ]
        assert [d["type"] for d in trail] == EXPECTED_TYPES
        assert len({d["event_id"] for d in trail}) == len(trail)
        late = [d for d in trail if d["late_result"]]
        assert len(late) == 1
        assert late[0]["details"]["reported_attempt"] == 1
        assert late[0]["details"]["reported_status"] == "COMPLETED"
        change_docs = [
            d
            async for d in db.status_change_events.find(
                {"ticket_id": during.ticket_id}, {"_id": False}
            ).sort("sequence", 1)
        ]
        # A status change is the audit document of its event without the ticket snapshot
        # (audit_trail has it under the same event_id).
        by_event = {d["event_id"]: d for d in trail}
        for change in change_docs:
            assert "ticket" not in change
            full = dict(by_event[change["event_id"]])
            assert full.pop("ticket")["status"] == change["status"]
            full.pop("_id")
            assert change == full
        changes = [(d["previous_status"], d["status"]) for d in change_docs]
        assert changes == [
            ("PENDING", "ASSIGNED"),
            ("ASSIGNED", "RUNNING"),
            ("RUNNING", "PENDING"),
            ("PENDING", "ASSIGNED"),
            ("ASSIGNED", "RUNNING"),
            ("RUNNING", "COMPLETED"),
        ]
        await eventually(lambda: _backlog_empty(service), what="outbox fully relayed", deadline=30)
    finally:
        await mongo.close()


async def _backlog_empty(service: TicketService) -> bool:
    pending, _ = await service.repository.outbox_backlog()
    return pending == 0


async def test_redelivery_is_harmless(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    mongo_uri: str,
    settings: TicketSettings,
) -> None:
    ticket = await run_lifecycle(stub, bearer(service_token), "twice")
    await eventually(lambda: _backlog_empty(service), what="first delivery")
    # Forget that the rows were delivered, as after a crash between insert and mark.
    async with service.pool.connection() as conn:
        await conn.execute("INSERT INTO ticket_outbox (seq) SELECT seq FROM ticket_events")
    await eventually(lambda: _backlog_empty(service), what="redelivery")
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        db = mongo[settings.mongo_database]
        assert await db.audit_trail.count_documents({"ticket_id": ticket.ticket_id}) == 8
        assert await db.status_change_events.count_documents({"ticket_id": ticket.ticket_id}) == 6
    finally:
        await mongo.close()


async def test_http_api(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    issuer: TokenIssuer,
) -> None:
    md = bearer(service_token)
    ticket = await run_lifecycle(stub, md, "http")
    await stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(
            tickets=[
                pb.TicketSpec(plan_id="plan-b", task_id=f"t{i}", task_type="echo") for i in range(5)
            ]
        ),
        metadata=md,
    )
    worker_token, _ = issuer.issue_worker_token(worker_id="w1", ttl_seconds=60)
    headers = {"authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}", headers=headers
    ) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = (await http.get("/ready")).json()
        assert ready["checks"]["postgresql"]["status"] == "ok"
        assert ready["checks"]["migrations"]["status"] == "ok"
        assert (await http.get("/openapi.json")).json()["paths"]["/api/v1/tickets/{ticket_id}"]

        got = await http.get(f"/api/v1/tickets/{ticket.ticket_id}")
        assert got.status_code == 200
        assert got.json()["status"] == "COMPLETED"
        assert got.json()["attempt"] == 2

        names: list[str] = []
        token = ""
        while True:
            page = (
                await http.get(
                    "/api/v1/tickets",
                    params={"plan_id": "plan-b", "page_size": 2, "page_token": token},
                )
            ).json()
            names += [t["task_id"] for t in page["tickets"]]
            token = page["next_page_token"]
            if not token:
                break
        assert names == [f"t{i}" for i in range(5)]
        completed = (await http.get("/api/v1/tickets", params={"status": "COMPLETED"})).json()
        assert [t["ticket_id"] for t in completed["tickets"]] == [ticket.ticket_id]
        # In any case, as the orchestrator's and the registry's status filters.
        lower = (await http.get("/api/v1/tickets", params={"status": "completed"})).json()
        assert lower["tickets"] == completed["tickets"]

        async def audited() -> bool:
            response = await http.get(f"/api/v1/tickets/{ticket.ticket_id}/events")
            return response.status_code == 200 and len(response.json()["events"]) == 8

        await eventually(audited, what="audit history over HTTP")
        history = (await http.get(f"/api/v1/tickets/{ticket.ticket_id}/events")).json()
        assert [e["type"] for e in history["events"]] == EXPECTED_TYPES
        assert history["truncated"] is False
        # A shorter history says that more events follow.
        for limit, truncated in ((3, True), (8, False)):
            part = await http.get(
                f"/api/v1/tickets/{ticket.ticket_id}/events", params={"limit": limit}
            )
            assert [e["type"] for e in part.json()["events"]] == EXPECTED_TYPES[:limit]
            assert part.json()["truncated"] is truncated
        # Each event says when the relay sent it, never before it happened.
        for event in history["events"]:
            relayed_at = datetime.fromisoformat(event["relayed_at"])
            assert relayed_at >= datetime.fromisoformat(event["occurred_at"])

        bad = await http.get("/api/v1/tickets", params={"status": "NOPE", "page_size": -1})
        assert bad.status_code == 400
        fields = {
            v["field"]: v["description"] for v in bad.json()["error"]["details"]["field_violations"]
        }
        # Named as query parameters, as in the other services' HTTP APIs (query.<name>).
        assert set(fields) == {"query.status[0]", "query.page_size"}
        assert fields["query.status[0]"] == (
            "unknown status 'NOPE'; use one of PENDING, ASSIGNED, RUNNING, COMPLETED, FAILED, "
            "CANCELLED"
        )
        assert (await http.get("/api/v1/tickets/not-a-uuid")).status_code == 400
        missing = await http.get("/api/v1/tickets/00000000-0000-0000-0000-000000000000")
        assert missing.status_code == 404
        anonymous = await http.get("/api/v1/tickets", headers={"authorization": ""})
        assert anonymous.status_code == 401
    # Two Authorization headers are refused, as over gRPC and by the registry (the first
    # one used to be taken).
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.runtime.http_port}") as raw:
        twice = await raw.get(
            "/api/v1/tickets",
            headers=[("authorization", headers["authorization"]), ("authorization", "Bearer x")],
        )
        assert twice.status_code == 401
        assert "more than one authorization header" in twice.json()["error"]["message"]

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.metrics_port}"
    ) as metrics_http:

        async def scraped() -> bool:
            text = (await metrics_http.get("/metrics")).text
            return 'hive_tickets{status="PENDING"} 5.0' in text

        await eventually(scraped, what="tickets-by-status gauge")
        text = (await metrics_http.get("/metrics")).text
        assert 'hive_tickets{status="RUNNING"} 0.0' in text
        assert 'hive_tickets{status="COMPLETED"}' not in text  # finished: transitions
        assert "grpc_server_handling_seconds_bucket" in text
        assert 'grpc_method="UpdateTicketStatus"' in text
        assert 'hive_ticket_transitions_total{event_type="REQUEUED"' in text
        assert "hive_ticket_outbox_lag_seconds" in text
        assert "hive_ticket_lease_expiries_total" in text


async def test_whole_numbers_stay_integers_over_http_and_in_the_audit(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    issuer: TokenIssuer,
    settings: TicketSettings,
) -> None:
    # A Struct holds every number as a double: 3 arrives as 3.0 and was shown so.
    md = bearer(service_token)
    spec = pb.TicketSpec(plan_id="numbers", task_id="t", task_type="echo")
    spec.parameters.update({"n": 3, "list": [1, 2], "ratio": 2.5, "big": 1e300})
    ticket = (await stub.CreateTicket(pb.CreateTicketRequest(ticket=spec), metadata=md)).ticket
    await stub.AssignTicket(
        pb.AssignTicketRequest(ticket_id=ticket.ticket_id, worker_id="w1", attempt=1), metadata=md
    )
    for status in (S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_COMPLETED):
        update = pb.UpdateTicketStatusRequest(ticket_id=ticket.ticket_id, status=status, attempt=1)
        if status == S.TICKET_STATUS_COMPLETED:
            update.result.update({"count": 7})
        await stub.UpdateTicketStatus(update, metadata=md)
    worker_token, _ = issuer.issue_worker_token(worker_id="w1", ttl_seconds=60)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}",
        headers={"authorization": f"Bearer {worker_token}"},
    ) as http:
        got = (await http.get(f"/api/v1/tickets/{ticket.ticket_id}")).json()
        assert typed(got["parameters"]) == typed(
            {"n": 3, "list": [1, 2], "ratio": 2.5, "big": 1e300}
        )
        assert typed(got["result"]) == typed({"count": 7})

    # The audit trail's snapshot (MongoDB) too.
    audit = AuditStore(client=service.mongo, database=settings.mongo_database)

    async def audited() -> bool:
        return len(await audit.history(ticket.ticket_id, limit=10)) == 4

    await eventually(audited, what="the audit trail")
    last = (await audit.history(ticket.ticket_id, limit=10))[-1]
    assert typed(last["ticket"]["parameters"]) == typed(got["parameters"])
    assert typed(last["ticket"]["result"]) == typed({"count": 7})


async def test_every_attempts_result_and_a_late_one_are_in_the_audit_history(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    issuer: TokenIssuer,
    advance_clock: Callable[[float], None],
    mongo_uri: str,
    settings: TicketSettings,
) -> None:
    # Attempt 1 fails with a result (re-queued: the result was lost), attempt 2 times out
    # (no retry left), then its worker reports a result for it (nothing was recorded).
    md = bearer(service_token)
    worker = bearer(issuer.issue_worker_token(worker_id="w1", ttl_seconds=600)[0])
    spec = pb.TicketSpec(
        plan_id="attempts", task_id="t", task_type="echo", max_retries=1, timeout_seconds=30
    )
    ticket = (await stub.CreateTicket(pb.CreateTicketRequest(ticket=spec), metadata=md)).ticket
    first_result: dict[str, Any] = {"attempt": 1, "log": "café: só metade"}
    late_result: dict[str, Any] = {"attempt": 2, "rows": 12}
    token = ""
    for attempt in (1, 2):
        await stub.AssignTicket(
            pb.AssignTicketRequest(ticket_id=ticket.ticket_id, worker_id="w1", attempt=attempt),
            metadata=md,
        )
        token = (
            await stub.GenerateToken(
                pb.GenerateTokenRequest(ticket_id=ticket.ticket_id), metadata=worker
            )
        ).token
        update = pb.UpdateTicketStatusRequest(
            ticket_id=ticket.ticket_id, status=S.TICKET_STATUS_RUNNING, attempt=attempt
        )
        await stub.UpdateTicketStatus(update, metadata=bearer(token))
        if attempt == 1:
            update.status = S.TICKET_STATUS_FAILED
            update.error_message = "flaky"
            update.result.update(first_result)
            requeued = await stub.UpdateTicketStatus(update, metadata=bearer(token))
            assert requeued.ticket.status == S.TICKET_STATUS_PENDING
    advance_clock(31)

    async def timed_out() -> bool:
        got = await stub.GetTicket(pb.GetTicketRequest(ticket_id=ticket.ticket_id), metadata=md)
        return got.ticket.status == S.TICKET_STATUS_FAILED

    await eventually(timed_out, what="the lease expiry of attempt 2")
    for result in (late_result, {"attempt": 2, "rows": 13}):
        late = pb.UpdateTicketStatusRequest(
            ticket_id=ticket.ticket_id, status=S.TICKET_STATUS_COMPLETED, attempt=2
        )
        late.result.update(result)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.UpdateTicketStatus(late, metadata=bearer(token))
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "is FAILED, a terminal status" in (refused.value.details() or "")

    expected = [
        "CREATED",
        "ASSIGNED",
        "STATUS_CHANGED",
        "REQUEUED",
        "ASSIGNED",
        "STATUS_CHANGED",
        "LEASE_EXPIRED",
        "LATE_RESULT_REJECTED",  # once: the second report of that result adds nothing
    ]
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}", headers=dict(md)
    ) as http:

        async def history() -> list[dict[str, Any]]:
            response = await http.get(f"/api/v1/tickets/{ticket.ticket_id}/events")
            events: list[dict[str, Any]] = response.json()["events"]
            return events

        async def audited() -> bool:
            return len(await history()) >= len(expected)

        await eventually(audited, what="the audit history")
        events = await history()
    assert [e["type"] for e in events] == expected
    requeue, rejected = events[3], events[7]
    assert typed(requeue["details"]["result"]) == typed(first_result)
    assert requeue["details"]["failed_attempt"] == 1
    assert rejected["late_result"] is True
    assert rejected["actor"] == "worker:w1"
    assert rejected["details"] == {
        "reported_status": "COMPLETED",
        "reported_attempt": 2,
        "result": late_result,
        "error_message": "",
    }
    # In MongoDB the results are JSON text, as the tickets' (see the audit module).
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        stored = [
            doc["details"]["result"]
            async for doc in mongo[settings.mongo_database]
            .audit_trail.find(
                {
                    "ticket_id": ticket.ticket_id,
                    "type": {"$in": ["REQUEUED", "LATE_RESULT_REJECTED"]},
                }
            )
            .sort("sequence")
        ]
    finally:
        await mongo.close()
    assert [json.loads(text) for text in stored] == [first_result, late_result]


async def test_http_nul_characters_are_400_with_the_field(
    service: TicketService, stub: pb_grpc.TicketServiceAsyncStub, service_token: str
) -> None:
    md = bearer(service_token)
    created = await stub.BatchCreateTickets(
        pb.BatchCreateTicketsRequest(
            tickets=[pb.TicketSpec(plan_id="p", task_id=f"t{i}", task_type="echo") for i in (1, 2)]
        ),
        metadata=md,
    )
    ticket_id = created.tickets[0].ticket_id
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}",
        headers={"authorization": f"Bearer {service_token}"},
    ) as http:
        page = (await http.get("/api/v1/tickets", params={"page_size": 1})).json()
        token = page["next_page_token"]
        assert token

        async def fields_of(path: str, params: dict[str, Any] | None = None) -> set[str]:
            response = await http.get(path, params=params)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "INVALID_ARGUMENT"
            return {v["field"] for v in error["details"]["field_violations"]}

        nul = "\u0000"
        assert await fields_of(
            "/api/v1/tickets",
            {"plan_id": f"p{nul}", "worker_id": f"{nul}w", "status": [f"PENDING{nul}"]},
        ) == {"query.plan_id", "query.worker_id", "query.status[0]"}
        # A valid token with a NUL appended is not that token.
        assert await fields_of(
            "/api/v1/tickets", {"page_size": 1, "page_token": f"{token}{nul}"}
        ) == {"query.page_token"}
        assert await fields_of(f"/api/v1/tickets/{ticket_id}%00") == {"ticket_id"}
        assert await fields_of(f"/api/v1/tickets/{ticket_id}%00/events") == {"ticket_id"}
        # The same requests without the NUL are fine.
        again = await http.get("/api/v1/tickets", params={"page_size": 1, "page_token": token})
        assert [t["task_id"] for t in again.json()["tickets"]] == ["t2"]


async def test_json_mongodb_would_refuse_is_audited_and_the_relay_goes_on(
    service: TicketService,
    stub: pb_grpc.TicketServiceAsyncStub,
    service_token: str,
    issuer: TokenIssuer,
    mongo_uri: str,
    settings: TicketSettings,
) -> None:
    # Keys with dots or a leading $ (FerretDB refuses them; common in real parameters) and
    # numbers beyond 64-bit integers (BSON has none): one such event stopped the audit
    # trail of every ticket for good.
    parameters: dict[str, Any] = {
        "spark.executor.memory": "4g",
        "$schema": "s",
        "nested": {"a.b": [{"$ref": "x"}]},
        "huge": 1e308,
        "big": 2.0**64,
    }
    result = {"out.put": {"$n": 2.0**70}}
    md = bearer(service_token)
    odd = pb.TicketSpec(plan_id="odd", task_id="t", task_type="echo")
    odd.parameters.update(parameters)
    ticket = (await stub.CreateTicket(pb.CreateTicketRequest(ticket=odd), metadata=md)).ticket
    await stub.AssignTicket(
        pb.AssignTicketRequest(ticket_id=ticket.ticket_id, worker_id="w1", attempt=1), metadata=md
    )
    for status in (S.TICKET_STATUS_RUNNING, S.TICKET_STATUS_COMPLETED):
        update = pb.UpdateTicketStatusRequest(ticket_id=ticket.ticket_id, status=status, attempt=1)
        if status == S.TICKET_STATUS_COMPLETED:
            update.result.update(result)
        await stub.UpdateTicketStatus(update, metadata=md)
    later = (
        await stub.CreateTicket(
            pb.CreateTicketRequest(
                ticket=pb.TicketSpec(plan_id="odd", task_id="later", task_type="echo")
            ),
            metadata=md,
        )
    ).ticket
    worker_token, _ = issuer.issue_worker_token(worker_id="w1", ttl_seconds=60)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.runtime.http_port}",
        headers={"authorization": f"Bearer {worker_token}"},
    ) as http:

        async def history(ticket_id: str) -> list[dict[str, Any]]:
            response = await http.get(f"/api/v1/tickets/{ticket_id}/events")
            events: list[dict[str, Any]] = response.json()["events"]
            return events

        async def audited() -> bool:
            return (
                len(await history(ticket.ticket_id)) == 4
                and len(await history(later.ticket_id)) == 1
            )

        await eventually(audited, what="both tickets' events in the audit trail")
    assert service.relay.healthy
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        documents = [
            doc
            async for doc in mongo[settings.mongo_database]
            .audit_trail.find({"ticket_id": ticket.ticket_id})
            .sort("sequence")
        ]
    finally:
        await mongo.close()
    # Stored as JSON text, the whole of it.
    assert [json.loads(doc["ticket"]["parameters"]) for doc in documents] == [parameters] * 4
    assert json.loads(documents[-1]["ticket"]["result"]) == result


async def test_the_relay_survives_a_round_that_fails_unexpectedly(
    repo: TicketRepository, mongo_uri: str, mongo_database_name: str
) -> None:
    # A round failing with anything but a HiveError (a document BSON could not encode)
    # used to end the relay task silently: the audit trail stopped for every ticket.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    store = AuditStore(client=client, database=mongo_database_name)
    record = store.record
    attempts = 0

    async def fails_once(entries: Sequence[OutboxEntry]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OverflowError("MongoDB can only handle up to 8-byte ints")
        await record(entries)

    store.record = fails_once  # type: ignore[method-assign]
    metrics = TicketMetrics(CollectorRegistry())
    relay = OutboxRelay(
        repository=repo,
        audit=store,
        metrics=metrics,
        signal=ChangeSignal(),
        settings=RelaySettings(idle_interval=0.05, max_backoff=0.05),
    )
    await repo.create(TicketSpec(plan_id="p", task_id="t", task_type="echo"), actor="s")
    running = asyncio.create_task(relay.run())
    try:

        async def stored() -> bool:
            return await client[mongo_database_name]["audit_trail"].count_documents({}) == 1

        await eventually(stored, what="the event in the audit trail")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await client.close()
    assert attempts == 2
    assert relay.healthy
    assert metrics.relay_failures._value.get() == 1
    assert (await repo.outbox_backlog())[0] == 0
