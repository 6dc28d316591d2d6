"""The MongoDB audit trail: ``audit_trail`` (every event) and ``status_change_events``.

Delivery is at least once; a unique index on ``event_id`` makes a redelivered event a
harmless duplicate-key error, which is ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

from execution_ticket_service.domain.models import EventType
from execution_ticket_service.storage.rows import ticket_document
from execution_ticket_service.storage.tickets import OutboxEntry
from hive_common.errors import Unavailable

AUDIT_TRAIL = "audit_trail"
STATUS_CHANGES = "status_change_events"
_DUPLICATE_KEY = 11000
# Documents built between two turns of the event loop.
_DOCUMENT_CHUNK = 100

MongoClient = AsyncMongoClient[dict[str, Any]]


def audit_document(entry: OutboxEntry, *, relayed_at: datetime) -> dict[str, Any]:
    event = entry.event
    ticket = event.ticket
    return {
        "event_id": event.event_id,
        "sequence": entry.seq,
        "type": event.type.value,
        "ticket_id": ticket.ticket_id,
        "plan_id": ticket.plan_id,
        "task_id": ticket.task_id,
        "worker_id": event.worker_id,
        "attempt": ticket.attempt,
        "previous_status": event.previous_status.value if event.previous_status else None,
        "status": ticket.status.value,
        "actor": event.actor,
        "occurred_at": event.occurred_at,
        # When the relay sent the event to MongoDB (relayed_at - occurred_at is the relay lag).
        "relayed_at": relayed_at,
        # Fenced-off results are kept, and marked, so an operator can see what was refused.
        "late_result": event.type is EventType.LATE_RESULT_REJECTED,
        "details": event.details,
        "ticket": ticket_document(ticket),
    }


def status_change_document(audit: dict[str, Any]) -> dict[str, Any]:
    """The ``status_change_events`` document of an event's ``audit_trail`` document: the
    same fields without the ticket snapshot (which ``audit_trail`` holds under the same
    ``event_id``): a status change log stays small and cheap to write."""
    return {key: value for key, value in audit.items() if key != "ticket"}


class AuditStore:
    """Writes and reads the audit collections. Raises only :class:`Unavailable`."""

    def __init__(self, *, client: MongoClient, database: str) -> None:
        self._db = client[database]

    async def ensure_indexes(self) -> None:
        try:
            for name in (AUDIT_TRAIL, STATUS_CHANGES):
                collection = self._db[name]
                await collection.create_index([("event_id", ASCENDING)], unique=True)
                await collection.create_index([("ticket_id", ASCENDING), ("sequence", ASCENDING)])
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB unavailable: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._db.command("ping")
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB unavailable: {exc}") from exc

    async def record(self, entries: Sequence[OutboxEntry]) -> None:
        """Store the events; already stored ones are skipped (redelivery is harmless)."""
        relayed_at = datetime.now(UTC)
        documents: list[dict[str, Any]] = []
        for start in range(0, len(entries), _DOCUMENT_CHUNK):
            chunk = entries[start : start + _DOCUMENT_CHUNK]
            documents.extend(audit_document(entry, relayed_at=relayed_at) for entry in chunk)
            await asyncio.sleep(0)  # let requests in between (as TicketRepository does)
        status_changes = [
            status_change_document(doc)
            for doc, entry in zip(documents, entries, strict=True)
            if entry.event.status_changed
        ]
        try:
            await self._insert(AUDIT_TRAIL, documents)
            await self._insert(STATUS_CHANGES, status_changes)
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB unavailable: {exc}") from exc

    async def _insert(self, collection: str, documents: list[dict[str, Any]]) -> None:
        """Insert ``documents`` (insert_many adds ``_id`` to them)."""
        if not documents:
            return
        try:
            await self._db[collection].insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != _DUPLICATE_KEY for error in errors) or not errors:
                raise

    async def history(self, ticket_id: str, *, limit: int) -> list[dict[str, Any]]:
        """The audit trail of one ticket, oldest first."""
        try:
            cursor = (
                self._db[AUDIT_TRAIL]
                .find({"ticket_id": ticket_id}, {"_id": False})
                .sort("sequence", ASCENDING)
                .limit(limit)
            )
            return [doc async for doc in cursor]
        except PyMongoError as exc:
            raise Unavailable(f"MongoDB unavailable: {exc}") from exc
