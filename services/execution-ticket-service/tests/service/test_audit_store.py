"""AuditStore against a real MongoDB-compatible server."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.storage import audit
from execution_ticket_service.storage.audit import AuditStore
from execution_ticket_service.storage.tickets import OutboxEntry, TicketRepository
from hive_common.http import check_dependency

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import LoopTurns

pytestmark = pytest.mark.service


async def test_a_big_batch_is_built_in_chunks_with_the_event_loop_let_in_between(
    repo: TicketRepository,
    mongo_uri: str,
    mongo_database_name: str,
    monkeypatch: pytest.MonkeyPatch,
    loop_turns: LoopTurns,
) -> None:
    specs = [TicketSpec(plan_id="p", task_id=f"t{i}", task_type="echo") for i in range(250)]
    await repo.create_many(specs, actor="s")
    entries = await repo.claim_outbox(limit=500, claim_seconds=30)
    built: list[int] = []
    build = audit.audit_document

    def audit_document(entry: OutboxEntry, **kwargs: Any) -> dict[str, Any]:
        built.append(loop_turns.count)
        return build(entry, **kwargs)

    monkeypatch.setattr(audit, "audit_document", audit_document)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        await AuditStore(client=client, database=mongo_database_name).record(entries)
        stored = await client[mongo_database_name]["audit_trail"].count_documents({})
    finally:
        await client.close()
    assert stored == 250
    # 100 documents at a time; other tasks ran between the chunks.
    [first], [second], [third] = (
        {built[i] for i in range(c, min(c + 100, 250))} for c in (0, 100, 200)
    )
    assert first < second < third


async def test_last_error_is_what_the_driver_last_saw_of_mongodb(
    mongo_uri: str, mongo_database_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The driver retries a refused connection until its server selection timeout (2 s by
    # default), longer than /ready may wait for it: the check said "no answer", not why.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    store = AuditStore(client=client, database=mongo_database_name)
    try:
        await store.ping()
        assert await store.last_error() is None  # reached
        # (An unreachable server, without the driver's own attempts: closing a client in
        # the middle of one leaks its socket, a ResourceWarning in some later test.)
        [description] = client.topology_description.server_descriptions().values()
        refused = description.to_unknown(error=AutoReconnect("127.0.0.1:9: Connection refused"))
        monkeypatch.setattr(
            type(client.topology_description),
            "server_descriptions",
            lambda self: {refused.address: refused},
        )
        # Not where MongoDB runs: /ready, which says it, answers anyone.
        assert await store.last_error() == "MongoDB unavailable: Connection refused"
    finally:
        await client.close()


def test_unavailable_says_why_without_the_drivers_topology_description() -> None:
    timeout = ServerSelectionTimeoutError(
        "127.0.0.1:9: [Errno 111] Connection refused (configured timeouts: socketTimeoutMS:"
        " 2000.0ms, connectTimeoutMS: 2000.0ms), mongo.internal:27017: timed out,"
        " [::1]:27017: refused, Timeout: 0.3s, Topology Description:"
        " <TopologyDescription id: 1, topology_type: Unknown, servers: [...]>"
    )
    assert audit._unavailable(timeout).message == (
        "MongoDB unavailable: [Errno 111] Connection refused, timed out, refused, Timeout: 0.3s"
    )
    # The driver's asyncio connection errors name the address their own way.
    refused = AutoReconnect("127.0.0.1:36999: [Errno 111] Connect call failed ('127.0.0.1', 36999)")
    assert audit._unavailable(refused).message == (
        "MongoDB unavailable: [Errno 111] Connect call failed"
    )
    ipv6 = AutoReconnect("fd00::5:27017: [Errno 111] Connect call failed ('::1', 27017, 0, 0)")
    assert (
        audit._unavailable(ipv6).message == "MongoDB unavailable: [Errno 111] Connect call failed"
    )
    # FerretDB's answer when its PostgreSQL is down: a kilobyte with its Go stack frames,
    # its backend's address and user, all of it twice (pymongo appends the "full error").
    errmsg = (
        "[msg_ping.go:55 handler.(*Handler).MsgPing] [backend.go:109 postgresql.(*backend)"
        ".Status] failed to connect to `user=postgres database=ferretdb`:\n\t127.0.0.1:55603"
        " (127.0.0.1): dial error: dial tcp connect: connection refused\n\t127.0.0.1:55603"
        " (127.0.0.1): dial error: dial tcp connect: connection refused"
    )
    backend_down = OperationFailure(
        errmsg, code=1, details={"ok": 0.0, "errmsg": errmsg, "code": 1, "codeName": "X"}
    )
    assert audit._unavailable(backend_down).message == (
        "MongoDB unavailable: failed to connect to `...`: dial error: dial tcp connect: "
        "connection refused"
    )


async def test_a_ping_the_readiness_check_stops_waiting_for_is_not_cancelled(
    mongo_uri: str, mongo_database_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /ready gives MongoDB a second, the driver's server selection takes two: the ping
    # was cancelled inside the driver, which once left its topology lock broken (every
    # later call, the relay's and /events, hung for good).
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    store = AuditStore(client=client, database=mongo_database_name)
    calls: list[str] = []
    answered = asyncio.Event()

    async def slow_command(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append("ping")
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise
        answered.set()
        return {"ok": 1}

    monkeypatch.setattr(store._db, "command", slow_command)
    try:
        first, second = await asyncio.gather(
            check_dependency(store.ping, timeout_seconds=0.1),
            check_dependency(store.ping, timeout_seconds=0.1),
        )
        assert first["status"] == second["status"] == "down"
        await asyncio.wait_for(answered.wait(), 5)
        assert calls == ["ping"]  # one ping for both, and it ran to its end
        assert await check_dependency(store.ping) == {"status": "ok"}
    finally:
        await client.close()
