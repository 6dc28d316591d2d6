"""Schema migrations of the ticket database, applied to a database of the earlier schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from execution_ticket_service.domain.models import Ticket, TicketSpec
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from execution_ticket_service.storage.tickets import TicketRepository, open_pool
from hive_common.migrations import apply_migrations
from hive_testsupport.migrations import migrations_until, roll_back_migration

pytestmark = pytest.mark.service

NARROW_OUTBOX = "0002_narrow_outbox"
LOST_RUNS = "0003_lost_runs"
WORKER_ACTIVE = "0004_worker_active_tickets"
EVENT_ORDER = "0005_events_in_change_order"
REQUEUE_DIGEST = "0006_requeue_digest"
WRITE_ORDER = "0007_events_in_write_order"
PURGE_MARK = "0008_purge_mark"
PURGE_MARK_TRIGGER = "0009_purge_mark_trigger"
COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = 'public' AND table_name = 'tickets'"
)


async def _create(dsn: str, *task_ids: str) -> None:
    pool = open_pool(dsn, min_size=1, max_size=2)
    await pool.open(wait=True)
    try:
        specs = [TicketSpec(plan_id="p", task_id=t, task_type="echo") for t in task_ids]
        await TicketRepository(pool=pool).create_many(specs, actor="s")
    finally:
        await pool.close()


async def _the_relayed_ticket(dsn: str) -> Ticket:
    """The ticket of the one event in the outbox, as the audit relay reads it."""
    pool = open_pool(dsn, min_size=1, max_size=2)
    await pool.open(wait=True)
    try:
        [entry] = await TicketRepository(pool=pool).claim_outbox(limit=10, claim_seconds=30)
    finally:
        await pool.close()
    return entry.event.ticket


async def _rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query)
        return await cur.fetchall()


async def _event_columns(dsn: str) -> set[str]:
    rows = await _rows(
        dsn,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'ticket_events'",
    )
    return {str(r[0]) for r in rows}


async def test_narrow_outbox_keeps_pending_events_and_rolls_back(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # A database of the first schema, with one event relayed and two still pending.
    only_first = migrations_until(
        MIGRATIONS_DIRECTORY, "0001_tickets", into=tmp_path / "migrations"
    )
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=only_first)
    await _create(postgres_dsn, "t1", "t2", "t3")
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await conn.execute(
            "UPDATE ticket_events SET relayed_at = now() "
            "WHERE seq = (SELECT min(seq) FROM ticket_events)"
        )
    [(first, last)] = await _rows(postgres_dsn, "SELECT min(seq), max(seq) FROM ticket_events")
    assert isinstance(first, int)
    assert isinstance(last, int)

    until_outbox = migrations_until(MIGRATIONS_DIRECTORY, NARROW_OUTBOX, into=tmp_path / "m2")
    applied = await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_outbox)
    assert applied == [NARROW_OUTBOX]
    pending = [r[0] for r in await _rows(postgres_dsn, "SELECT seq FROM ticket_outbox ORDER BY 1")]
    assert pending == list(range(first + 1, last + 1))
    assert {"relayed_at", "relay_claimed_until"}.isdisjoint(await _event_columns(postgres_dsn))
    await _create(postgres_dsn, "t4")  # the trigger enters new events
    assert len(await _rows(postgres_dsn, "SELECT seq FROM ticket_outbox")) == 3

    await asyncio.to_thread(roll_back_migration, postgres_dsn, until_outbox, NARROW_OUTBOX)
    unrelayed = await _rows(
        postgres_dsn,
        "SELECT ticket->>'task_id' FROM ticket_events WHERE relayed_at IS NULL ORDER BY seq",
    )
    assert [r[0] for r in unrelayed] == ["t2", "t3", "t4"]
    applied = await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_outbox)
    assert applied == [NARROW_OUTBOX]
    assert len(await _rows(postgres_dsn, "SELECT seq FROM ticket_outbox")) == 3


async def test_lost_runs_start_at_zero_for_existing_tickets_and_events(
    postgres_dsn: str, tmp_path: Path
) -> None:
    until_outbox = migrations_until(MIGRATIONS_DIRECTORY, NARROW_OUTBOX, into=tmp_path / "m2")
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_outbox)
    await _create(postgres_dsn, "t1")  # its CREATED event's payload has no lost_runs

    until_lost_runs = migrations_until(MIGRATIONS_DIRECTORY, LOST_RUNS, into=tmp_path / "m3")
    applied = await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_lost_runs)
    assert applied == [LOST_RUNS]
    assert await _rows(postgres_dsn, "SELECT lost_runs FROM tickets") == [(0,)]
    assert (await _the_relayed_ticket(postgres_dsn)).lost_runs == 0

    await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, LOST_RUNS)
    assert "lost_runs" not in {str(r[0]) for r in await _rows(postgres_dsn, COLUMNS)}


async def test_the_active_tickets_of_a_worker_are_indexed(postgres_dsn: str) -> None:
    # Assignments with a worker capacity count them; finished tickets stay out of it.
    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )
    assert WORKER_ACTIVE in applied
    indexes = "SELECT indexname FROM pg_indexes WHERE tablename = 'tickets'"
    assert ("tickets_worker_active_idx",) in await _rows(postgres_dsn, indexes)
    await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, WORKER_ACTIVE)
    assert ("tickets_worker_active_idx",) not in await _rows(postgres_dsn, indexes)


async def test_the_requeue_digest_starts_empty_for_existing_tickets_and_events(
    postgres_dsn: str, tmp_path: Path
) -> None:
    until_order = migrations_until(MIGRATIONS_DIRECTORY, EVENT_ORDER, into=tmp_path / "m5")
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_order)
    await _create(postgres_dsn, "t1")  # its CREATED event's payload has no requeue_digest
    until_write_order = migrations_until(MIGRATIONS_DIRECTORY, WRITE_ORDER, into=tmp_path / "m7")
    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=until_write_order
    )
    assert applied == [REQUEUE_DIGEST, WRITE_ORDER]
    assert await _rows(postgres_dsn, "SELECT requeue_digest FROM tickets") == [("",)]
    assert (await _the_relayed_ticket(postgres_dsn)).requeue_digest == ""

    await asyncio.to_thread(roll_back_migration, postgres_dsn, until_write_order, REQUEUE_DIGEST)
    assert "requeue_digest" not in {str(r[0]) for r in await _rows(postgres_dsn, COLUMNS)}


async def _event_after_a_younger_one(dsn: str) -> None:
    """Write an event of ticket "t" in a transaction older than the one that wrote its
    last event (committed in between)."""
    insert = (
        "INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, status, actor,"
        " occurred_at, ticket) SELECT gen_random_uuid(), %s, ticket_id, plan_id, status,"
        " 's', now(), '{}' FROM tickets WHERE task_id = 't'"
    )
    async with (
        await psycopg.AsyncConnection.connect(dsn) as older,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as younger,
    ):
        await older.execute("SELECT pg_current_xact_id()")  # its xid, taken first
        await younger.execute(insert, ("ASSIGNED",))
        await older.execute(insert, ("STATUS_CHANGED",))
        await older.commit()


async def test_an_event_written_behind_a_younger_transactions_is_accepted_again(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # 0005 failed such a write (serialization_failure, for the service to retry), which
    # aborted whole group commits under contention; 0007 withdraws it, 0005's id kept so a
    # database that applied it migrates on.
    until_write_order = migrations_until(MIGRATIONS_DIRECTORY, WRITE_ORDER, into=tmp_path / "m7")
    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=until_write_order
    )
    assert applied[-3:] == [EVENT_ORDER, REQUEUE_DIGEST, WRITE_ORDER]
    await _create(postgres_dsn, "t")
    await _event_after_a_younger_one(postgres_dsn)
    await asyncio.to_thread(roll_back_migration, postgres_dsn, until_write_order, WRITE_ORDER)
    with pytest.raises(psycopg.errors.SerializationFailure, match="younger"):
        await _event_after_a_younger_one(postgres_dsn)
    [(events, outbox)] = await _rows(
        postgres_dsn,
        "SELECT (SELECT count(*) FROM ticket_events), (SELECT count(*) FROM ticket_outbox)",
    )
    # CREATED, two ASSIGNED (the younger commits both times), one STATUS_CHANGED: every
    # event in the outbox.
    assert (events, outbox) == (4, 4)


async def test_the_purge_mark_starts_at_the_origin_and_rolls_back(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # Purges made before the mark existed are not known: it starts at (0, 0); from 0009
    # on every delete from the log moves it, whatever code deletes (a replica of the
    # release before, purging without moving it, let new readers stream across the gap).
    until_write_order = migrations_until(MIGRATIONS_DIRECTORY, WRITE_ORDER, into=tmp_path / "m7")
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=until_write_order)
    await _create(postgres_dsn, "t1")
    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )
    assert applied == [PURGE_MARK, PURGE_MARK_TRIGGER]
    assert await _rows(postgres_dsn, "SELECT xid, seq FROM ticket_events_purged") == [(0, 0)]
    await _create(postgres_dsn, "t2")  # the service writes on as before
    # The purge of the release before 0008: a bare DELETE.
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "DELETE FROM ticket_events WHERE seq IN (SELECT min(seq) FROM ticket_events)"
            " RETURNING xid, seq"
        )
        [deleted] = await cur.fetchall()
    assert await _rows(postgres_dsn, "SELECT xid, seq FROM ticket_events_purged") == [deleted]

    await asyncio.to_thread(
        roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, PURGE_MARK_TRIGGER
    )
    await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, PURGE_MARK)
    [(exists,)] = await _rows(postgres_dsn, "SELECT to_regclass('ticket_events_purged')")
    assert exists is None
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM ticket_events")  # no trigger left behind
