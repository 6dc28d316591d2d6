"""What does the audit relay's bookkeeping cost PostgreSQL? (finding for the narrow outbox)

Two fresh databases on a throwaway PostgreSQL (durable, as the bench runs it): one of the
schema before migration 0002 (the relay claimed and marked the wide ``ticket_events`` rows
themselves), one of today's schema (a trigger enters each event into the narrow
``ticket_outbox``; the relay claims and deletes there, through ``TicketRepository``), and
one of today's schema without the outbox (``cursor``: the trigger dropped, the relay reads
the event log after its position with ``TicketRepository.events_after``, as the watch tail
does, and writes its position to a one-row table: what a relay that follows the log would
cost instead of the outbox's insert, claim and delete per event).
Both get the same work, alternating, ``rounds`` times: ``batch`` events inserted one
statement each (as status changes write them), then one relay round over them (claim,
then mark delivered). Reports PostgreSQL's CPU and WAL per event and the dead event rows
left behind. Run: ``uv run --all-packages python -m bench.experiments.outbox_cost``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.environment import databases
from execution_ticket_service.domain.models import TicketFilter
from execution_ticket_service.domain.paging import Cursor
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from execution_ticket_service.storage.tickets import TicketRepository, open_pool
from execution_ticket_service.watch import cursor_of
from hive_common.migrations import apply_migrations
from hive_testsupport.migrations import migrations_until

_INSERT_EVENT = """
INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, worker_id, previous_status,
                           status, actor, occurred_at, ticket, details)
VALUES (%s, 'STATUS_CHANGED', %s, 'plan-1', 'w1', 'ASSIGNED', 'RUNNING', 'worker:w1', now(),
        %s, '{}')
"""

# The relay's statements before migration 0002 (storage/tickets.py at 3b4bd7f).
_CLAIM_BEFORE = """
UPDATE ticket_events SET relay_claimed_until = now() + interval '30 seconds'
WHERE seq IN (
    SELECT seq FROM ticket_events
    WHERE relayed_at IS NULL AND (relay_claimed_until IS NULL OR relay_claimed_until < now())
    ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING seq, xid, event_id, event_type, worker_id, previous_status, actor, occurred_at,
          ticket, details
"""
_MARK_BEFORE = (
    "UPDATE ticket_events SET relayed_at = now(), relay_claimed_until = NULL WHERE seq = ANY(%s)"
)


# The cursor relay's bookkeeping: one row, claimed for a while (as outbox rows are, so one
# replica relays at a time), then moved to the last event delivered.
_POSITION_TABLE = """
CREATE TABLE audit_relay_position (
    id int PRIMARY KEY, xid bigint NOT NULL, seq bigint NOT NULL, claimed_until timestamptz
) WITH (fillfactor = 50)
"""
_CLAIM_POSITION = (
    "UPDATE audit_relay_position SET claimed_until = now() + interval '30 seconds' WHERE id = 1"
)
_MOVE_POSITION = "UPDATE audit_relay_position SET xid = %s, seq = %s WHERE id = 1"


async def _without_outbox(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("DROP TRIGGER ticket_events_outbox ON ticket_events")
    await conn.execute(_POSITION_TABLE)
    await conn.execute("INSERT INTO audit_relay_position VALUES (1, 0, 0, NULL)")


def _ticket_row(ticket_id: str) -> dict[str, Any]:
    """A ``to_jsonb(tickets)`` payload of the size the service writes for a no-op task."""
    now = datetime.now(UTC).isoformat()
    return {
        "seq": 1,
        "ticket_id": ticket_id,
        "plan_id": "plan-1",
        "task_id": "task-0421",
        "intent_id": "",
        "task_type": "echo",
        "description": "no-op task",
        "parameters": {"message": "hello"},
        "required_capabilities": ["python"],
        "depends_on": [],
        "priority": "NORMAL",
        "status": "RUNNING",
        "attempt": 1,
        "max_retries": 2,
        "timeout_seconds": 300,
        "worker_id": "w1",
        "lease_expires_at": now,
        "error_message": "",
        "result": None,
        "version": 3,
        "last_update_digest": "0123456789abcdef0123456789abcdef",
        "created_at": now,
        "updated_at": now,
        "started_at": now,
        "completed_at": None,
    }


async def _insert_events(conn: psycopg.AsyncConnection[Any], count: int) -> None:
    for _ in range(count):
        ticket_id = str(uuid.uuid4())
        await conn.execute(
            _INSERT_EVENT, (str(uuid.uuid4()), ticket_id, Jsonb(_ticket_row(ticket_id)))
        )


async def _relay_before(conn: psycopg.AsyncConnection[Any], batch: int) -> int:
    cur = await conn.execute(_CLAIM_BEFORE, (batch,))
    seqs = [row[0] for row in await cur.fetchall()]
    await conn.execute(_MARK_BEFORE, (seqs,))
    return len(seqs)


async def measure(
    dsns: dict[str, str], pg_cpu: Callable[[], float], *, rounds: int, batch: int
) -> dict[str, Any]:
    totals = {name: {"events": 0, "cpu_s": 0.0, "wal_bytes": 0} for name in dsns}
    conns = {
        name: await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        for name, dsn in dsns.items()
    }
    pools = {name: open_pool(dsn, min_size=1, max_size=1) for name, dsn in dsns.items()}
    try:
        for pool in pools.values():
            await pool.open(wait=True)
        repository = TicketRepository(pool=pools["after"])
        log_reader = TicketRepository(pool=pools["cursor"])
        await _without_outbox(conns["cursor"])
        position = Cursor(xid=0, seq=0)

        async def relay_after(_: psycopg.AsyncConnection[Any], limit: int) -> int:
            entries = await repository.claim_outbox(limit=limit, claim_seconds=30)
            await repository.mark_relayed([e.seq for e in entries])
            return len(entries)

        async def relay_cursor(conn: psycopg.AsyncConnection[Any], limit: int) -> int:
            nonlocal position
            await conn.execute(_CLAIM_POSITION)
            events = await log_reader.events_after(position, TicketFilter(), limit=limit)
            position = cursor_of(events[-1])
            await conn.execute(_MOVE_POSITION, (position.xid, position.seq))
            return len(events)

        relay: dict[str, Callable[[psycopg.AsyncConnection[Any], int], Awaitable[int]]] = {
            "before": _relay_before,
            "after": relay_after,
            "cursor": relay_cursor,
        }
        for _ in range(rounds):
            for name, conn in conns.items():
                lsn = await _lsn(conn)
                cpu = pg_cpu()
                await _insert_events(conn, batch)
                relayed = await relay[name](conn, batch)
                totals[name]["cpu_s"] += pg_cpu() - cpu
                totals[name]["wal_bytes"] += await _wal_since(conn, lsn)
                totals[name]["events"] += batch
                assert relayed == batch, (name, relayed)
        dead = {}
        for name, conn in conns.items():
            await conn.execute("ANALYZE ticket_events")
            cur = await conn.execute(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'ticket_events'"
            )
            row = await cur.fetchone()
            dead[name] = row[0] if row else None
    finally:
        for pool in pools.values():
            await pool.close()
        for conn in conns.values():
            await conn.close()
    return {
        name: {
            "events": t["events"],
            "postgres_cpu_us_per_event": round(t["cpu_s"] / t["events"] * 1e6, 1),
            "wal_bytes_per_event": round(t["wal_bytes"] / t["events"]),
            "dead_event_rows_at_end": dead[name],
        }
        for name, t in totals.items()
    }


async def _lsn(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _wal_since(conn: psycopg.AsyncConnection[Any], lsn: str) -> int:
    cur = await conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)::bigint", (lsn,)
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    with databases(durable=True) as dbs, tempfile.TemporaryDirectory() as tmp:
        dsns = {
            "before": dbs.fresh_database("outbox_before"),
            "after": dbs.fresh_database("outbox_after"),
            "cursor": dbs.fresh_database("outbox_cursor"),
        }
        first = migrations_until(
            MIGRATIONS_DIRECTORY, "0001_tickets", into=Path(tmp) / "migrations"
        )
        apply_migrations(dsn=dsns["before"], directory=first)
        apply_migrations(dsn=dsns["after"], directory=MIGRATIONS_DIRECTORY)
        apply_migrations(dsn=dsns["cursor"], directory=MIGRATIONS_DIRECTORY)
        results = asyncio.run(
            measure(dsns, dbs.cpu_sources["postgresql"], rounds=args.rounds, batch=args.batch)
        )
    print(json.dumps({"rounds": args.rounds, "events_per_round": args.batch, **results}, indent=2))


if __name__ == "__main__":
    main()
