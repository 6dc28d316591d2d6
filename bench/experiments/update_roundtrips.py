"""How much of an UpdateTicketStatus is PostgreSQL round trips? (finding for the ticket service)

Replays the repository's write path of one status update (lock the row, update it,
insert the outbox/event row, commit) against the real tickets schema, from ``concurrency``
clients, two ways:

* ``as today``: ``conn.transaction()`` on an autocommit pool connection: BEGIN, SELECT ...
  FOR UPDATE, UPDATE, INSERT, COMMIT = 5 round trips (the service's write path in session
  1; it now reads, then writes-if-the-version-is-unchanged in one statement, and skips
  the read for a ticket it changed recently);
* ``pipelined``: the same statements in psycopg pipeline mode: BEGIN + SELECT in one round
  trip, UPDATE + INSERT + COMMIT in a second.

Reports updates/s, p50/p99 and this process's CPU per update (the service pays the same
per-statement client cost). Run:
``uv run --all-packages python -m bench.experiments.update_roundtrips``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bench.cpu import process_seconds
from bench.environment import databases
from bench.stats import closed_loop
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from hive_common.migrations import apply_migrations

# The statements of execution_ticket_service.storage.tickets (_lock, _UPDATE_TICKET,
# _INSERT_EVENT), restated so this experiment does not import private names.
LOCK = "SELECT * FROM tickets WHERE ticket_id = %s FOR UPDATE"
UPDATE = """
UPDATE tickets SET
    status = %(status)s, attempt = %(attempt)s, worker_id = %(worker_id)s,
    lease_expires_at = %(lease_expires_at)s, error_message = %(error_message)s,
    result = %(result)s, version = %(version)s, last_update_digest = %(last_update_digest)s,
    updated_at = %(updated_at)s, started_at = %(started_at)s, completed_at = %(completed_at)s
WHERE ticket_id = %(ticket_id)s
"""
INSERT_EVENT = """
INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, worker_id, previous_status,
                           status, actor, occurred_at, ticket, details)
SELECT %(event_id)s, %(event_type)s, t.ticket_id, t.plan_id, %(worker_id)s, %(previous_status)s,
       t.status, %(actor)s, %(occurred_at)s, to_jsonb(t), %(details)s
FROM tickets t WHERE t.ticket_id = %(ticket_id)s
"""
SEED = """
INSERT INTO tickets (ticket_id, plan_id, task_id, task_type, parameters, priority, status, attempt,
                     max_retries, timeout_seconds, worker_id, version, created_at, updated_at)
SELECT gen_random_uuid(), %s, 'task-' || i, 'echo', '{"message": "hello"}', 'NORMAL', 'ASSIGNED',
       1, 0, 3600, 'bench-worker', 2, now(), now()
FROM generate_series(1, %s) AS i
RETURNING ticket_id
"""


def _params(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    now = datetime.now(UTC)
    update = {
        "ticket_id": row["ticket_id"],
        "status": "RUNNING",
        "attempt": row["attempt"],
        "worker_id": row["worker_id"],
        "lease_expires_at": None,
        "error_message": "",
        "result": Jsonb({"message": "hello"}),
        "version": row["version"] + 1,
        "last_update_digest": "x",
        "updated_at": now,
        "started_at": now,
        "completed_at": None,
    }
    event = {
        "event_id": uuid.uuid4(),
        "event_type": "STATUS_CHANGED",
        "worker_id": row["worker_id"],
        "previous_status": row["status"],
        "actor": "worker:bench",
        "occurred_at": now,
        "details": Jsonb({}),
        "ticket_id": row["ticket_id"],
    }
    return update, event


async def as_today(conn: psycopg.AsyncConnection[Any], ticket_id: Any) -> None:
    async with conn.transaction():
        cur = await conn.execute(LOCK, (ticket_id,))
        row = await cur.fetchone()
        assert row is not None
        update, event = _params(row)
        await conn.execute(UPDATE, update)
        await conn.execute(INSERT_EVENT, event)


async def pipelined(conn: psycopg.AsyncConnection[Any], ticket_id: Any) -> None:
    async with conn.pipeline(), conn.transaction():
        cur = await conn.execute(LOCK, (ticket_id,))
        row = await cur.fetchone()  # first sync: BEGIN + SELECT
        assert row is not None
        update, event = _params(row)
        await conn.execute(UPDATE, update)
        await conn.execute(INSERT_EVENT, event)
    # leaving the blocks queues COMMIT and syncs: UPDATE + INSERT + COMMIT


async def run(dsn: str, updates: int, concurrency: int) -> list[dict[str, Any]]:
    apply_migrations(dsn=dsn, directory=MIGRATIONS_DIRECTORY)
    results = []
    variants = (("as today (5 round trips)", as_today), ("pipelined (2 round trips)", pipelined))
    for name, variant in variants * 2:  # twice, interleaved, to even out background load
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as seed:
            cur = await seed.execute(SEED, (f"rt-{uuid.uuid4().hex[:8]}", updates))
            ids = [r[0] for r in await cur.fetchall()]
        conns = [
            await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row)
            for _ in range(concurrency)
        ]
        free = list(conns)

        async def call(
            i: int, variant: Any = variant, free: list[Any] = free, ids: list[Any] = ids
        ) -> None:
            conn = free.pop()
            try:
                await variant(conn, ids[i])
            finally:
                free.append(conn)

        cpu_before = process_seconds(os.getpid())
        result = await closed_loop(call, concurrency=concurrency, total=updates)
        cpu = process_seconds(os.getpid()) - cpu_before
        for conn in conns:
            await conn.close()
        if result.errors:
            raise RuntimeError(result.first_error)
        results.append(
            {
                "variant": name,
                "updates_per_s": result.rate,
                "p50_ms": result.p(0.5),
                "p99_ms": result.p(0.99),
                "client_cpu_ms_per_update": cpu / updates * 1000,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with databases(durable=True) as dbs:
        dsn = dbs.fresh_database("bench_roundtrips")
        results = asyncio.run(run(dsn, args.updates, args.concurrency))
    print(json.dumps(results, indent=2))
    for r in results:
        print(
            f"{r['variant']:28} {r['updates_per_s']:8,.0f} updates/s  p50 {r['p50_ms']:6.2f} ms"
            f"  p99 {r['p99_ms']:6.2f} ms  client CPU {r['client_cpu_ms_per_update']:.3f} ms/update"
        )


if __name__ == "__main__":
    main()
