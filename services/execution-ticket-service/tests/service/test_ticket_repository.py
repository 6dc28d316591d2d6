"""TicketRepository against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import psycopg
import pytest

from execution_ticket_service.background import LeaseSweeper
from execution_ticket_service.domain.models import (
    Assignment,
    EventType,
    Priority,
    StatusUpdate,
    Ticket,
    TicketFilter,
    TicketSpec,
    TicketStatus,
)
from execution_ticket_service.domain.paging import Cursor, CursorPurged
from execution_ticket_service.storage.tickets import Pool, TicketRepository, open_pool
from execution_ticket_service.watch import cursor_of
from hive_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from hive_testsupport.outage import UnreachablePool

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import LoopTurns

pytestmark = pytest.mark.service

ORIGIN = Cursor(xid=0, seq=0)

S = TicketStatus


def spec(task_id: str = "t1", plan_id: str = "plan-1", **kwargs: object) -> TicketSpec:
    return TicketSpec(plan_id=plan_id, task_id=task_id, task_type="echo", **kwargs)  # type: ignore[arg-type]


async def test_create_get_and_idempotent_retry(repo: TicketRepository) -> None:
    [(created, was_new)] = await repo.create_many([spec(parameters={"a": 1})], actor="service:o")
    assert was_new
    assert (await repo.get(created.ticket_id)) == created
    [(again, was_new)] = await repo.create_many([spec(parameters={"a": 1})], actor="service:o")
    assert not was_new
    assert again == created


async def test_same_key_different_content_names_the_fields(repo: TicketRepository) -> None:
    await repo.create_many([spec(), spec("t2")], actor="s")
    with pytest.raises(AlreadyExists) as info:
        await repo.create_many(
            [spec("new"), spec("t2", priority=Priority.HIGH, description="x")], actor="s"
        )
    fields = {v.field for v in info.value.violations}
    assert fields == {"tickets[1].priority", "tickets[1].description"}
    # all-or-nothing: the new ticket of the refused batch was not written
    page, _ = await repo.list_page(TicketFilter(plan_id="plan-1"), after_seq=0, limit=10)
    assert [t.task_id for _, t in page] == ["t1", "t2"]
    backlog, _ = await repo.outbox_backlog()
    assert backlog == 2


async def test_concurrent_identical_creates_make_one_ticket(repo: TicketRepository) -> None:
    results = await asyncio.gather(
        *(repo.create_many([spec("same"), spec(f"own-{i}")], actor="s") for i in range(8))
    )
    same = {r[0][0].ticket_id for r in results}
    assert len(same) == 1
    assert sum(r[0][1] for r in results) == 1
    backlog, _ = await repo.outbox_backlog()
    assert backlog == 1 + 8


async def test_list_pages_in_insertion_order_with_filters(repo: TicketRepository) -> None:
    await repo.create_many([spec(f"t{i:02}") for i in range(7)], actor="s")
    await repo.create_many([spec("other", plan_id="plan-2")], actor="s")
    seen: list[str] = []
    after = 0
    while True:
        page, more = await repo.list_page(TicketFilter(plan_id="plan-1"), after_seq=after, limit=3)
        seen += [t.task_id for _, t in page]
        if not more:
            break
        after = page[-1][0]
    assert seen == [f"t{i:02}" for i in range(7)]
    pending, _ = await repo.list_page(
        TicketFilter(statuses=frozenset({S.PENDING})), after_seq=0, limit=100
    )
    assert len(pending) == 8
    none, more = await repo.list_page(TicketFilter(worker_id="w"), after_seq=0, limit=100)
    assert none == []
    assert not more


async def test_update_flow_and_events(repo: TicketRepository) -> None:
    [(t, _)] = await repo.create_many([spec(max_retries=1)], actor="s")
    position = await repo.current_position()
    t = await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w1", lease_seconds=30, attempt=1),
        actor="service:o",
    )
    assert t.status is S.ASSIGNED
    t = await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=1), actor="worker:w1"
    )
    t = await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.FAILED, attempt=1, error_message="x"),
        actor="worker:w1",
    )
    assert t.status is S.PENDING
    assert t.attempt == 2
    with pytest.raises(FailedPrecondition):
        await repo.update_status(
            StatusUpdate(ticket_id=t.ticket_id, status=S.COMPLETED, attempt=1),
            actor="worker:w1",
        )
    assert (await repo.get(t.ticket_id)) == t
    events = await repo.events_after(position, TicketFilter(worker_id="w1"), limit=100)
    assert [e.type for e in events] == [
        EventType.ASSIGNED,
        EventType.STATUS_CHANGED,
        EventType.REQUEUED,
        EventType.LATE_RESULT_REJECTED,  # concerns the worker that reported it
    ]
    assert events[2].ticket == t
    # Each event carries the ticket as that change left it (written in the same statement).
    assert [e.ticket.status for e in events[:3]] == [S.ASSIGNED, S.RUNNING, S.PENDING]
    assert [e.ticket.version for e in events[:3]] == [2, 3, 4]
    assert events[2].worker_id == "w1"  # the worker that lost the ticket is told
    rest = await repo.events_after(
        position.__class__(0, 0), TicketFilter(plan_id="plan-1"), limit=100
    )
    assert [e.type for e in rest] == [
        EventType.CREATED,
        EventType.ASSIGNED,
        EventType.STATUS_CHANGED,
        EventType.REQUEUED,
        EventType.LATE_RESULT_REJECTED,
    ]
    assert rest[-1].details["reported_status"] == "COMPLETED"
    assert rest[-1].actor == "worker:w1"


async def test_a_requeueing_failure_retried_after_the_next_attempt_started_is_a_repeat(
    repo: TicketRepository,
) -> None:
    [(t, _)] = await repo.create_many([spec(max_retries=2)], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="wa", lease_seconds=30, attempt=1), actor="s"
    )
    failed = StatusUpdate(ticket_id=t.ticket_id, status=S.FAILED, attempt=1, error_message="x")
    await repo.update_status(failed, actor="worker:wa")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="wb", lease_seconds=30, attempt=2), actor="s"
    )
    running = await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=2), actor="worker:wb"
    )
    position = await repo.current_position()
    # It was FAILED_PRECONDITION "attempt 1 is stale" and a LATE_RESULT_REJECTED event.
    assert await repo.update_status(failed, actor="worker:wa") == running
    assert await repo.events_after(position, TicketFilter(), limit=10) == []


async def test_a_late_result_repeated_is_recorded_and_counted_once(pool: Pool) -> None:
    # Its event is written once (the same report has the same event id), but every repeat
    # was counted as a new LATE_RESULT_REJECTED (the metric read 656 against 21 events)
    # and woke the watchers.
    counted: collections.Counter[tuple[EventType, S | None, S]] = collections.Counter()
    repo = TicketRepository(pool=pool, on_change=counted.update)
    [(t, _)] = await repo.create_many([spec(max_retries=1)], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w1", lease_seconds=30, attempt=1), actor="s"
    )
    await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.FAILED, attempt=1, error_message="x"),
        actor="worker:w1",
    )
    position = await repo.current_position()
    late = StatusUpdate(ticket_id=t.ticket_id, status=S.COMPLETED, attempt=1)
    for _ in range(3):
        with pytest.raises(FailedPrecondition, match="stale"):
            await repo.update_status(late, actor="worker:w1")
    events = await repo.events_after(position, TicketFilter(plan_id="plan-1"), limit=100)
    assert [e.type for e in events] == [EventType.LATE_RESULT_REJECTED]
    late_counts = {k: n for k, n in counted.items() if k[0] is EventType.LATE_RESULT_REJECTED}
    assert list(late_counts.values()) == [1]


async def _running_ticket(repo: TicketRepository, task_id: str = "t1") -> str:
    [(t, _)] = await repo.create_many([spec(task_id)], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w1", lease_seconds=30, attempt=1), actor="s"
    )
    await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=1), actor="worker:w1"
    )
    return t.ticket_id


def _clock_with_concurrent_writer(
    dsn: str, statement: str, ticket_id: str, *, times: int
) -> Callable[[], datetime]:
    """A clock that, the first ``times`` times the repository asks for the time (between
    its read of the ticket and its write), commits ``statement`` on another connection:
    another replica's change landing in that gap."""
    calls = 0

    def clock() -> datetime:
        nonlocal calls
        calls += 1
        if calls <= times:
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute(statement, (ticket_id,))
        return datetime.now(UTC)

    return clock


async def test_a_change_that_lost_the_race_is_decided_again_on_the_new_row(
    repo: TicketRepository, pool: Pool, migrated_dsn: str
) -> None:
    ticket_id = await _running_ticket(repo)
    cancel = (
        "UPDATE tickets SET status = 'CANCELLED', version = version + 1, completed_at = now(), "
        "lease_expires_at = NULL WHERE ticket_id = %s"
    )
    racing = TicketRepository(
        pool=pool, clock=_clock_with_concurrent_writer(migrated_dsn, cancel, ticket_id, times=1)
    )
    position = await repo.current_position()
    # Decided on RUNNING (legal), but the ticket was cancelled before the write: decided
    # again on CANCELLED, which is terminal.
    with pytest.raises(FailedPrecondition, match="terminal"):
        await racing.update_status(
            StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1, result={"x": 1}),
            actor="worker:w1",
        )
    stored = await repo.get(ticket_id)
    assert (stored.status, stored.version, stored.result) == (S.CANCELLED, 4, None)
    # Not applied, only recorded: the attempt ended (cancelled) before its result came.
    [late] = await repo.events_after(position, TicketFilter(), limit=10)
    assert late.type is EventType.LATE_RESULT_REJECTED
    assert (late.ticket, late.details["result"]) == (stored, {"x": 1})


async def test_a_change_that_keeps_losing_the_race_is_aborted_and_writes_nothing(
    repo: TicketRepository, pool: Pool, migrated_dsn: str
) -> None:
    ticket_id = await _running_ticket(repo)
    bump = "UPDATE tickets SET version = version + 1 WHERE ticket_id = %s"
    racing = TicketRepository(
        pool=pool, clock=_clock_with_concurrent_writer(migrated_dsn, bump, ticket_id, times=100)
    )
    position = await repo.current_position()
    with pytest.raises(Aborted, match="retry"):
        await racing.update_status(
            StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1), actor="worker:w1"
        )
    stored = await repo.get(ticket_id)
    assert stored.status is S.RUNNING
    assert stored.version == 3 + 5  # five reads, five concurrent bumps, no write of ours
    assert await repo.events_after(position, TicketFilter(), limit=10) == []


async def test_concurrent_terminal_reports_on_one_ticket_one_wins(repo: TicketRepository) -> None:
    ticket_id = await _running_ticket(repo)
    position = await repo.current_position()
    updates = [
        StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1, result={"n": n})
        for n in range(8)
    ] + [
        StatusUpdate(ticket_id=ticket_id, status=S.CANCELLED, attempt=0, error_message=f"c{n}")
        for n in range(8)
    ]
    results = await asyncio.gather(
        *(repo.update_status(u, actor="s") for u in updates), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1, results
    assert all(isinstance(r, FailedPrecondition) for r in results if r not in won)
    stored = await repo.get(ticket_id)
    assert stored == won[0]
    assert stored.version == 4
    events = await repo.events_after(position, TicketFilter(), limit=20)
    [change] = [e for e in events if e.type is not EventType.LATE_RESULT_REJECTED]
    assert change.ticket == stored
    # The results that lost (one reporter, one attempt: one record) came too late.
    [late] = [e for e in events if e.type is EventType.LATE_RESULT_REJECTED]
    assert (late.ticket, late.details["reported_status"]) == (stored, "COMPLETED")


async def test_concurrent_report_batches_on_the_same_tickets_apply_each_report_once(
    repo: TicketRepository,
) -> None:
    ids = [await _running_ticket(repo, f"t{i}") for i in range(6)]
    position = await repo.current_position()
    completed = [StatusUpdate(ticket_id=i, status=S.COMPLETED, attempt=1) for i in ids]
    # Eight batches of the same reports in different orders, all at once: each ticket is
    # completed once (the other batches get the same ticket back as an identical repeat).
    batches = [
        [(u, "worker:w1") for u in (completed[n:] + completed[:n])[:: 1 if n % 2 else -1]]
        for n in range(8)
    ]
    results = await asyncio.gather(*(repo.update_status_many(b) for b in batches))
    for batch, answers in zip(batches, results, strict=True):
        done = [a for a in answers if isinstance(a, Ticket) and a.status is S.COMPLETED]
        assert [a.ticket_id for a in done] == [u.ticket_id for u, _ in batch]
    events = await repo.events_after(position, TicketFilter(), limit=100)
    assert sorted(e.ticket.ticket_id for e in events) == sorted(ids)
    # A refusal stays with its report; the others of the batch are applied.
    [(fresh, _)] = await repo.create_many([spec("fresh")], actor="s")
    running = await _running_ticket(repo, "r")
    answers = await repo.update_status_many(
        [
            (StatusUpdate(ticket_id=fresh.ticket_id, status=S.COMPLETED, attempt=1), "s"),
            (StatusUpdate(ticket_id=running, status=S.COMPLETED, attempt=1), "s"),
            (StatusUpdate(ticket_id=str(uuid.uuid4()), status=S.RUNNING, attempt=1), "s"),
        ]
    )
    assert [type(a).__name__ for a in answers] == ["FailedPrecondition", "Ticket", "NotFound"]
    assert (await repo.get(running)).status is S.COMPLETED
    assert (await repo.get(fresh.ticket_id)).status is S.PENDING


async def test_a_report_batch_decides_again_the_tickets_changed_elsewhere(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    # All remembered as RUNNING; one is cancelled, one just re-versioned, behind the
    # repository's back (another replica): their writes in the batch statement touch
    # nothing, and each is decided again on a fresh read.
    cancelled, bumped, *untouched = [await _running_ticket(repo, f"t{i}") for i in range(5)]
    _sql(
        migrated_dsn,
        "UPDATE tickets SET status = 'CANCELLED', version = version + 1, "
        "lease_expires_at = NULL, completed_at = now() WHERE ticket_id = %s",
        cancelled,
    )
    _sql(migrated_dsn, "UPDATE tickets SET version = version + 1 WHERE ticket_id = %s", bumped)
    position = await repo.current_position()
    answers = await repo.update_status_many(
        [
            (StatusUpdate(ticket_id=t, status=S.COMPLETED, attempt=1), "worker:w1")
            for t in (cancelled, bumped, *untouched)
        ]
    )
    assert isinstance(answers[0], FailedPrecondition)
    done = [a for a in answers[1:] if isinstance(a, Ticket)]
    assert [(t.ticket_id, t.status, t.version) for t in done] == [
        (bumped, S.COMPLETED, 5),
        *((t, S.COMPLETED, 4) for t in untouched),
    ]
    events = await repo.events_after(position, TicketFilter(), limit=10)
    # The cancelled ticket's report came too late: recorded, not applied.
    [late] = [e for e in events if e.type is EventType.LATE_RESULT_REJECTED]
    assert (late.ticket.ticket_id, late.ticket.status) == (cancelled, S.CANCELLED)
    changes = [e for e in events if e is not late]
    assert sorted(e.ticket.ticket_id for e in changes) == sorted([bumped, *untouched])
    assert {e.ticket.ticket_id: e.ticket for e in changes} == {t.ticket_id: t for t in done}


async def test_a_batch_of_tickets_not_remembered_is_read_and_written_together(
    repo: TicketRepository, pool: Pool, migrated_dsn: str
) -> None:
    # Another replica, or a restart: nothing remembered, every ticket read afresh. One
    # of them changes between that read and the write (once): decided again.
    running = [await _running_ticket(repo, f"t{i}") for i in range(5)]
    [(pending, _)] = await repo.create_many([spec("pending")], actor="s")
    bump = "UPDATE tickets SET version = version + 1 WHERE ticket_id = %s"
    racing = _clock_with_concurrent_writer(migrated_dsn, bump, running[1], times=1)
    reads = 0

    def clock() -> datetime:
        nonlocal reads
        reads += 1  # once per decision round
        return racing()

    forgetful = TicketRepository(pool=pool, clock=clock, recent_tickets=0)
    unknown = str(uuid.uuid4())
    answers = await forgetful.update_status_many(
        [
            (StatusUpdate(ticket_id=t, status=S.COMPLETED, attempt=1), "worker:w1")
            for t in (*running, pending.ticket_id, unknown)
        ]
    )
    *done, refused, missing = answers
    assert [(t.ticket_id, t.status) for t in done] == [(t, S.COMPLETED) for t in running]  # type: ignore[union-attr]
    assert done[1].version == 5  # type: ignore[union-attr]
    assert isinstance(refused, FailedPrecondition)
    assert isinstance(missing, NotFound)
    # Two rounds for seven updates: all read at once, then the one that moved on.
    assert reads == 2
    assert len(_batch_xids(migrated_dsn, running)) == 1


def _batch_xids(dsn: str, ticket_ids: list[str]) -> set[int]:
    """The transactions that wrote the latest event of each of these tickets."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (ticket_id) xid FROM ticket_events"
            " WHERE ticket_id = ANY(%s::uuid[]) ORDER BY ticket_id, seq DESC",
            (ticket_ids,),
        ).fetchall()
    assert len(rows) == len(ticket_ids)
    return {row[0] for row in rows}


@pytest.mark.parametrize("moved_on", [False, True])
async def test_a_batch_is_written_in_one_transaction(
    repo: TicketRepository, migrated_dsn: str, moved_on: bool
) -> None:
    # Decided on remembered tickets, a batch is one all-or-nothing statement; if one
    # ticket moved on meanwhile it writes nothing, and the batch is decided again in one
    # transaction: either way the changes of a batch commit together (one xid).
    created = await repo.create_many([spec(f"a{i}") for i in range(5)], actor="s")
    pending = [t.ticket_id for t, _ in created]
    running = [await _running_ticket(repo, f"r{i}") for i in range(5)]
    if moved_on:
        for ticket_id in (pending[2], running[3]):
            _sql(
                migrated_dsn,
                "UPDATE tickets SET version = version + 1 WHERE ticket_id = %s",
                ticket_id,
            )
    assigned = await repo.assign_many(
        [
            Assignment(ticket_id=t, worker_id="w2", lease_seconds=30, attempt=1)
            for t in reversed(pending)
        ],
        actor="s",
    )
    assert [a.ticket_id for a in assigned if isinstance(a, Ticket)] == pending[::-1]
    assert all(a.status is S.ASSIGNED and a.worker_id == "w2" for a in assigned)  # type: ignore[union-attr]
    assert len(_batch_xids(migrated_dsn, pending)) == 1
    done = await repo.update_status_many(
        [(StatusUpdate(ticket_id=t, status=S.COMPLETED, attempt=1), "worker:w1") for t in running]
    )
    assert [(d.ticket_id, d.status) for d in done if isinstance(d, Ticket)] == [
        (t, S.COMPLETED) for t in running
    ]
    assert len(_batch_xids(migrated_dsn, running)) == 1
    for ticket in [*assigned, *done]:
        assert isinstance(ticket, Ticket)
        assert await repo.get(ticket.ticket_id) == ticket


async def test_concurrent_single_creates_are_written_together_and_answered_each(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    [(taken, _)] = await repo.create_many([spec("taken", parameters={"a": 1})], actor="s")
    position = await repo.current_position()
    answers = await asyncio.gather(
        *(repo.create(spec(f"new{i}"), actor="service:o") for i in range(4)),
        repo.create(spec("taken", parameters={"a": 1}), actor="service:o"),  # identical
        repo.create(spec("taken", parameters={"a": 2}), actor="service:o"),  # differs
        repo.create(spec("elsewhere", plan_id="plan-2"), actor="service:p"),  # another actor
        return_exceptions=True,
    )
    *answered, identical, differs, elsewhere = answers
    new = cast(list[tuple[Ticket, bool]], answered)  # (ticket, created): unpacking fails otherwise
    assert [(t.spec.task_id, created) for t, created in new] == [
        (f"new{i}", True) for i in range(4)
    ]
    assert identical == (taken, False)
    assert isinstance(differs, AlreadyExists)
    assert [v.field for v in differs.violations] == ["ticket.parameters"]
    assert isinstance(elsewhere, tuple)
    assert elsewhere[1]
    # The four of one turn went in one statement, and the refusal took nothing back.
    assert len(_batch_xids(migrated_dsn, [t.ticket_id for t, _ in new])) == 1
    events = await repo.events_after(position, TicketFilter(), limit=10)
    assert sorted((e.ticket.task_id, e.actor) for e in events) == [
        ("elsewhere", "service:p"),
        *((f"new{i}", "service:o") for i in range(4)),
    ]


async def test_concurrent_changes_are_written_together_and_answered_each(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    running = [await _running_ticket(repo, f"r{i}") for i in range(4)]
    [(pending, _), (assignable, _)] = await repo.create_many(
        [spec("pending"), spec("assignable")], actor="s"
    )

    def completed(ticket_id: str) -> StatusUpdate:
        return StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1)

    first, second, batch, assigned, refused, repeat = await asyncio.gather(
        *(repo.update_status(completed(t), actor="w") for t in running[:2]),
        repo.update_status_many([(completed(t), "w") for t in running[2:]]),  # another caller's
        repo.assign(
            Assignment(ticket_id=assignable.ticket_id, worker_id="w2", lease_seconds=30, attempt=1),
            actor="s",
        ),
        repo.update_status(completed(pending.ticket_id), actor="w"),  # PENDING -> COMPLETED
        # The same ticket twice: the second is decided after the first (a repeat).
        repo.update_status(completed(running[0]), actor="w"),
        return_exceptions=True,
    )
    assert isinstance(batch, list)
    done = [first, second, *batch]
    assert [(t.ticket_id, t.status) for t in done] == [(t, S.COMPLETED) for t in running]
    assert isinstance(assigned, Ticket)
    assert (assigned.status, assigned.worker_id) == (S.ASSIGNED, "w2")
    assert isinstance(refused, FailedPrecondition)  # for this update only
    assert repeat == first
    assert len(_batch_xids(migrated_dsn, [*running, assignable.ticket_id])) == 1
    assert (await repo.get(pending.ticket_id)).status is S.PENDING


def _sql(dsn: str, statement: str, ticket_id: str) -> None:
    """A change made by someone else (another replica), committed at once."""
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute(statement, (ticket_id,))


async def test_a_change_decided_on_the_remembered_ticket_skips_the_read(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    ticket_id = await _running_ticket(repo)  # remembered as RUNNING at version 3
    # Changed behind the repository's back *without* a new version (no writer does that):
    # only a read would see it, so the answer shows whether one was made.
    _sql(migrated_dsn, "UPDATE tickets SET description = 'changed' WHERE ticket_id = %s", ticket_id)
    done = await repo.update_status(
        StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1), actor="worker:w1"
    )
    assert (done.status, done.version, done.spec.description) == (S.COMPLETED, 4, "")
    assert (await repo.get(ticket_id)).spec.description == "changed"


async def test_a_remembered_ticket_changed_elsewhere_is_read_again(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    ticket_id = await _running_ticket(repo)
    position = await repo.current_position()
    _sql(
        migrated_dsn,
        "UPDATE tickets SET status = 'CANCELLED', version = version + 1, "
        "lease_expires_at = NULL, completed_at = now() WHERE ticket_id = %s",
        ticket_id,
    )
    # Legal on the remembered RUNNING, but the write finds version 4: decided again.
    with pytest.raises(FailedPrecondition, match="terminal"):
        await repo.update_status(
            StatusUpdate(ticket_id=ticket_id, status=S.COMPLETED, attempt=1), actor="worker:w1"
        )
    assert (await repo.get(ticket_id)).status is S.CANCELLED
    [late] = await repo.events_after(position, TicketFilter(), limit=10)  # recorded only
    assert late.type is EventType.LATE_RESULT_REJECTED


async def test_a_refusal_on_the_remembered_ticket_is_checked_on_a_fresh_read(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    [(t, _)] = await repo.create_many([spec()], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w1", lease_seconds=30, attempt=1), actor="s"
    )  # remembered as ASSIGNED
    _sql(
        migrated_dsn,
        "UPDATE tickets SET status = 'RUNNING', version = version + 1, started_at = now() "
        "WHERE ticket_id = %s",
        t.ticket_id,
    )
    # ASSIGNED -> COMPLETED would be refused; the ticket is RUNNING, so it is not.
    done = await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.COMPLETED, attempt=1), actor="worker:w1"
    )
    assert (done.status, done.version) == (S.COMPLETED, 4)


async def test_unknown_ticket(repo: TicketRepository) -> None:
    with pytest.raises(NotFound):
        await repo.get("00000000-0000-0000-0000-000000000000")


async def test_lease_expiry_requeues_then_fails(
    repo: TicketRepository, advance_clock: Callable[[float], None]
) -> None:
    [(t, _)] = await repo.create_many([spec(max_retries=1, timeout_seconds=30)], actor="s")
    for attempt in (1, 2):
        await repo.assign(
            Assignment(ticket_id=t.ticket_id, worker_id="w", lease_seconds=10, attempt=attempt),
            actor="s",
        )
        await repo.update_status(
            StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=attempt), actor="w"
        )
        assert await repo.expire_leases() == []
        advance_clock(31)
        [event] = await repo.expire_leases()
        assert event.type is EventType.LEASE_EXPIRED
    t = await repo.get(t.ticket_id)
    assert t.status is S.FAILED
    assert t.error_message == "timed out: worker w did not report within the task's timeout (30s)"
    assert t.attempt == 2
    assert t.lost_runs == 0
    # An assignment never started is a lost run: stored, and read back.
    [(never, _)] = await repo.create_many([spec("t2")], actor="s")
    await repo.assign(
        Assignment(ticket_id=never.ticket_id, worker_id="w", lease_seconds=10, attempt=1),
        actor="s",
    )
    advance_clock(11)
    await repo.expire_leases()
    never = await repo.get(never.ticket_id)
    assert (never.status, never.attempt, never.lost_runs) == (S.PENDING, 2, 1)


async def test_outbox_claims_are_exclusive(repo: TicketRepository) -> None:
    await repo.create_many([spec(f"t{i}") for i in range(5)], actor="s")
    first = await repo.claim_outbox(limit=3, claim_seconds=30)
    second = await repo.claim_outbox(limit=10, claim_seconds=30)
    assert len(first) == 3
    assert len(second) == 2
    assert {e.seq for e in first}.isdisjoint({e.seq for e in second})
    await repo.mark_relayed([e.seq for e in first])
    await repo.release_claims([e.seq for e in second])
    again = await repo.claim_outbox(limit=10, claim_seconds=30)
    assert [e.seq for e in again] == [e.seq for e in second]
    assert (await repo.outbox_backlog())[0] == 2


async def test_every_event_enters_the_outbox_and_relaying_leaves_event_rows_untouched(
    repo: TicketRepository, pool: Pool, advance_clock: Callable[[float], None]
) -> None:
    # Every statement that writes events: batch create, assignment, status update, lease
    # expiry, a refused late result.
    [(t, _)] = await repo.create_many([spec(max_retries=1)], actor="s")
    await repo.create_many([spec("t2"), spec("t3")], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w", lease_seconds=10, attempt=1), actor="s"
    )
    await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=1), actor="w"
    )
    advance_clock(24 * 3600)  # past any lease (a RUNNING lease lasts the task's timeout)
    assert len(await repo.expire_leases()) == 1
    with pytest.raises(FailedPrecondition):
        await repo.update_status(
            StatusUpdate(ticket_id=t.ticket_id, status=S.COMPLETED, attempt=1), actor="w"
        )

    async def event_rows() -> list[tuple[int, str]]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT seq, xmin::text AS xmin FROM ticket_events ORDER BY seq"
            )
            return [(r["seq"], r["xmin"]) for r in await cur.fetchall()]

    before = await event_rows()
    assert len(before) == 7
    assert (await repo.outbox_backlog())[0] == 7
    claimed = await repo.claim_outbox(limit=100, claim_seconds=30)
    assert [e.seq for e in claimed] == [seq for seq, _ in before]
    assert [e.event.type for e in claimed][-2:] == [
        EventType.LEASE_EXPIRED,
        EventType.LATE_RESULT_REJECTED,
    ]
    await repo.release_claims([e.seq for e in claimed[:3]])
    await repo.mark_relayed([e.seq for e in claimed[3:]])
    assert await repo.outbox_backlog() == (3, claimed[0].event.occurred_at)
    await repo.mark_relayed([claimed[0].seq])
    assert await repo.outbox_backlog() == (2, claimed[1].event.occurred_at)
    # Claiming, handing back and marking relayed wrote only the outbox: the event rows
    # are the versions their own statements wrote.
    assert await event_rows() == before


async def test_a_big_read_is_decoded_in_chunks_with_the_event_loop_let_in_between(
    repo: TicketRepository, loop_turns: LoopTurns
) -> None:
    seen: list[tuple[int, int]] = []

    def convert(row: dict[str, int]) -> int:
        seen.append((row["n"], loop_turns.count))
        return row["n"]

    rows = await repo._fetch_converted("SELECT generate_series(1, 120) AS n", None, convert)
    assert rows == list(range(1, 121))
    # Decoded 50 rows at a time; other tasks ran between the chunks.
    [first], [second], [third] = ({t for n, t in seen if (n - 1) // 50 == c} for c in range(3))
    assert first < second < third


async def test_purge_removes_only_old_relayed_events(
    repo: TicketRepository, advance_clock: Callable[[float], None]
) -> None:
    await repo.create_many([spec(f"t{i}") for i in range(3)], actor="s")
    relayed = await repo.claim_outbox(limit=2, claim_seconds=30)
    await repo.mark_relayed([e.seq for e in relayed])
    advance_clock(3600)
    await repo.create_many([spec("recent")], actor="s")
    cutoff = relayed[0].event.occurred_at + timedelta(seconds=1)
    assert await repo.purge_events(older_than=cutoff) == 2
    assert await repo.purge_events(older_than=cutoff) == 0
    pending, _ = await repo.outbox_backlog()
    assert pending == 2  # the undelivered old event and the recent one are kept


async def test_purge_marks_the_newest_position_it_deleted(
    repo: TicketRepository, advance_clock: Callable[[float], None]
) -> None:
    # A reader positioned before an event the purge deleted is refused, one after it
    # reads on.
    await repo.create_many([spec("a")], actor="s")
    advance_clock(10)
    await repo.create_many([spec("b")], actor="s")
    relayed = await repo.claim_outbox(limit=10, claim_seconds=30)
    await repo.mark_relayed([e.seq for e in relayed])
    first, second = await repo.events_after(ORIGIN, TicketFilter(), limit=10)
    advance_clock(3600)
    await repo.create_many([spec("recent")], actor="s")
    # Only "a" is old enough: the mark is its position, not "b"'s.
    assert await repo.purge_events(older_than=first.occurred_at + timedelta(seconds=1)) == 1
    with pytest.raises(CursorPurged) as purged:
        await repo.events_after(ORIGIN, TicketFilter(), limit=10)
    assert purged.value.purged_through == cursor_of(first)
    assert [
        e.ticket.task_id
        for e in await repo.events_after(cursor_of(first), TicketFilter(), limit=10)
    ] == ["b", "recent"]
    assert await repo.purge_events(older_than=second.occurred_at + timedelta(seconds=1)) == 1
    with pytest.raises(CursorPurged) as purged:
        await repo.events_after(cursor_of(first), TicketFilter(), limit=10)
    assert purged.value.purged_through == cursor_of(second)
    # A purge that deletes nothing leaves the mark where it is.
    assert await repo.purge_events(older_than=second.occurred_at) == 0
    [recent] = await repo.events_after(cursor_of(second), TicketFilter(), limit=10)
    assert recent.ticket.task_id == "recent"


async def test_watch_never_skips_an_event_that_commits_late(
    repo: TicketRepository, migrated_dsn: str
) -> None:
    [(early, _)] = await repo.create_many([spec("early")], actor="s")
    start = await repo.current_position()
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as slow:
        # A writer that started first but commits last (its event has the lower xid).
        await slow.execute(
            "UPDATE tickets SET version = version + 1, updated_at = now() WHERE ticket_id = %s",
            (early.ticket_id,),
        )
        await slow.execute(
            "INSERT INTO ticket_events (event_id, event_type, ticket_id, plan_id, status, actor,"
            " occurred_at, ticket) SELECT gen_random_uuid(), 'STATUS_CHANGED', ticket_id,"
            " plan_id, status, 'test:slow', now(), to_jsonb(t) FROM tickets t"
            " WHERE ticket_id = %s",
            (early.ticket_id,),
        )
        await repo.create_many([spec("fast")], actor="s")
        # The fast commit is held back while the slow writer is open ...
        assert await repo.events_after(start, TicketFilter(), limit=10) == []
        await slow.commit()
    # ... and afterwards both arrive, the slow one first.
    events = await repo.events_after(start, TicketFilter(), limit=10)
    assert [(e.actor, e.ticket.task_id) for e in events] == [("test:slow", "early"), ("s", "fast")]


async def test_no_lease_expires_until_a_grace_after_the_database_answers_again(
    repo: TicketRepository, clock: Any
) -> None:
    # A lease that passed while the database did not answer used to expire in the first
    # sweep after it: the worker's report of a task finished meanwhile, still in its
    # retries, came second (FAILED "timed out", or the task re-run).
    sweeper = LeaseSweeper(repository=repo, interval=1, grace=timedelta(seconds=30), clock=clock)
    [(t, _)] = await repo.create_many([spec(max_retries=1)], actor="s")
    await repo.assign(
        Assignment(ticket_id=t.ticket_id, worker_id="w", lease_seconds=10, attempt=1), actor="s"
    )
    clock.advance(11)
    await sweeper.sweep_round()  # within the grace after the sweeper's own start
    assert (await repo.get(t.ticket_id)).status is S.ASSIGNED

    clock.advance(20)
    pool, repo._pool = repo._pool, UnreachablePool()  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        await sweeper.sweep_round()
    clock.advance(60)  # the outage lasts a minute
    repo._pool = pool
    await sweeper.sweep_round()
    # The worker's report, held back by the outage, gets in first.
    running = await repo.update_status(
        StatusUpdate(ticket_id=t.ticket_id, status=S.RUNNING, attempt=1), actor="worker:w"
    )
    assert running.status is S.RUNNING
    # A lease that passes after the grace expires as usual.
    clock.advance(24 * 3600)
    await sweeper.sweep_round()
    assert (await repo.get(t.ticket_id)).status is S.PENDING


async def test_batches_sharing_tickets_in_different_orders_do_not_deadlock(
    migrated_dsn: str,
) -> None:
    # Rows went in in request order: overlapping batches in different orders waited for
    # each other's keys (a deadlock each, a second to detect, retried, then ABORTED: 9 of
    # 10 batches in a tester's run).
    keys = [f"t{i}" for i in range(1000)]
    batches = [random.Random(n).sample(keys, len(keys)) for n in range(6)]
    pool = open_pool(migrated_dsn, min_size=6, max_size=6)
    await pool.open(wait=True)
    try:
        repo = TicketRepository(pool=pool)
        answers = await asyncio.gather(
            *(repo.create_many([spec(k) for k in batch], actor="s") for batch in batches)
        )
    finally:
        await pool.close()
    ids = {ticket.task_id: ticket.ticket_id for ticket, _ in answers[0]}
    for batch, answer in zip(batches, answers, strict=True):
        # Each answer in its request's order, the same ticket for a key in every answer.
        assert [(t.task_id, t.ticket_id) for t, _ in answer] == [(k, ids[k]) for k in batch]
    assert sum(created for answer in answers for _, created in answer) == len(keys)
