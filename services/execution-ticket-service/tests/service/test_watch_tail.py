"""EventLogTail: one log reader per process serving every watch stream, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from execution_ticket_service.domain.models import (
    Assignment,
    EventType,
    StatusUpdate,
    TicketEvent,
    TicketFilter,
    TicketSpec,
    TicketStatus,
)
from execution_ticket_service.domain.paging import Cursor
from execution_ticket_service.signals import ChangeSignal
from execution_ticket_service.storage.tickets import TicketRepository
from execution_ticket_service.watch import EventLogTail, TailSettings, cursor_of
from hive_common.errors import InvalidArgument

pytestmark = pytest.mark.service

ORIGIN = Cursor(xid=0, seq=0)
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


class CountingRepository(TicketRepository):
    """The real repository, counting the log reads made through it."""

    def __init__(self, inner: TicketRepository) -> None:
        self.__dict__.update(inner.__dict__)
        self.reads: list[TicketFilter] = []

    async def events_after(self, *args: Any, **kwargs: Any) -> list[TicketEvent]:
        self.reads.append(args[1])
        return await super().events_after(*args, **kwargs)


@pytest.fixture
def counting(repo: TicketRepository) -> CountingRepository:
    return CountingRepository(repo)


def _tail(counting: CountingRepository, settings: TailSettings) -> EventLogTail:
    """A tail over ``counting``, woken by its changes as in the service."""
    signal = ChangeSignal()
    counting._on_change = lambda counts: signal.notify()
    return EventLogTail(repository=counting, signal=signal, settings=settings)


@contextlib.asynccontextmanager
async def _running(tail: EventLogTail) -> AsyncIterator[EventLogTail]:
    """The tail running, with one stream open (it only reads while streams are open)."""
    task = asyncio.create_task(tail.run())
    try:
        with tail.subscribed():
            yield tail
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def tail(counting: CountingRepository) -> AsyncIterator[EventLogTail]:
    settings = TailSettings(poll_interval=0.05, batch_size=50, window=1_000)
    async with _running(_tail(counting, settings)) as running:
        yield running


async def _until(tail: EventLogTail, probe: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):  # a hang guard, not a timing assertion
        while not probe():
            await tail.wait(tail.generation, 0.05)


def _holds(tail: EventLogTail, event: TicketEvent) -> Callable[[], bool]:
    return lambda: bool(tail._keys) and tail._keys[-1] == cursor_of(event)


async def _history(repo: TicketRepository, plan: str, tasks: int, worker: str) -> None:
    """Create ``tasks`` tickets and take each through ASSIGNED and RUNNING."""
    created = await repo.create_many(
        [TicketSpec(plan_id=plan, task_id=f"t{i}", task_type="echo") for i in range(tasks)],
        actor="service:test",
    )
    for ticket, _ in created:
        await repo.assign(
            Assignment(ticket_id=ticket.ticket_id, worker_id=worker, lease_seconds=60, attempt=1),
            actor="service:test",
        )
        await repo.update_status(
            StatusUpdate(ticket_id=ticket.ticket_id, status=TicketStatus.RUNNING, attempt=1),
            actor=f"worker:{worker}",
        )


async def _read_all(
    tail: EventLogTail, position: Cursor, ticket_filter: TicketFilter, *, limit: int
) -> tuple[list[TicketEvent], Cursor]:
    found: list[TicketEvent] = []
    while True:
        events, position = await tail.read(position, ticket_filter, limit=limit)
        found.extend(events)
        if len(events) < limit:
            return found, position


async def test_streams_inside_the_window_are_served_without_a_database_read(
    tail: EventLogTail, counting: CountingRepository
) -> None:
    await _until(tail, lambda: tail._start is not None)
    start = tail._start
    assert start is not None
    await _history(counting, "plan-a", 3, "w1")
    await _history(counting, "plan-b", 2, "w2")
    expected = await counting.events_after(start, TicketFilter(), limit=1_000)
    assert len(expected) == 5 * 3
    await _until(tail, _holds(tail, expected[-1]))

    reads_before = len(counting.reads)
    filters = [
        TicketFilter(),
        TicketFilter(plan_id="plan-a"),
        TicketFilter(worker_id="w2"),
        TicketFilter(plan_id="plan-b", worker_id="w1"),
    ]
    served = {f: (await _read_all(tail, start, f, limit=4))[0] for f in filters}
    assert len(counting.reads) == reads_before  # every stream was served from memory
    for ticket_filter, events in served.items():
        from_db = await counting.events_after(start, ticket_filter, limit=1_000)
        assert [e.event_id for e in events] == [e.event_id for e in from_db], ticket_filter
    assert served[TicketFilter(plan_id="plan-b", worker_id="w1")] == []


async def test_a_stream_skips_past_events_it_does_not_want(tail: EventLogTail) -> None:
    await _until(tail, lambda: tail._start is not None)
    start = tail._start
    assert start is not None
    await _history(tail._repository, "plan-a", 2, "w1")
    await _until(tail, lambda: len(tail._keys) == 6)
    events, position = await tail.read(start, TicketFilter(worker_id="nobody"), limit=10)
    assert events == []
    assert position == tail._keys[-1]  # not scanned again on the next change


async def test_a_stream_behind_the_window_reads_the_database_then_joins_it(
    counting: CountingRepository,
) -> None:
    # A stream resumed from before the window (or slower than the window is long) gets
    # every event exactly once, in log order, whatever the window holds meanwhile.
    await _history(counting, "old", 4, "w1")  # before the tail started
    settings = TailSettings(poll_interval=0.05, batch_size=50, window=3)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        await _history(counting, "new", 4, "w1")
        everything = await counting.events_after(ORIGIN, TicketFilter(), limit=1_000)
        await _until(tail, _holds(tail, everything[-1]))
        assert len(tail._events) == 3  # the window keeps only the newest events

        for limit in (1, 2, 5, 100):
            events, position = await _read_all(
                tail, ORIGIN, TicketFilter(worker_id="w1"), limit=limit
            )
            expected = [e for e in everything if e.worker_id == "w1"]
            assert [e.event_id for e in events] == [e.event_id for e in expected], limit
            assert position == tail._keys[-1]

        # Once joined, later changes come from memory.
        reads_before = len(counting.reads)
        events, _ = await tail.read(position, TicketFilter(worker_id="w1"), limit=10)
        assert events == []
        assert len(counting.reads) == reads_before


async def test_the_window_keeps_its_bytes_within_the_budget(
    counting: CountingRepository,
) -> None:
    # 5,000 events were kept whatever their tickets weighed: 30 KB parameters pinned
    # 200 MB, results of a megabyte would have pinned gigabytes.
    settings = TailSettings(poll_interval=0.05, batch_size=50, window=1_000, window_bytes=25_000)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        await counting.create_many(
            [
                TicketSpec(
                    plan_id="big",
                    task_id=f"t{i}",
                    task_type="echo",
                    parameters={"blob": "x" * 10_000},
                )
                for i in range(6)
            ],
            actor="service:test",
        )
        everything = await counting.events_after(ORIGIN, TicketFilter(), limit=1_000)
        await _until(tail, _holds(tail, everything[-1]))
        assert len(tail._events) == 2  # 10 KB each: two fit in 25 KB, not six
        assert tail._bytes == sum(tail._sizes) < 25_000
        # A stream from before the window still gets every event, from the database.
        events, _ = await _read_all(tail, ORIGIN, TicketFilter(plan_id="big"), limit=4)
        assert [e.event_id for e in events] == [e.event_id for e in everything]


async def test_the_window_counts_the_results_its_events_details_hold(
    counting: CountingRepository,
) -> None:
    # A re-queue keeps the failed attempt's result in its event (as a late result keeps
    # the refused one), beside a ticket that holds none: counted as the tickets' are.
    settings = TailSettings(poll_interval=0.05, batch_size=50, window=1_000, window_bytes=25_000)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        created = await counting.create_many(
            [
                TicketSpec(plan_id="retried", task_id=f"t{i}", task_type="echo", max_retries=1)
                for i in range(6)
            ],
            actor="service:test",
        )
        for ticket, _ in created:
            await counting.assign(
                Assignment(ticket_id=ticket.ticket_id, worker_id="w1", lease_seconds=60, attempt=1),
                actor="service:test",
            )
            await counting.update_status(
                StatusUpdate(
                    ticket_id=ticket.ticket_id,
                    status=TicketStatus.FAILED,
                    attempt=1,
                    result={"log": "x" * 10_000},
                ),
                actor="worker:w1",
            )
        everything = await counting.events_after(ORIGIN, TicketFilter(), limit=1_000)
        await _until(tail, _holds(tail, everything[-1]))
        requeues = [e for e in tail._events if e.type is EventType.REQUEUED]
        assert len(requeues) == 2  # 10 KB each: two fit in 25 KB, not six
        assert tail._bytes == sum(tail._sizes) < 25_000


async def test_the_tail_reads_only_while_streams_are_open(counting: CountingRepository) -> None:
    tail = _tail(counting, TailSettings(poll_interval=0.05, batch_size=50, window=1_000))
    task = asyncio.create_task(tail.run())
    try:
        await _history(counting, "quiet", 2, "w1")
        await asyncio.sleep(0.2)  # several poll intervals: the tail must stay idle
        assert counting.reads == []
        assert tail._start is None

        with tail.subscribed():
            await _until(tail, lambda: tail._start is not None)
            await _history(counting, "watched", 1, "w1")
            await _until(tail, lambda: len(tail._keys) == 3)
        # The last stream left: the window is dropped and reading stops.
        await _until(tail, lambda: tail._start is None)
        assert tail._keys == []
        reads = len(counting.reads)
        await _history(counting, "quiet-again", 1, "w1")
        await asyncio.sleep(0.2)
        assert len(counting.reads) == reads
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_changes_within_the_read_gap_are_read_together(
    counting: CountingRepository,
) -> None:
    # A long gap, so that the burst below surely falls within it on any machine.
    settings = TailSettings(poll_interval=10.0, batch_size=50, window=1_000, read_gap=2.0)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        reads_before = len(counting.reads)
        for i in range(10):  # ten changes, each waking the tail
            await counting.create_many(
                [TicketSpec(plan_id="burst", task_id=f"t{i}", task_type="echo")],
                actor="service:test",
            )
        await _until(tail, lambda: len(tail._keys) == 10)
        # Not one read per change: at most the one the first change woke at once (its
        # read may also have found a few more) and the one after the gap.
        assert len(counting.reads) - reads_before <= 2
        assert [e.ticket.task_id for e in tail._events] == [f"t{i}" for i in range(10)]


async def test_events_a_running_transaction_hid_are_read_once_it_ends(
    counting: CountingRepository, migrated_dsn: str
) -> None:
    # No slow polling within the test's bounds: only the busy polling can find the event.
    settings = TailSettings(
        poll_interval=3600.0, busy_poll_interval=0.02, busy_seconds=3600.0, window=1_000
    )
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        # A transaction elsewhere in the cluster, with an id: the tail reads only below it.
        async with await psycopg.AsyncConnection.connect(migrated_dsn) as other:
            await other.execute("SELECT pg_current_xact_id()")
            reads_before = len(counting.reads)
            await counting.create_many(
                [TicketSpec(plan_id="hidden", task_id="t", task_type="echo")],
                actor="service:test",
            )  # committed and signalled, but hidden from the tail's reads
            await _until(tail, lambda: len(counting.reads) >= reads_before + 2)
            assert not tail._keys
            await other.rollback()  # ends without a signal
        await _until(tail, lambda: len(tail._keys) == 1)
        assert tail._events[0].ticket.plan_id == "hidden"


async def test_a_stream_behind_an_event_the_purge_deleted_is_refused(
    counting: CountingRepository, advance_clock: Callable[[float], None]
) -> None:
    # Resumed from a cursor older than the retention, a stream would silently miss the
    # deleted events: it is refused instead; a position after them reads on as before.
    await _history(counting, "old", 2, "w1")
    relayed = await counting.claim_outbox(limit=100, claim_seconds=30)
    await counting.mark_relayed([e.seq for e in relayed])
    old = await counting.events_after(ORIGIN, TicketFilter(), limit=100)
    advance_clock(3600)
    settings = TailSettings(poll_interval=0.05, batch_size=50, window=1)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        await _history(counting, "new", 1, "w1")
        new = await counting.events_after(cursor_of(old[-1]), TicketFilter(), limit=100)
        await _until(tail, _holds(tail, new[-1]))
        events, _ = await _read_all(tail, cursor_of(old[0]), TicketFilter(), limit=10)
        assert [e.event_id for e in events] == [e.event_id for e in old[1:] + new]
        await counting.purge_events(older_than=old[-1].occurred_at + timedelta(seconds=1))

        for position in (ORIGIN, cursor_of(old[0]), cursor_of(old[-2])):
            with pytest.raises(InvalidArgument) as caught:
                await tail.read(position, TicketFilter(worker_id="w1"), limit=10)
            [violation] = caught.value.violations
            assert violation.field == "cursor"
            assert "older than the event retention" in violation.description
        events, _ = await _read_all(tail, cursor_of(old[-1]), TicketFilter(), limit=10)
        assert [e.event_id for e in events] == [e.event_id for e in new]


async def test_the_purge_leaves_events_a_running_transaction_hides_from_the_tail(
    counting: CountingRepository, migrated_dsn: str
) -> None:
    # A transaction open longer than the retention holds the tail back: the events written
    # meanwhile, relayed and old enough, used to be purged before the tail could read them
    # (a live stream then never got them). The purge now waits for that transaction.
    settings = TailSettings(poll_interval=0.05, busy_poll_interval=0.02, window=1_000)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        async with await psycopg.AsyncConnection.connect(migrated_dsn) as other:
            await other.execute("SELECT pg_current_xact_id()")
            await _history(counting, "held", 2, "w1")
            relayed = await counting.claim_outbox(limit=100, claim_seconds=30)
            await counting.mark_relayed([e.seq for e in relayed])
            # Old enough whatever the retention.
            assert await counting.purge_events(older_than=FAR_FUTURE) == 0
            await other.rollback()
        await _until(tail, lambda: len(tail._keys) == 6)
        start = tail._start
        assert start is not None
        events, _ = await _read_all(tail, start, TicketFilter(plan_id="held"), limit=10)
        assert len(events) == 6  # what a live stream of the plan gets
        # Once the tail could read them, they go.
        assert await counting.purge_events(older_than=FAR_FUTURE) == 6


async def test_the_tail_refuses_streams_behind_events_purged_before_it_read_them(
    counting: CountingRepository, migrated_dsn: str
) -> None:
    # Events a transaction hid are purged the moment it ends, before the tail reads them
    # (as a replica of the previous release purged, not waiting for that transaction):
    # the read that would have passed over them with the newer events finds the purge
    # mark ahead instead, in the same statement. The tail goes on from the mark, and a
    # stream before it is refused; no stream is served the newer events across the gap.
    settings = TailSettings(poll_interval=0.05, busy_poll_interval=0.02, window=1_000)
    async with _running(_tail(counting, settings)) as tail:
        await _until(tail, lambda: tail._start is not None)
        start = tail._start
        assert start is not None
        async with await psycopg.AsyncConnection.connect(migrated_dsn) as other:
            await other.execute("SELECT pg_current_xact_id()")
            await _history(counting, "gone", 1, "w1")
            async with await psycopg.AsyncConnection.connect(
                migrated_dsn, autocommit=True
            ) as purger:
                cur = await purger.execute(
                    "WITH gone AS (DELETE FROM ticket_events WHERE plan_id = 'gone'"
                    " RETURNING xid, seq) UPDATE ticket_events_purged SET (xid, seq) ="
                    " (SELECT xid, seq FROM gone ORDER BY xid DESC, seq DESC LIMIT 1)"
                    " RETURNING xid, seq"
                )
                [(xid, seq)] = await cur.fetchall()
            await _history(counting, "newer", 1, "w1")  # hidden too, until the end
            await other.rollback()
        mark = Cursor(xid=xid, seq=seq)
        await _until(tail, lambda: len(tail._keys) == 3)
        assert tail._start is not None
        assert tail._start >= mark
        assert [e.ticket.plan_id for e in tail._events] == ["newer"] * 3
        with pytest.raises(InvalidArgument) as refused:
            await tail.read(start, TicketFilter(), limit=10)
        assert "older than the event retention" in refused.value.violations[0].description
        events, _ = await _read_all(tail, mark, TicketFilter(), limit=10)
        assert [e.ticket.plan_id for e in events] == ["newer"] * 3


async def test_a_reader_starting_now_starts_past_a_purge_that_ran_ahead(
    counting: CountingRepository, migrated_dsn: str
) -> None:
    # The purge of the release before 0008 does not wait for running transactions: with
    # one open longer than the retention, the mark passes the oldest running transaction,
    # and a watch without a cursor (starting there) was refused as "older than the event
    # retention", over and over.
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as other:
        await other.execute("SELECT pg_current_xact_id()")
        await _history(counting, "purged", 1, "w1")
        async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as old:
            await old.execute("DELETE FROM ticket_events WHERE plan_id = 'purged'")
        start = await counting.current_position()
        assert await counting.events_after(start, TicketFilter(), limit=10) == []
        await counting.check_resumable(start)  # a header cursor resumes
        position, _ = await counting.snapshot(TicketFilter(), limit=10)
        assert position == start
        await other.rollback()
    await _history(counting, "after", 1, "w1")
    events = await counting.events_after(start, TicketFilter(), limit=10)
    assert [e.ticket.plan_id for e in events] == ["after"] * 3
