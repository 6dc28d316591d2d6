"""TicketRepository: tickets and their event log in PostgreSQL (psycopg 3, async pool).

A change to one ticket reads the row, lets the domain decide, then writes the new row and
appends the event row in one statement that only applies if the row still has the version
that was read (optimistic concurrency: two round trips, no transaction held open; a lost
race is decided again on the fresh row). Batches (assignments, lease expiry) lock their
rows in one transaction; status report batches decide on remembered tickets as single
changes do. A batch writes all its changes and their events in one statement; concurrent
changes (assignments, status updates) and single creates are written together (group
commit). The event table is the log WatchTickets reads; a trigger enters every event into
``ticket_outbox`` in the statement that writes it (the transactional outbox the relay
delivers to MongoDB), so an event row is written once and the relay's bookkeeping stays in
that narrow table.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.abc import Params
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb, set_json_loads

from execution_ticket_service.domain.clock import Clock, utc_now
from execution_ticket_service.domain.ids import new_uuid4_strings
from execution_ticket_service.domain.models import (
    SPEC_CONTENT_FIELDS,
    Assignment,
    EventType,
    StatusUpdate,
    Ticket,
    TicketEvent,
    TicketFilter,
    TicketSpec,
    TicketStatus,
    TransitionCounts,
)
from execution_ticket_service.domain.paging import Cursor, CursorPurged, encode_cursor
from execution_ticket_service.domain.state_machine import (
    Outcome,
    check_worker_capacity,
    decide_assign,
    decide_lease_expiry,
    decide_update,
)
from execution_ticket_service.domain.validation import payload_bytes
from execution_ticket_service.storage.rows import ticket_from_row
from hive_common.batching import GroupCommit, Take, distinct_prefix
from hive_common.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    HiveError,
    InvalidArgument,
    NotFound,
)
from hive_common.postgres import DictPool, connection, database_errors
from hive_common.postgres import open_pool as open_dict_pool

T = TypeVar("T")
Pool = DictPool
Statement = str | sql.Composed

# Conflicts PostgreSQL resolves by aborting one transaction; retrying it is always safe.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_ATTEMPTS = 3
# A single-ticket change that keeps losing the race to concurrent changes of the same
# ticket gives up (ABORTED, retryable) rather than spin.
_OPTIMISTIC_ATTEMPTS = 5
# Concurrent creates of single tickets, and concurrent changes of tickets (AssignTicket,
# status updates single or in batches), are written together (group commit), at most this
# many at a time.
_CREATES_PER_WRITE = 100
_CHANGES_PER_WRITE = 1_000
# Rows decoded between two turns of the event loop when a read returns many events.
_CONVERT_CHUNK = 50

# A change to decide and write: the ticket and the decision to make on it as it is then.
Change = tuple[str, Callable[[Ticket, datetime], Outcome]]


# Every number of ``parameters`` and ``result`` came as a protobuf double. jsonb keeps
# numbers as exact decimals and writes a whole one without exponent (1e308 comes back as a
# 309-digit integer, 2**60 as 1152921504606847000): read integers beyond the exactly
# representable range back as the doubles they were, so an identical request compares
# equal and every value stays one BSON (or any JSON reader) can hold.
_EXACT_INTEGERS = 2**53


def _integer_or_double(text: str) -> int | float:
    value = int(text)
    return value if -_EXACT_INTEGERS <= value <= _EXACT_INTEGERS else float(value)


def _json_loads(data: str | bytes) -> Any:
    return json.loads(data, parse_int=_integer_or_double)


async def _configure(conn: AsyncConnection[DictRow]) -> None:
    set_json_loads(_json_loads, conn)


def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """An unopened pool of connections for :class:`TicketRepository`."""
    return open_dict_pool(dsn, min_size=min_size, max_size=max_size, configure=_configure)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int
    event: TicketEvent


def _spec_differences(existing: TicketSpec, requested: TicketSpec) -> list[str]:
    return [
        name for name in SPEC_CONTENT_FIELDS if getattr(existing, name) != getattr(requested, name)
    ]


# Where a reader starting "now" starts: the oldest running transaction, and never before
# the purge mark.
_START_POSITION = (
    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, xid, seq"
    " FROM ticket_events_purged"
)


def _start_position(row: dict[str, Any]) -> Cursor:
    """A reader starting "now" reads from the oldest transaction still running; only a
    purge of the release before 0008 (no wait for running transactions) deletes past it,
    and starting before the mark would only have the reader refused."""
    return max(Cursor(xid=row["xmin"], seq=0), Cursor(xid=row["xid"], seq=row["seq"]))


def _purged_and_event_from_row(row: dict[str, Any]) -> tuple[Cursor, TicketEvent | None]:
    purged = Cursor(xid=row["purged_xid"], seq=row["purged_seq"])
    return purged, _event_from_row(row) if row["event_id"] is not None else None


def _event_from_row(row: dict[str, Any]) -> TicketEvent:
    previous = row["previous_status"]
    return TicketEvent(
        event_id=str(row["event_id"]),
        type=EventType(row["event_type"]),
        ticket=ticket_from_row(row["ticket"]),
        previous_status=TicketStatus(previous) if previous else None,
        occurred_at=row["occurred_at"],
        actor=row["actor"],
        worker_id=row["worker_id"] or "",
        details=dict(row["details"]),
        cursor=encode_cursor(Cursor(xid=row["xid"], seq=row["seq"])),
    )


# Arrays go in binary (%b): the text format escapes every item, which dominates big batches.
_INSERT_TICKETS = """
WITH input AS (
    SELECT * FROM unnest(
        %(ticket_id)b::uuid[], %(plan_id)b::text[], %(task_id)b::text[], %(intent_id)b::text[],
        %(task_type)b::text[], %(description)b::text[], %(parameters)b::text[]::jsonb[],
        %(required_capabilities)b::text[]::jsonb[], %(depends_on)b::text[]::jsonb[],
        %(priority)b::text[], %(max_retries)b::int[], %(timeout_seconds)b::int[]
    ) WITH ORDINALITY AS i(ticket_id, plan_id, task_id, intent_id, task_type, description,
                           parameters, required_capabilities, depends_on, priority,
                           max_retries, timeout_seconds, ord)
    -- Batches sharing tickets take turns, per plan: a lock on each plan of the batch, in
    -- plan order, before any row goes in (evaluated once, first). Rows go in in request
    -- order (the order of the listing and of the events), so two batches holding the same
    -- tickets in different orders waited for each other's keys: a deadlock each (a second
    -- to detect, retried, then ABORTED).
    WHERE (SELECT count(*) FROM (
               SELECT pg_advisory_xact_lock(hashtextextended(plan_id, 0))
               FROM (SELECT DISTINCT unnest(%(plan_id)b::text[]) AS plan_id ORDER BY 1) AS p
           ) AS locked) > 0
),
inserted AS (
    INSERT INTO tickets (ticket_id, plan_id, task_id, intent_id, task_type, description,
                         parameters, required_capabilities, depends_on, priority, max_retries,
                         timeout_seconds, status, attempt, version, created_at, updated_at)
    SELECT ticket_id, plan_id, task_id, intent_id, task_type, description, parameters,
           required_capabilities, depends_on, priority, max_retries, timeout_seconds,
           'PENDING', 1, 1, %(now)s, %(now)s
    FROM input ORDER BY ord
    ON CONFLICT (plan_id, task_id) DO NOTHING
    RETURNING *
),
events AS (
    INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, status, actor,
                               occurred_at, ticket)
    SELECT gen_random_uuid(), 'CREATED', ticket_id, plan_id, 'PENDING', %(actor)s, %(now)s,
           to_jsonb(inserted)
    FROM inserted
)
SELECT ticket_id FROM inserted
"""

_SELECT_BY_KEYS = """
SELECT t.* FROM tickets t
JOIN unnest(%(plan_id)s::text[], %(task_id)s::text[]) AS k(plan_id, task_id)
  ON t.plan_id = k.plan_id AND t.task_id = k.task_id
"""

# What a change writes: the ticket columns, and the event row's own fields (with their
# SQL types: the batch statement reads them from JSON records).
_WRITTEN_COLUMNS = {
    "status": "text",
    "attempt": "integer",
    "lost_runs": "integer",
    "worker_id": "text",
    "lease_expires_at": "timestamptz",
    "error_message": "text",
    "result": "jsonb",
    "version": "bigint",
    "last_update_digest": "text",
    "requeue_digest": "text",
    "updated_at": "timestamptz",
    "started_at": "timestamptz",
    "completed_at": "timestamptz",
}
_EVENT_FIELDS = {
    "event_id": "uuid",
    "event_type": "text",
    "event_worker_id": "text",
    "previous_status": "text",
    "actor": "text",
    "occurred_at": "timestamptz",
    "details": "jsonb",
}
_SET_FROM_PARAMS = ", ".join(f"{column} = %({column})s" for column in _WRITTEN_COLUMNS)

_UPDATE_TICKET = f"""
UPDATE tickets SET {_SET_FROM_PARAMS}
WHERE ticket_id = %(ticket_id)s AND version = %(read_version)s
"""

# An event without a change (a refused late result). The payload is the ticket row as
# stored, read back in the same statement. Every write names the version the decision was
# made on and touches no row if the ticket moved on; an event already recorded (the same
# late result sent again: the same event id) is not recorded twice. ``matched``: whether
# the ticket was still at that version.
_INSERT_EVENT = """
WITH t AS (
    SELECT * FROM tickets WHERE ticket_id = %(ticket_id)s AND version = %(read_version)s
), inserted AS (
    INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, worker_id,
                               previous_status, status, actor, occurred_at, ticket, details)
    SELECT %(event_id)s, %(event_type)s, t.ticket_id, t.plan_id, %(event_worker_id)s,
           %(previous_status)s, t.status, %(actor)s, %(occurred_at)s, to_jsonb(t), %(details)s
    FROM t
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM t) AS matched, (SELECT count(*) FROM inserted) AS inserted
"""

# A change and its event in one statement (one round trip): the event reads the updated
# row from RETURNING, since a data-modifying CTE's changes are not visible to the rest of
# the statement.
_UPDATE_TICKET_AND_INSERT_EVENT = f"""
WITH updated AS (
    UPDATE tickets SET {_SET_FROM_PARAMS}
    WHERE ticket_id = %(ticket_id)s AND version = %(read_version)s
    RETURNING *
)
INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, worker_id, previous_status,
                           status, actor, occurred_at, ticket, details)
SELECT %(event_id)s, %(event_type)s, u.ticket_id, u.plan_id, %(event_worker_id)s,
       %(previous_status)s, u.status, %(actor)s, %(occurred_at)s, to_jsonb(u), %(details)s
FROM updated u
"""

# Several changes and their events in one statement, each as the statement above (one
# round trip, one firing of the outbox trigger), from one JSON array of the changes (one
# parameter: cheap to build); returns the ids of the tickets written. Used from
# _BATCH_STATEMENT_MIN changes on: per change, client and PostgreSQL CPU together were
# ~1.2x single statements' at 2 changes, ~1x at 3, ~0.7x at 4, ~0.35x at 16
# (bench/experiments/batch_writes.py). (A batch decided entirely on remembered tickets
# uses its all-or-nothing form below from 2 changes on: it also saves BEGIN and COMMIT.)
_BATCH_STATEMENT_MIN = 4
_BATCH_INPUT = (
    {"ticket_id": "uuid", "read_version": "bigint"}
    | _WRITTEN_COLUMNS
    | _EVENT_FIELDS
    | {"ord": "integer"}
)
_RECORD_COLUMNS = ", ".join(f"{name} {kind}" for name, kind in _BATCH_INPUT.items())
_SET_FROM_INPUT = ", ".join(f"{column} = i.{column}" for column in _WRITTEN_COLUMNS)


def _batch_write(*, all_or_none: bool) -> str:
    """The statement writing a batch of changes with their events (see above).

    ``all_or_none``: the rows are locked first (in one order, so concurrent batches wait
    for each other) and written only if every one is still at the version its change was
    decided on (a locked row is its latest version). One statement is one transaction: a
    batch decided entirely on remembered tickets needs no BEGIN and COMMIT.
    """
    locked = guard = ""
    if all_or_none:
        locked = """locked AS (
    SELECT ticket_id, version FROM tickets WHERE ticket_id = ANY(%(ids)s::uuid[])
    ORDER BY ticket_id FOR UPDATE
), """
        guard = """
      AND (SELECT count(*) FROM locked l JOIN input c
           ON c.ticket_id = l.ticket_id AND c.read_version = l.version) = %(count)s"""
    return f"""
WITH {locked}input AS (
    SELECT * FROM jsonb_to_recordset(%(changes)s) AS i({_RECORD_COLUMNS})
), updated AS (
    UPDATE tickets t SET {_SET_FROM_INPUT}
    FROM input i
    -- The ids again as an array: the rows are found by the primary key whatever the plan
    -- thinks of the JSON's row count (else a cached plan may scan the whole table).
    WHERE t.ticket_id = ANY(%(ids)s::uuid[])
      AND t.ticket_id = i.ticket_id AND t.version = i.read_version{guard}
    RETURNING t.*
), events AS (
    INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, worker_id,
                               previous_status, status, actor, occurred_at, ticket, details)
    SELECT i.event_id, i.event_type, u.ticket_id, u.plan_id, i.event_worker_id,
           i.previous_status, u.status, i.actor, i.occurred_at, to_jsonb(u), i.details
    FROM updated u JOIN input i ON i.ticket_id = u.ticket_id
    ORDER BY i.ord
)
SELECT ticket_id::text FROM updated
"""


_UPDATE_TICKETS_AND_INSERT_EVENTS = _batch_write(all_or_none=False)
_UPDATE_ALL_OR_NONE = _batch_write(all_or_none=True)

_EVENT_COLUMNS = (
    "seq, xid, event_id, event_type, worker_id, previous_status, actor, occurred_at, "
    "ticket, details"
)


RECENT_TICKETS_BYTES = 64 * 1024 * 1024


class RecentTickets:
    """The state this process last wrote for recently changed, unfinished tickets (the
    least recently written are forgotten first).

    A change decided on it skips the read; the write still names the version, so if the
    ticket changed meanwhile (another replica) it touches nothing and the change is decided
    again on a fresh read. Terminal tickets are dropped: nothing changes them any more.
    """

    def __init__(self, max_entries: int, *, max_bytes: int = RECENT_TICKETS_BYTES) -> None:
        self._max_entries = max_entries
        # ... and at most this many bytes of their parameters as JSON (5,000 tickets of
        # 64 KiB parameters would have held 320 MB).
        self._max_bytes = max_bytes
        self._tickets: collections.OrderedDict[str, tuple[Ticket, int]] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._tickets)

    def get(self, ticket_id: str) -> Ticket | None:
        entry = self._tickets.get(ticket_id)
        return entry[0] if entry is not None else None

    def put(self, ticket: Ticket, *, size: int | None = None) -> None:
        """``size``: its :func:`payload_bytes`, when the caller has it at hand."""
        old = self._tickets.pop(ticket.ticket_id, None)
        if old is not None:
            self._bytes -= old[1]
        if ticket.status.terminal or self._max_entries == 0:
            return
        if size is None:
            # A ticket's versions share its spec (unfinished: no result): measured once.
            size = (
                old[1] if old is not None and old[0].spec is ticket.spec else payload_bytes(ticket)
            )
        self._tickets[ticket.ticket_id] = (ticket, size)
        self._bytes += size
        while len(self._tickets) > self._max_entries or (
            self._bytes > self._max_bytes and len(self._tickets) > 1
        ):
            _, (_, dropped) = self._tickets.popitem(last=False)
            self._bytes -= dropped


class TicketRepository:
    """All ticket persistence. Raises only :class:`hive_common.errors.HiveError`.

    ``recent_tickets``: how many recently changed tickets to remember (:class:`RecentTickets`;
    0 disables it).
    """

    def __init__(
        self,
        *,
        pool: Pool,
        clock: Clock = utc_now,
        on_change: Callable[[TransitionCounts], None] | None = None,
        recent_tickets: int = 5_000,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._on_change = on_change
        self._recent = RecentTickets(recent_tickets)
        self._creates: GroupCommit[tuple[TicketSpec, str], tuple[Ticket, bool]] = GroupCommit(
            self._create_each, take=_one_actor_distinct_tasks, name="ticket-creates"
        )
        self._changes: GroupCommit[Change, Ticket] = GroupCommit(
            self._write_changes,
            take=distinct_prefix(lambda change: change[0], limit=_CHANGES_PER_WRITE),
            name="ticket-changes",
        )

    async def aclose(self) -> None:
        """Stop writing grouped creates and changes (those still waiting are cancelled)."""
        await self._creates.aclose()
        await self._changes.aclose()

    # -- plumbing -------------------------------------------------------------------------

    async def _run(
        self,
        work: Callable[[AsyncConnection[DictRow]], Awaitable[T]],
        *,
        transaction: bool = True,
    ) -> T:
        """Run ``work`` in one transaction, retrying deadlocks; translate driver errors.

        ``transaction=False`` for work that is one statement (atomic on its own, on an
        autocommit connection): it saves the BEGIN and COMMIT round trips.
        """
        async with database_errors("ticket database"):
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    async with connection(self._pool) as conn:
                        if not transaction:
                            return await work(conn)
                        async with conn.transaction():
                            return await work(conn)
                except _RETRYABLE as exc:
                    if attempt == _ATTEMPTS:
                        raise Aborted("concurrent update conflict; retry the request") from exc
                    await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, query: Statement, params: Params | None = None) -> list[DictRow]:
        """The rows of one statement run on its own (no BEGIN/COMMIT round trips)."""
        return await self._fetch_converted(query, params, lambda row: row)

    async def _fetch_converted(
        self, query: Statement, params: Params | None, convert: Callable[[DictRow], T]
    ) -> list[T]:
        """``[convert(row) for row in rows]`` of one statement run on its own, decoded a
        chunk of rows at a time with the event loop let in between: decoding a few hundred
        events (their ticket JSON) at once would hold up every other request for
        milliseconds."""

        async def work(conn: AsyncConnection[DictRow]) -> list[T]:
            cur = await conn.execute(query, params)
            converted: list[T] = []
            while rows := await cur.fetchmany(_CONVERT_CHUNK):
                converted.extend(convert(row) for row in rows)
                if len(rows) == _CONVERT_CHUNK:
                    await asyncio.sleep(0)
            return converted

        return await self._run(work, transaction=False)

    async def _execute(self, query: Statement, params: Params | None = None) -> int:
        """One statement without results, on its own; how many rows it touched."""

        async def work(conn: AsyncConnection[DictRow]) -> int:
            cur = await conn.execute(query, params)
            return cur.rowcount

        return await self._run(work, transaction=False)

    def _changed(self, counts: TransitionCounts) -> None:
        """Tell the process (watchers, metrics) what was just committed."""
        if self._on_change is not None and counts:
            self._on_change(counts)

    def _changed_events(self, events: Sequence[TicketEvent]) -> None:
        for event in events:
            self._recent.put(event.ticket)  # each event carries the ticket as written
        self._changed(
            collections.Counter((e.type, e.previous_status, e.ticket.status) for e in events)
        )

    async def _apply(
        self, conn: AsyncConnection[DictRow], outcome: Outcome, *, read_version: int
    ) -> Outcome | None:
        """Write ``outcome`` if the ticket is still at ``read_version`` (the version the
        decision was made on); the outcome as written, or None when a concurrent change got
        there first. An event alone (a rejected late result) that was recorded before (the
        same report repeated: the same event id) is not recorded again, nor reported."""
        if _is_change(outcome):
            params = _row_params(outcome, read_version) | _event_params(outcome, read_version)
            cur = await conn.execute(_UPDATE_TICKET_AND_INSERT_EVENT, params)
            return outcome if cur.rowcount == 1 else None
        if outcome.changed:
            cur = await conn.execute(_UPDATE_TICKET, _row_params(outcome, read_version))
            return outcome if cur.rowcount == 1 else None
        if outcome.event is not None:
            cur = await conn.execute(_INSERT_EVENT, _event_params(outcome, read_version))
            row = await cur.fetchone()
            if row is None or row["matched"] != 1:
                return None
            return outcome if row["inserted"] else dataclasses.replace(outcome, event=None)
        return outcome

    async def _apply_all(
        self, conn: AsyncConnection[DictRow], decided: Sequence[tuple[Outcome, int]]
    ) -> list[Outcome | None]:
        """Write every ``(outcome, read_version)``: the changes with an event (nearly all)
        in one statement when there are enough of them, the rest one by one. Returns, per
        position, the outcome as written, or None when its ticket had moved on (not
        written)."""
        applied: list[Outcome | None] = [outcome for outcome, _ in decided]
        changes = [i for i, (outcome, _) in enumerate(decided) if _is_change(outcome)]
        one_by_one: Sequence[int] = range(len(decided))
        if len(changes) >= _BATCH_STATEMENT_MIN:
            written = await self._apply_changes(conn, [decided[i] for i in changes])
            for i in changes:
                if decided[i][0].ticket.ticket_id not in written:
                    applied[i] = None
            one_by_one = [i for i in one_by_one if not _is_change(decided[i][0])]
        for i in one_by_one:
            outcome, version = decided[i]
            applied[i] = await self._apply(conn, outcome, read_version=version)
        return applied

    async def _apply_changes(
        self,
        conn: AsyncConnection[DictRow],
        changes: Sequence[tuple[Outcome, int]],
        *,
        all_or_none: bool = False,
    ) -> set[str]:
        """Write outcomes that change their ticket and record an event, each ``(outcome,
        read_version)`` as :meth:`_apply` would, in one statement; returns the ids of the
        tickets written (the others had moved on; with ``all_or_none``, none is written
        unless all are still at their read version)."""
        rows = [
            {
                name: _json_value(value)
                for name, value in (
                    _row_params(outcome, version) | _event_params(outcome, version)
                ).items()
            }
            | {"ord": ord}
            for ord, (outcome, version) in enumerate(changes)
        ]
        params = {
            "changes": Jsonb(rows),
            "ids": [row["ticket_id"] for row in rows],
            "count": len(rows),
        }
        statement = _UPDATE_ALL_OR_NONE if all_or_none else _UPDATE_TICKETS_AND_INSERT_EVENTS
        cur = await conn.execute(statement, params)
        return {row["ticket_id"] for row in await cur.fetchall()}

    async def _apply_all_on_recent(self, requests: Sequence[Change]) -> list[Outcome] | None:
        """The changes ``(ticket_id, decide)`` of a batch (tickets distinct), in request
        order, written in one all-or-nothing statement when every one can be decided on its
        remembered ticket; None when one cannot, or a ticket moved on meanwhile (then
        nothing was written)."""
        decided: list[tuple[Outcome, int]] = []
        for ticket_id, decide in requests:
            on_recent = self._decided_on_recent(ticket_id, decide)
            if on_recent is None or not _is_change(on_recent[0]):
                return None
            decided.append(on_recent)

        async def work(conn: AsyncConnection[DictRow]) -> set[str]:
            return await self._apply_changes(conn, decided, all_or_none=True)

        if not await self._run(work, transaction=False):
            return None
        return [outcome for outcome, _ in decided]

    async def _decide_and_write(self, requests: Sequence[Change]) -> list[Outcome | HiveError]:
        """Decide and write changes ``(ticket_id, decide)`` of distinct tickets; per request,
        in order, its outcome or its refusal.

        A change decided on a ticket in :class:`RecentTickets` skips the read (the write
        names the version it was decided on); when every one can be, the batch is one
        all-or-nothing statement. The others (not remembered, refusals and repeats, which
        write nothing and are always decided on a fresh read, and those whose ticket moved
        on) are read together, decided and written together, in one transaction with the
        rest. One change is one autocommit statement or two (read, write-if-unchanged).
        """
        if len(requests) > 1:
            written = await self._apply_all_on_recent(requests)
            if written is not None:
                return list(written)
        # In one order within each phase (remembered tickets, then fresh reads), so such
        # batches wait for each other instead of deadlocking. Across the two phases the
        # order is not global: an AssignTickets locking the same tickets can (rarely)
        # deadlock with one; PostgreSQL detects it in a second and _run retries.
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])

        async def work(conn: AsyncConnection[DictRow]) -> dict[int, Outcome | HiveError]:
            on_recent = {
                i: decided for i in order if (decided := self._decided_on_recent(*requests[i]))
            }
            indexes = list(on_recent)
            applied = await self._apply_all(conn, [on_recent[i] for i in indexes])
            results: dict[int, Outcome | HiveError] = {
                i: outcome
                for i, outcome in zip(indexes, applied, strict=True)
                if outcome is not None
            }
            await self._decide_fresh_and_apply(
                conn, [(i, requests[i]) for i in order if i not in results], results
            )
            return results

        # One change needs no transaction: its one write is atomic on its own.
        results = await self._run(work, transaction=len(requests) > 1)
        return [results[i] for i in range(len(requests))]

    def _decided_on_recent(
        self, ticket_id: str, decide: Callable[[Ticket, datetime], Outcome]
    ) -> tuple[Outcome, int] | None:
        """``(outcome, read_version)`` decided on the remembered ticket, when there is one
        and the decision writes (refusals and repeats are decided on a fresh read)."""
        recent = self._recent.get(ticket_id)
        if recent is None:
            return None
        try:
            outcome = decide(recent, self._clock())
        except HiveError:
            return None
        if outcome.changed or outcome.event is not None:
            return outcome, recent.version
        return None

    async def _decide_fresh_and_apply(
        self,
        conn: AsyncConnection[DictRow],
        requests: Sequence[tuple[int, Change]],
        results: dict[int, Outcome | HiveError],
    ) -> None:
        """Read the tickets of ``(key, change)`` requests in one statement,
        decide each and write them together; each outcome (or refusal) goes in
        ``results`` under its key. Those whose ticket moved on before the write are read
        and decided again, at most :data:`_OPTIMISTIC_ATTEMPTS` times (then ABORTED)."""
        pending = list(requests)
        for _ in range(_OPTIMISTIC_ATTEMPTS):
            if not pending:
                return
            cur = await conn.execute(
                "SELECT * FROM tickets WHERE ticket_id = ANY(%s::uuid[])",
                ([ticket_id for _, (ticket_id, _) in pending],),
            )
            found = {str(row["ticket_id"]): ticket_from_row(row) for row in await cur.fetchall()}
            now = self._clock()
            decided: list[tuple[tuple[int, Change], tuple[Outcome, int]]] = []
            for request in pending:
                key, (ticket_id, decide) = request
                ticket = found.get(ticket_id)
                if ticket is None:
                    results[key] = _not_found(ticket_id)
                    continue
                try:
                    decided.append((request, (decide(ticket, now), ticket.version)))
                except HiveError as exc:  # the decision's refusal (not database errors)
                    results[key] = exc
            applied = await self._apply_all(conn, [change for _, change in decided])
            pending = []
            for (request, _), outcome in zip(decided, applied, strict=True):
                if outcome is None:
                    pending.append(request)
                else:
                    results[request[0]] = outcome
        for key, (ticket_id, _) in pending:
            results[key] = _kept_changing(ticket_id)

    # -- creation -------------------------------------------------------------------------

    async def create(self, spec: TicketSpec, *, actor: str) -> tuple[Ticket, bool]:
        """Create one ticket: ``(ticket, created)`` as :meth:`create_many` for one spec.
        Creates made concurrently (by one actor, of distinct tasks) are written together,
        each still created or refused on its own."""
        return await self._creates.submit((spec, actor))

    async def create_many(
        self, specs: Sequence[TicketSpec], *, actor: str
    ) -> list[tuple[Ticket, bool]]:
        """Create tickets all-or-nothing; returns ``(ticket, created)`` in request order.

        Idempotent per (plan_id, task_id): an identical existing ticket is returned with
        ``created=False``; a different one makes the whole batch ALREADY_EXISTS.
        """
        answers = await self._insert(specs, actor=actor, all_or_none=True)
        return cast(list[tuple[Ticket, bool]], answers)  # a refusal was raised instead

    async def _create_each(
        self, items: Sequence[tuple[TicketSpec, str]]
    ) -> list[tuple[Ticket, bool] | AlreadyExists]:
        """The grouped creates of :meth:`create` (one actor, distinct tasks)."""
        return await self._insert([spec for spec, _ in items], actor=items[0][1], all_or_none=False)

    async def _insert(
        self, specs: Sequence[TicketSpec], *, actor: str, all_or_none: bool
    ) -> list[tuple[Ticket, bool] | AlreadyExists]:
        """``(ticket, created)`` per spec, or its refusal (an existing ticket with other
        content); ``all_or_none``: one refusal refuses the whole batch (raised)."""
        now = self._clock()
        ids = new_uuid4_strings(len(specs))
        params: dict[str, Any] = {
            "ticket_id": ids,
            "plan_id": [s.plan_id for s in specs],
            "task_id": [s.task_id for s in specs],
            "intent_id": [s.intent_id for s in specs],
            "task_type": [s.task_type for s in specs],
            "description": [s.description for s in specs],
            "parameters": [json.dumps(s.parameters) for s in specs],
            "required_capabilities": [json.dumps(s.required_capabilities) for s in specs],
            "depends_on": [json.dumps(s.depends_on) for s in specs],
            "priority": [s.priority.value for s in specs],
            "max_retries": [s.max_retries for s in specs],
            "timeout_seconds": [s.timeout_seconds for s in specs],
            "now": now,
            "actor": actor,
        }
        # Fields of a batch's refusals name the ticket's position in the request.
        prefix = "tickets[{}]" if all_or_none and len(specs) > 1 else "ticket"

        async def work(conn: AsyncConnection[DictRow]) -> list[tuple[Ticket, bool] | AlreadyExists]:
            cur = await conn.execute(_INSERT_TICKETS, params)
            inserted = {str(row["ticket_id"]) for row in await cur.fetchall()}
            existing: dict[tuple[str, str], Ticket] = {}
            if len(inserted) < len(specs):
                missing = [s for s, i in zip(specs, ids, strict=True) if i not in inserted]
                cur = await conn.execute(
                    _SELECT_BY_KEYS,
                    {
                        "plan_id": [s.plan_id for s in missing],
                        "task_id": [s.task_id for s in missing],
                    },
                )
                for row in await cur.fetchall():
                    ticket = ticket_from_row(row)
                    existing[(ticket.plan_id, ticket.task_id)] = ticket
            answers: list[tuple[Ticket, bool] | AlreadyExists] = []
            violations: list[FieldViolation] = []
            for index, (spec, ticket_id) in enumerate(zip(specs, ids, strict=True)):
                if ticket_id in inserted:
                    answers.append((_new_ticket(ticket_id, spec, now), True))
                    continue
                found = existing[(spec.plan_id, spec.task_id)]
                differing = [
                    FieldViolation(
                        field=f"{prefix.format(index)}.{name}",
                        description=f"differs from existing ticket {found.ticket_id}",
                    )
                    for name in _spec_differences(found.spec, spec)
                ]
                violations.extend(differing)
                answers.append(_conflict(differing) if differing else (found, False))
            if all_or_none and violations:
                raise _conflict(violations)  # rolls the batch back
            return answers

        # One INSERT either creates a ticket or changes nothing (a conflict): only an
        # all-or-nothing batch has anything to roll back.
        answers = await self._run(work, transaction=all_or_none and len(specs) > 1)
        created = 0
        for answer, parameters in zip(answers, params["parameters"], strict=True):
            if not isinstance(answer, AlreadyExists) and answer[1]:
                # As written: the first assignment needs no read (its parameters' JSON,
                # encoded for the row, is what the memory counts).
                self._recent.put(answer[0], size=len(parameters))
                created += 1
        self._changed({(EventType.CREATED, None, TicketStatus.PENDING): created} if created else {})
        return answers

    # -- reads --------------------------------------------------------------------------------

    async def get(self, ticket_id: str) -> Ticket:
        rows = await self._fetch("SELECT * FROM tickets WHERE ticket_id = %s", (ticket_id,))
        if not rows:
            raise _not_found(ticket_id)
        return ticket_from_row(rows[0])

    async def list_page(
        self, ticket_filter: TicketFilter, *, after_seq: int, limit: int
    ) -> tuple[list[tuple[int, Ticket]], bool]:
        """Up to ``limit`` tickets after ``after_seq`` in insertion order, each with its seq
        (what a page token continues after), and whether more follow them."""
        conditions = [sql.SQL("seq > %(after)s")]
        if ticket_filter.plan_id:
            conditions.append(sql.SQL("plan_id = %(plan_id)s"))
        if ticket_filter.worker_id:
            conditions.append(sql.SQL("worker_id = %(worker_id)s"))
        if ticket_filter.statuses:
            conditions.append(sql.SQL("status = ANY(%(statuses)s)"))
        query = sql.SQL("SELECT * FROM tickets WHERE {} ORDER BY seq LIMIT %(limit)s").format(
            sql.SQL(" AND ").join(conditions)
        )
        params = {
            "after": after_seq,
            "plan_id": ticket_filter.plan_id,
            "worker_id": ticket_filter.worker_id,
            "statuses": sorted(s.value for s in ticket_filter.statuses),
            "limit": limit + 1,
        }

        rows = await self._fetch(query, params)
        return [(r["seq"], ticket_from_row(r)) for r in rows[:limit]], len(rows) > limit

    async def count_unfinished(self) -> dict[TicketStatus, int]:
        """How many tickets are PENDING, ASSIGNED and RUNNING: the status index serves it,
        so the cost follows the unfinished tickets, not every ticket ever made."""
        unfinished = [status for status in TicketStatus if not status.terminal]
        counts = dict.fromkeys(unfinished, 0)
        rows = await self._fetch(
            "SELECT status, count(*) AS n FROM tickets WHERE status = ANY(%s) GROUP BY status",
            ([status.value for status in unfinished],),
        )
        for row in rows:
            counts[TicketStatus(row["status"])] = row["n"]
        return counts

    async def ping(self) -> None:
        await self._fetch("SELECT 1 FROM tickets LIMIT 0")

    # -- changes ------------------------------------------------------------------------------

    async def assign(self, request: Assignment, *, actor: str) -> Ticket:
        """Apply one assignment, or raise its refusal; written together with concurrent
        changes, as by :meth:`update_status_many` (with a capacity check: as one batch)."""
        if request.worker_capacity:
            [answer] = await self.assign_many([request], actor=actor)
            if isinstance(answer, HiveError):
                raise answer
            return answer
        return await self._changes.submit((request.ticket_id, _assigning(request, actor)))

    async def assign_many(
        self, requests: Sequence[Assignment], *, actor: str
    ) -> list[Ticket | HiveError]:
        """Several assignments in one transaction (tickets distinct); each one is applied
        or refused (the error AssignTicket would raise) on its own, in request order.

        An assignment with a ``worker_capacity`` is refused when its worker holds that many
        tickets (ASSIGNED or RUNNING) already: the workers' counts are read under a lock
        per worker (held to the commit), so two replicas assigning to one worker at once
        cannot both take its last slot."""
        ids = [r.ticket_id for r in requests]
        checked = sorted({r.worker_id for r in requests if r.worker_capacity})
        if len(requests) > 1 and not checked:
            written = await self._apply_all_on_recent(
                [(r.ticket_id, _assigning(r, actor)) for r in requests]
            )
            if written is not None:
                return self._batch_answers(written)

        async def work(conn: AsyncConnection[DictRow]) -> list[Outcome | HiveError]:
            held = await _held_by_workers(conn, checked) if checked else {}
            # Locked in one order, so concurrent batches cannot deadlock on each other.
            cur = await conn.execute(
                "SELECT * FROM tickets WHERE ticket_id = ANY(%s::uuid[]) "
                "ORDER BY ticket_id FOR UPDATE",
                (ids,),
            )
            found = {str(row["ticket_id"]): ticket_from_row(row) for row in await cur.fetchall()}
            now = self._clock()
            results: list[Outcome | HiveError] = []
            decided: list[tuple[Outcome, int]] = []
            for request in requests:
                ticket = found.get(request.ticket_id)
                if ticket is None:
                    results.append(_not_found(request.ticket_id))
                    continue
                try:
                    outcome = decide_assign(ticket, request, now=now, actor=actor)
                    if _is_change(outcome):  # a repeated assignment holds its slot already
                        check_worker_capacity(request, held.get(request.worker_id, 0))
                        held[request.worker_id] = held.get(request.worker_id, 0) + 1
                except HiveError as exc:
                    results.append(exc)
                    continue
                decided.append((outcome, ticket.version))
                results.append(outcome)
            await self._apply_all(conn, decided)  # rows locked: every one is written
            return results

        return self._batch_answers(await self._run(work))

    async def update_status(self, update: StatusUpdate, *, actor: str) -> Ticket:
        """Apply one status update, or raise its refusal; written together with concurrent
        changes, as by :meth:`update_status_many`."""
        return await self._changes.submit((update.ticket_id, _deciding(update, actor)))

    async def update_status_many(
        self, updates: Sequence[tuple[StatusUpdate, str]]
    ) -> list[Ticket | HiveError]:
        """Several status updates ``(update, actor)`` of distinct tickets; each is applied
        or refused (the error :meth:`update_status` would raise) on its own, in request
        order. A late result is recorded and refused, as by :meth:`update_status`.

        Changes made concurrently, by this call and others, are written together (group
        commit), up to :data:`_CHANGES_PER_WRITE` at a time: see :meth:`_decide_and_write`.
        """
        answers = await self._changes.submit_many(
            [(update.ticket_id, _deciding(update, actor)) for update, actor in updates]
        )
        return cast(list[Ticket | HiveError], answers)  # _write_changes's answers

    async def _write_changes(self, changes: Sequence[Change]) -> list[Ticket | HiveError]:
        """The grouped changes of :meth:`assign`, :meth:`update_status` and
        :meth:`update_status_many` (distinct tickets)."""
        return self._batch_answers(await self._decide_and_write(changes))

    def _batch_answers(self, outcomes: Sequence[Outcome | HiveError]) -> list[Ticket | HiveError]:
        """Tell the process what a batch changed; its answers (a late result is refused)."""
        self._changed_events(
            [o.event for o in outcomes if isinstance(o, Outcome) and o.event is not None]
        )
        return [
            o if isinstance(o, HiveError) else o.error if o.error is not None else o.ticket
            for o in outcomes
        ]

    async def expire_leases(self, *, limit: int = 100) -> list[TicketEvent]:
        """Re-queue or fail tickets whose lease passed. Replicas skip each other's rows."""
        now = self._clock()

        async def work(conn: AsyncConnection[DictRow]) -> list[TicketEvent]:
            cur = await conn.execute(
                "SELECT * FROM tickets WHERE lease_expires_at <= %s "
                "ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, limit),
            )
            decided: list[tuple[Outcome, int]] = []
            for row in await cur.fetchall():
                ticket = ticket_from_row(row)
                decided.append((decide_lease_expiry(ticket, now=now), ticket.version))
            await self._apply_all(conn, decided)  # rows locked: every one is written
            return [outcome.event for outcome, _ in decided if outcome.event is not None]

        events = await self._run(work)
        self._changed_events(events)
        return events

    # -- the event log: watch -------------------------------------------------------------

    async def current_position(self) -> Cursor:
        """Where "new events only" starts: everything from still-running transactions on
        (see :func:`_start_position`)."""
        [row] = await self._fetch(_START_POSITION)
        return _start_position(row)

    async def snapshot(
        self, ticket_filter: TicketFilter, *, after_seq: int = 0, limit: int
    ) -> tuple[Cursor, list[tuple[int, Ticket]]]:
        """The first ``limit`` non-terminal matching tickets (with their sequence numbers,
        in that order, after ``after_seq``) plus the position to follow them from,
        consistently.

        Events after the position may repeat changes already in the snapshot (at least once);
        ``ticket.version`` tells a client which is newer.
        """
        conditions = [
            sql.SQL("status IN ('PENDING', 'ASSIGNED', 'RUNNING')"),
            sql.SQL("seq > %(after)s"),
        ]
        if ticket_filter.plan_id:
            conditions.append(sql.SQL("plan_id = %(plan_id)s"))
        if ticket_filter.worker_id:
            conditions.append(sql.SQL("worker_id = %(worker_id)s"))
        query = sql.SQL("SELECT * FROM tickets WHERE {} ORDER BY seq LIMIT %(limit)s").format(
            sql.SQL(" AND ").join(conditions)
        )
        params = {
            "plan_id": ticket_filter.plan_id,
            "worker_id": ticket_filter.worker_id,
            "after": after_seq,
            "limit": limit,
        }

        async def work(conn: AsyncConnection[DictRow]) -> tuple[Cursor, list[tuple[int, Ticket]]]:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await conn.execute(_START_POSITION)
            row = await cur.fetchone()
            assert row is not None
            cur = await conn.execute(query, params)
            tickets = [(r["seq"], ticket_from_row(r)) for r in await cur.fetchall()]
            return _start_position(row), tickets

        return await self._run(work)

    async def events_after(
        self,
        cursor: Cursor,
        ticket_filter: TicketFilter,
        *,
        limit: int,
        until: Cursor | None = None,
    ) -> list[TicketEvent]:
        """Committed events after ``cursor`` (and at or before ``until``) in log order,
        never skipping a late commit. Raises :class:`CursorPurged` when the event purge
        deleted events after ``cursor`` (read in the same statement, so consistently: a
        purge that commits later finds the events already read)."""
        conditions = [
            sql.SQL("(xid, seq) > (%(xid)s, %(seq)s)"),
            # Rows of transactions still running could later appear *before* rows we have
            # already passed; only read below the oldest running transaction.
            sql.SQL("xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"),
        ]
        if until is not None:
            conditions.append(sql.SQL("(xid, seq) <= (%(until_xid)s, %(until_seq)s)"))
        if ticket_filter.plan_id:
            conditions.append(sql.SQL("plan_id = %(plan_id)s"))
        if ticket_filter.worker_id:
            conditions.append(sql.SQL("worker_id = %(worker_id)s"))
        # The purge mark's one row, joined with the events (none: one row of NULLs).
        query = sql.SQL(
            "SELECT m.xid AS purged_xid, m.seq AS purged_seq, e.* FROM ticket_events_purged m"
            " LEFT JOIN LATERAL (SELECT {} FROM ticket_events WHERE {}"
            " ORDER BY xid, seq LIMIT %(limit)s) e ON true ORDER BY e.xid, e.seq"
        ).format(sql.SQL(_EVENT_COLUMNS), sql.SQL(" AND ").join(conditions))
        params = {
            "xid": cursor.xid,
            "seq": cursor.seq,
            "plan_id": ticket_filter.plan_id,
            "worker_id": ticket_filter.worker_id,
            "until_xid": until.xid if until is not None else None,
            "until_seq": until.seq if until is not None else None,
            "limit": limit,
        }
        rows = await self._fetch_converted(query, params, _purged_and_event_from_row)
        purged_through = rows[0][0]
        if purged_through > cursor:
            raise CursorPurged(purged_through)
        return [event for _, event in rows if event is not None]

    # -- the event log: outbox ----------------------------------------------------------------

    async def claim_outbox(self, *, limit: int, claim_seconds: float) -> list[OutboxEntry]:
        """Claim undelivered events for ``claim_seconds``; other replicas skip them."""
        # The rows are found by primary key, as arrays: joined instead, the planner (which
        # cannot know how many are claimed) may hash the whole event log on every claim.
        return await self._fetch_converted(
            f"""
            WITH claimed AS (
                UPDATE ticket_outbox
                SET claimed_until = now() + %(claim)s * interval '1 second'
                WHERE seq = ANY(ARRAY(
                    SELECT seq FROM ticket_outbox
                    WHERE claimed_until IS NULL OR claimed_until < now()
                    ORDER BY seq LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED))
                RETURNING seq
            )
            SELECT {_EVENT_COLUMNS} FROM ticket_events
            WHERE seq = ANY(ARRAY(SELECT seq FROM claimed)) ORDER BY seq
            """,
            {"claim": claim_seconds, "limit": limit},
            lambda row: OutboxEntry(seq=row["seq"], event=_event_from_row(row)),
        )

    async def mark_relayed(self, seqs: Sequence[int]) -> None:
        await self._execute("DELETE FROM ticket_outbox WHERE seq = ANY(%s)", (list(seqs),))

    async def release_claims(self, seqs: Sequence[int]) -> None:
        """Give claimed events back at once (delivery failed) instead of waiting for expiry."""
        await self._execute(
            "UPDATE ticket_outbox SET claimed_until = NULL WHERE seq = ANY(%s)", (list(seqs),)
        )

    async def purge_events(self, *, older_than: datetime, limit: int = 10_000) -> int:
        """Delete relayed events that happened before ``older_than`` (never undelivered
        ones, nor any a watch cannot have read yet: see :meth:`events_after`); a trigger
        moves the purge mark past them (a reader positioned before it gets
        :class:`CursorPurged`)."""
        return await self._execute(
            "DELETE FROM ticket_events WHERE seq IN ("
            " SELECT e.seq FROM ticket_events e"
            " WHERE e.occurred_at < %s"
            "   AND e.xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            "   AND NOT EXISTS (SELECT 1 FROM ticket_outbox o WHERE o.seq = e.seq)"
            " ORDER BY e.seq LIMIT %s)",
            (older_than, limit),
        )

    async def check_resumable(self, cursor: Cursor) -> None:
        """Refuse a position no reader can go on from: ahead of the log (made up, or from
        another database: a restore restarts the transaction ids; the stream would wait
        for events that never come), or before an event the purge deleted
        (:class:`CursorPurged`)."""
        [row] = await self._fetch(_START_POSITION)
        if cursor > _start_position(row):
            raise InvalidArgument(
                "invalid watch request",
                violations=[
                    FieldViolation("cursor", "is ahead of the event log (from another database?)")
                ],
            )
        purged_through = Cursor(xid=row["xid"], seq=row["seq"])
        if purged_through > cursor:
            raise CursorPurged(purged_through)

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """How many events await relay, and when the first of them (in log order) happened.

        The first one is looked up by primary key: joining the backlog to the event log
        made the planner hash the whole log."""
        [row] = await self._fetch(
            "SELECT count(*) AS n, (SELECT occurred_at FROM ticket_events"
            " WHERE seq = (SELECT min(seq) FROM ticket_outbox)) AS oldest FROM ticket_outbox"
        )
        return row["n"], row["oldest"]


def _json_value(value: Any) -> Any:
    """A statement parameter as JSON (timestamps as ISO 8601 text; PostgreSQL reads them
    back into their columns' types)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Jsonb):
        return value.obj
    return value


def _is_change(outcome: Outcome) -> bool:
    """A ticket write with its event (what a batch writes in one statement)."""
    return outcome.changed and outcome.event is not None


def _row_params(outcome: Outcome, read_version: int) -> dict[str, Any]:
    ticket = outcome.ticket
    return {
        "ticket_id": ticket.ticket_id,
        "read_version": read_version,
        "status": ticket.status.value,
        "attempt": ticket.attempt,
        "lost_runs": ticket.lost_runs,
        "worker_id": ticket.worker_id or None,
        "lease_expires_at": ticket.lease_expires_at,
        "error_message": ticket.error_message,
        "result": None if ticket.result is None else Jsonb(ticket.result),
        "version": ticket.version,
        "last_update_digest": ticket.last_update_digest,
        "requeue_digest": ticket.requeue_digest,
        "updated_at": ticket.updated_at,
        "started_at": ticket.started_at,
        "completed_at": ticket.completed_at,
    }


def _event_params(outcome: Outcome, read_version: int) -> dict[str, Any]:
    event = outcome.event
    assert event is not None
    return {
        "ticket_id": outcome.ticket.ticket_id,
        "read_version": read_version,
        "event_id": event.event_id,
        "event_type": event.type.value,
        "event_worker_id": event.worker_id or None,
        "previous_status": event.previous_status.value if event.previous_status else None,
        "actor": event.actor,
        "occurred_at": event.occurred_at,
        "details": Jsonb(event.details),
    }


def _deciding(update: StatusUpdate, actor: str) -> Callable[[Ticket, datetime], Outcome]:
    return lambda ticket, now: decide_update(ticket, update, now=now, actor=actor)


def _assigning(request: Assignment, actor: str) -> Callable[[Ticket, datetime], Outcome]:
    return lambda ticket, now: decide_assign(ticket, request, now=now, actor=actor)


def _conflict(violations: list[FieldViolation]) -> AlreadyExists:
    return AlreadyExists(
        "a ticket with the same plan_id and task_id but different content exists",
        violations=violations,
        details={"differing_fields": ", ".join(v.field for v in violations)},
    )


_distinct_tasks: Take[tuple[TicketSpec, str]] = distinct_prefix(
    lambda item: (item[0].plan_id, item[0].task_id), limit=_CREATES_PER_WRITE
)


def _one_actor_distinct_tasks(items: Sequence[tuple[TicketSpec, str]]) -> int:
    """How many grouped creates go in one statement: of one actor (the events name it) and
    distinct (plan_id, task_id)."""
    actor = items[0][1]
    count = _distinct_tasks(items)
    return next((n for n, (_, a) in enumerate(items[:count]) if a != actor), count)


def _kept_changing(ticket_id: str) -> Aborted:
    return Aborted(
        f"ticket {ticket_id} kept changing concurrently; retry the request",
        details={"ticket_id": ticket_id},
    )


# pg_advisory_xact_lock's first key for the per-worker assignment locks.
_WORKER_LOCKS = 0x68697665  # "hive"


async def _held_by_workers(conn: AsyncConnection[DictRow], workers: list[str]) -> dict[str, int]:
    """Lock each worker (sorted, so assigners cannot deadlock; to the commit) and count its
    tickets ASSIGNED or RUNNING. Two statements: the count's snapshot is taken after the
    locks, so it sees what a concurrent assigner committed before releasing them."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(w))"
        " FROM (SELECT w FROM unnest(%s::text[]) AS w ORDER BY w) AS sorted",
        (_WORKER_LOCKS, workers),
    )
    cur = await conn.execute(
        "SELECT worker_id, count(*) AS held FROM tickets"
        " WHERE worker_id = ANY(%s::text[]) AND status IN ('ASSIGNED', 'RUNNING')"
        " GROUP BY worker_id",
        (workers,),
    )
    return {row["worker_id"]: row["held"] for row in await cur.fetchall()}


def _not_found(ticket_id: str) -> NotFound:
    return NotFound(f"ticket {ticket_id} not found", details={"ticket_id": ticket_id})


def _new_ticket(ticket_id: str, spec: TicketSpec, now: datetime) -> Ticket:
    return Ticket(
        ticket_id=ticket_id,
        spec=spec,
        status=TicketStatus.PENDING,
        attempt=1,
        version=1,
        created_at=now,
        updated_at=now,
    )


__all__ = ["OutboxEntry", "Pool", "TicketRepository", "open_pool"]
