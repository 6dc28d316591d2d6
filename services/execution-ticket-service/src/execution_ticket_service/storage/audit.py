"""The MongoDB audit trail: ``audit_trail`` (every event) and ``status_change_events``.

Delivery is at least once; a unique index on ``event_id`` makes a redelivered event a
harmless duplicate-key error, which is ignored.

The users' free-form JSON (a ticket's ``parameters`` and ``result``, a refused late
result or a re-queued attempt's result in ``details.result``) is stored as its JSON text:
JSON allows object keys and numbers that a MongoDB server may refuse (FerretDB refuses
every key with a ``.`` or a
leading ``$``, common in real parameters such as ``{"spark.executor.memory": "4g"}``;
BSON has no integer beyond 64 bits), and one refused document would hold up the relay.
:meth:`AuditStore.history` gives the JSON back as objects.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

from execution_ticket_service.domain.models import EventType, ticket_document
from execution_ticket_service.storage.tickets import OutboxEntry
from hive_common.errors import Unavailable

AUDIT_TRAIL = "audit_trail"
STATUS_CHANGES = "status_change_events"
_DUPLICATE_KEY = 11000
# Documents built between two turns of the event loop.
_DOCUMENT_CHUNK = 100

MongoClient = AsyncMongoClient[dict[str, Any]]


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _free_form_as_text(document: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``document`` with the values of ``keys`` that are objects or arrays as JSON text."""
    texts = {
        key: _json_text(document[key]) for key in keys if isinstance(document.get(key), dict | list)
    }
    return {**document, **texts} if texts else document


def _free_form_as_json(document: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The inverse of :func:`_free_form_as_text` (documents written before it pass)."""
    values = {key: json.loads(document[key]) for key in keys if isinstance(document.get(key), str)}
    return {**document, **values} if values else document


_TICKET_FREE_FORM = ("parameters", "result")
_DETAILS_FREE_FORM = ("result",)


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
        "details": _free_form_as_text(event.details, _DETAILS_FREE_FORM),
        "ticket": _free_form_as_text(ticket_document(ticket), _TICKET_FREE_FORM),
    }


def status_change_document(audit: dict[str, Any]) -> dict[str, Any]:
    """The ``status_change_events`` document of an event's ``audit_trail`` document: the
    same fields without the ticket snapshot (which ``audit_trail`` holds under the same
    ``event_id``): a status change log stays small and cheap to write."""
    return {key: value for key, value in audit.items() if key != "ticket"}


# What a driver's or a server's error text says that /ready must not show: "host:port: "
# before each server's error, a socket address "('host', port)" in it, the driver's
# configured timeouts after it; a server's own internals (FerretDB's when its PostgreSQL
# is down): Go stack frames, "host:port (host): " before each dial error and its backend's
# connection string in backquotes (left as `...`, so the sentence around it still reads).
_NOT_SHOWN = re.compile(
    r"[^\s,()]+:\d+: | ?\('[^']*', \d+(?:, \d+)*\)| \(configured timeouts: [^)]*\)"
    r"|\[[^\]\s]+\.go:\d+ [^\]]*\] ?|\S+:\d+ \(\S+\): |`[^`]*`"
)


def _said(driver_text: str) -> str:
    """``MongoDB unavailable: <why>``: what the driver said, without the topology
    description a server selection timeout appends or the "full error" document an error
    of the server's gets (a kilobyte of internals in every /events 503 and log line), nor
    what :data:`_NOT_SHOWN` matches; each distinct line once."""
    reason = driver_text.split(", Topology Description: ")[0].split(", full error: {")[0]
    shown = _NOT_SHOWN.sub(lambda m: "`...`" if m.group().startswith("`") else "", reason)
    lines = [line.strip() for line in shown.splitlines()]
    return "MongoDB unavailable: " + " ".join(dict.fromkeys(line for line in lines if line))


def _unavailable(exc: PyMongoError) -> Unavailable:
    return Unavailable(_said(str(exc)))


class AuditStore:
    """Writes and reads the audit collections. Raises only :class:`Unavailable`."""

    def __init__(self, *, client: MongoClient, database: str) -> None:
        self._db = client[database]
        self._pinging: asyncio.Task[None] | None = None

    async def ensure_indexes(self) -> None:
        try:
            for name in (AUDIT_TRAIL, STATUS_CHANGES):
                collection = self._db[name]
                await collection.create_index([("event_id", ASCENDING)], unique=True)
                await collection.create_index([("ticket_id", ASCENDING), ("sequence", ASCENDING)])
        except PyMongoError as exc:
            raise _unavailable(exc) from exc

    async def ping(self) -> None:
        """Whether MongoDB answers. A caller that stops waiting (readiness gives it a
        second; the driver's server selection takes longer) leaves the ping running, and
        the next caller waits for the same one: a ping cancelled inside the driver's
        server selection once left its topology lock broken, and every later call (the
        relay's, /events) hung for good."""
        if self._pinging is None or self._pinging.done():
            self._pinging = asyncio.create_task(self._ping_once(), name="mongodb-ping")
            self._pinging.add_done_callback(_retrieved)
        await asyncio.shield(self._pinging)

    async def aclose(self) -> None:
        """End a ping still running (at shutdown, before the client closes)."""
        if self._pinging is not None and not self._pinging.done():
            self._pinging.cancel()
            await asyncio.gather(self._pinging, return_exceptions=True)

    async def _ping_once(self) -> None:
        try:
            await self._db.command("ping")
        except PyMongoError as exc:
            raise _unavailable(exc) from exc

    async def last_error(self) -> str | None:
        """Why the client's last attempt to reach MongoDB failed, if it did (the driver
        retries a refused connection until its server selection timeout)."""
        descriptions = self._db.client.topology_description.server_descriptions()
        errors = [str(d.error) for d in descriptions.values() if d.error is not None]
        return _said(errors[0]) if errors else None

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
            raise _unavailable(exc) from exc

    async def _insert(self, collection: str, documents: list[dict[str, Any]]) -> None:
        """Insert ``documents`` (insert_many adds ``_id`` to them)."""
        if not documents:
            return
        try:
            await self._db[collection].insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            refused = [error for error in errors if error.get("code") != _DUPLICATE_KEY]
            if refused:
                # Said in a line: the driver's message holds every document of the batch.
                raise Unavailable(
                    f"MongoDB refused {len(refused)} of {len(documents)} {collection} "
                    f"documents: {refused[0].get('errmsg', '')}"
                ) from exc
            if not errors:
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
            documents = [doc async for doc in cursor]
        except PyMongoError as exc:
            raise _unavailable(exc) from exc
        return [_readable(doc) for doc in documents]


def _retrieved(task: asyncio.Task[None]) -> None:
    """Its outcome is its awaiters' (none left: nobody to tell, nothing to log)."""
    if not task.cancelled():
        task.exception()


def _readable(document: dict[str, Any]) -> dict[str, Any]:
    """A stored audit document with its free-form JSON as objects again."""
    readable = dict(document)
    if isinstance(document.get("ticket"), dict):
        readable["ticket"] = _free_form_as_json(document["ticket"], _TICKET_FREE_FORM)
    if isinstance(document.get("details"), dict):
        readable["details"] = _free_form_as_json(document["details"], _DETAILS_FREE_FORM)
    return readable
