"""AuditStore against a real MongoDB-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from pymongo import AsyncMongoClient

from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.storage import audit
from execution_ticket_service.storage.audit import AuditStore
from execution_ticket_service.storage.tickets import OutboxEntry, TicketRepository
from hive_common.http import check_dependency
from hive_common.localdb import free_port

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


async def test_readiness_says_why_mongodb_is_unreachable_before_the_driver_gives_up() -> None:
    # The driver retries a refused connection until its server selection timeout (2 s by
    # default), longer than /ready may take: the check said "no answer", not "refused".
    port = free_port()  # nothing listens there
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=30_000
    )
    store = AuditStore(client=client, database="readiness")
    try:
        assert store.last_error() is None  # nothing tried yet
        check = await check_dependency(
            store.ping, timeout_seconds=1.0, failed="degraded", last_error=store.last_error
        )
    finally:
        await client.close()
    assert check["status"] == "degraded"
    assert check.get("detail", "").startswith(f"MongoDB unavailable: 127.0.0.1:{port}: ")
