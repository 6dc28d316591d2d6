"""The state machine, table-driven: every (status, request) pair has one expected outcome."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from execution_ticket_service.domain.models import (
    Assignment,
    EventType,
    StatusUpdate,
    Ticket,
    TicketSpec,
    TicketStatus,
)
from execution_ticket_service.domain.state_machine import (
    LEGAL_TRANSITIONS,
    MAX_LOST_RUNS,
    check_token_eligible,
    decide_assign,
    decide_lease_expiry,
    decide_update,
    update_digest,
)
from execution_ticket_service.domain.validation import event_payload_bytes, json_size
from hive_common.errors import Aborted, FailedPrecondition

S = TicketStatus
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
TID = "6f1f0a3e-8a47-4cf8-9a0f-3c1d1fbb7a11"


def ticket(
    status: S = S.PENDING, *, attempt: int = 1, max_retries: int = 2, worker: str = ""
) -> Ticket:
    leased = status in (S.ASSIGNED, S.RUNNING)
    return Ticket(
        ticket_id=TID,
        spec=TicketSpec(
            plan_id="plan",
            task_id="t",
            task_type="echo",
            max_retries=max_retries,
            timeout_seconds=30,
        ),
        status=status,
        attempt=attempt,
        version=3,
        created_at=NOW,
        updated_at=NOW,
        worker_id=worker or ("w1" if leased else ""),
        lease_expires_at=NOW + timedelta(seconds=10) if leased else None,
    )


def update(status: S, *, attempt: int = 1, **kwargs: object) -> StatusUpdate:
    return StatusUpdate(ticket_id=TID, status=status, attempt=attempt, **kwargs)  # type: ignore[arg-type]


# (current status, requested status) -> resulting status, or None when illegal.
UPDATE_TABLE: list[tuple[S, S, S | None]] = [
    (S.PENDING, S.RUNNING, None),
    (S.PENDING, S.COMPLETED, None),
    (S.PENDING, S.FAILED, None),
    (S.PENDING, S.CANCELLED, S.CANCELLED),
    (S.ASSIGNED, S.RUNNING, S.RUNNING),
    (S.ASSIGNED, S.COMPLETED, None),
    (S.ASSIGNED, S.FAILED, S.PENDING),  # retries left: re-queued
    (S.ASSIGNED, S.CANCELLED, S.CANCELLED),
    (S.RUNNING, S.RUNNING, None),  # a different (non-identical) RUNNING is not a no-op
    (S.RUNNING, S.COMPLETED, S.COMPLETED),
    (S.RUNNING, S.FAILED, S.PENDING),
    (S.RUNNING, S.CANCELLED, S.CANCELLED),
    *[
        (t, r, None)
        for t in (S.COMPLETED, S.FAILED, S.CANCELLED)
        for r in (S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED)
    ],
]


@pytest.mark.parametrize(("current", "requested", "expected"), UPDATE_TABLE)
def test_update_transitions(current: S, requested: S, expected: S | None) -> None:
    before = ticket(current)
    if current is S.RUNNING and requested is S.RUNNING:
        before = replace(before, last_update_digest="something else")
    request = update(requested)
    if expected is None and current.terminal and requested in (S.COMPLETED, S.FAILED):
        # Refused, and recorded as a late result (see the tests of late results).
        refused = decide_update(before, request, now=LATER, actor="worker:w1")
        assert isinstance(refused.error, FailedPrecondition)
        assert (refused.changed, refused.ticket) == (False, before)
        return
    if expected is None:
        with pytest.raises(FailedPrecondition):
            decide_update(before, request, now=LATER, actor="worker:w1")
        return
    outcome = decide_update(before, request, now=LATER, actor="worker:w1")
    assert outcome.changed
    assert outcome.error is None
    after = outcome.ticket
    assert after.status is expected
    assert expected in LEGAL_TRANSITIONS[current]
    assert after.version == before.version + 1
    assert after.updated_at == LATER
    assert outcome.event is not None
    assert outcome.event.previous_status is current
    assert outcome.event.ticket == after
    assert outcome.event.actor == "worker:w1"


def test_the_table_covers_every_update_pair() -> None:
    pairs = {(c, r) for c, r, _ in UPDATE_TABLE}
    assert pairs == {(c, r) for c in S for r in (S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED)}


def test_running_sets_started_at_and_extends_lease_to_the_task_timeout() -> None:
    after = decide_update(ticket(S.ASSIGNED), update(S.RUNNING), now=LATER, actor="a").ticket
    assert after.started_at == LATER
    assert after.lease_expires_at == LATER + timedelta(seconds=30)


def test_completed_keeps_result_and_clears_lease() -> None:
    request = update(S.COMPLETED, result={"out": 1})
    after = decide_update(ticket(S.RUNNING), request, now=LATER, actor="a").ticket
    assert after.result == {"out": 1}
    assert after.completed_at == LATER
    assert after.lease_expires_at is None
    assert after.worker_id == "w1"


@pytest.mark.parametrize(
    ("attempt", "max_retries", "permanent", "expected"),
    [
        (1, 2, False, S.PENDING),
        (2, 2, False, S.PENDING),
        (3, 2, False, S.FAILED),  # attempt max_retries + 1 is the last one
        (1, 0, False, S.FAILED),
        (1, 2, True, S.FAILED),
    ],
)
def test_failure_requeues_only_with_retries_left(
    attempt: int, max_retries: int, permanent: bool, expected: S
) -> None:
    before = ticket(S.RUNNING, attempt=attempt, max_retries=max_retries)
    request = update(S.FAILED, attempt=attempt, error_message="boom", permanent=permanent)
    outcome = decide_update(before, request, now=LATER, actor="a")
    after = outcome.ticket
    assert after.status is expected
    assert after.error_message == "boom"
    assert outcome.event is not None
    if expected is S.PENDING:
        assert after.attempt == attempt + 1
        assert after.worker_id == ""
        assert after.lease_expires_at is None
        assert after.completed_at is None
        assert outcome.event.type is EventType.REQUEUED
        assert outcome.event.worker_id == "w1"  # the worker that lost it hears about it
    else:
        assert after.attempt == attempt
        assert after.completed_at == LATER
        assert outcome.event.type is EventType.STATUS_CHANGED


def test_a_requeueing_failure_keeps_the_attempts_result_in_its_event() -> None:
    request = update(S.FAILED, error_message="flaky", result={"partial": [1, 2]})
    outcome = decide_update(ticket(S.RUNNING), request, now=LATER, actor="worker:w1")
    assert outcome.ticket.status is S.PENDING
    assert outcome.ticket.result is None  # the ticket's result is its final attempt's
    assert outcome.event is not None
    assert outcome.event.type is EventType.REQUEUED
    assert outcome.event.details == {
        "failed_attempt": 1,
        "error_message": "flaky",
        "worker_lost": False,
        "result": {"partial": [1, 2]},
    }
    # Counted where events are held in memory (the watch window's byte budget).
    assert event_payload_bytes(outcome.event) == json_size({"partial": [1, 2]}) > 0


def _ended(how: str) -> Ticket:
    """Attempt 1 of a ticket without retries, ended ``how`` (not by a result of the test's)."""
    running = ticket(S.RUNNING, max_retries=0)
    if how == "timed out":
        assert running.lease_expires_at is not None
        expired = running.lease_expires_at + timedelta(seconds=1)
        return decide_lease_expiry(running, now=expired).ticket
    if how == "cancelled":
        cancel = update(S.CANCELLED, attempt=0)
        return decide_update(running, cancel, now=LATER, actor="service:o").ticket
    done = update(S.COMPLETED, result={"first": True})
    return decide_update(running, done, now=LATER, actor="worker:w1").ticket


@pytest.mark.parametrize("how", ["timed out", "cancelled", "completed"])
@pytest.mark.parametrize("reported", [S.COMPLETED, S.FAILED])
def test_a_result_for_the_attempt_a_terminal_ticket_ended_is_recorded_as_late(
    how: str, reported: S
) -> None:
    ended = _ended(how)
    assert ended.status.terminal
    assert ended.attempt == 1
    message = "boom" if reported is S.FAILED else ""
    # expected_version is not looked at: no version of the ticket could take the result.
    report = update(reported, result={"late": 1}, error_message=message, expected_version=1)
    outcome = decide_update(ended, report, now=LATER, actor="worker:w1")
    assert (outcome.changed, outcome.ticket) == (False, ended)
    assert isinstance(outcome.error, FailedPrecondition)
    assert outcome.error.message == f"ticket {TID} is {ended.status.value}, a terminal status"
    event = outcome.event
    assert event is not None
    assert event.type is EventType.LATE_RESULT_REJECTED
    assert (event.previous_status, event.ticket, event.worker_id) == (ended.status, ended, "w1")
    assert event.details == {
        "reported_status": reported.value,
        "reported_attempt": 1,
        "result": {"late": 1},
        "error_message": message,
    }
    # Recorded once per reporter, attempt and reported status, as a late result after a
    # re-queue is (the same event id: the store records it once).
    other = decide_update(ended, replace(report, result={"late": 2}), now=LATER, actor="worker:w1")
    assert other.event is not None
    assert other.event.event_id == event.event_id
    requeued = replace(ended, status=S.PENDING, attempt=2)
    stale = decide_update(requeued, report, now=LATER, actor="worker:w1")
    assert stale.event is not None
    assert stale.event.event_id == event.event_id


def test_the_report_that_ended_an_attempt_repeated_is_still_a_repeat() -> None:
    done = update(S.COMPLETED, result={"first": True})
    again = decide_update(_ended("completed"), done, now=LATER, actor="worker:w1")
    assert (again.changed, again.event, again.error) == (False, None, None)


@pytest.mark.parametrize("reported", [S.RUNNING, S.CANCELLED])
@pytest.mark.parametrize("how", ["timed out", "cancelled", "completed"])
def test_a_start_or_cancel_of_a_terminal_ticket_is_refused_without_an_event(
    how: str, reported: S
) -> None:
    with pytest.raises(FailedPrecondition, match="a terminal status"):
        decide_update(_ended(how), update(reported), now=LATER, actor="worker:w1")


@pytest.mark.parametrize("status", [S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_identical_repeat_is_a_no_op(status: S) -> None:
    start = S.RUNNING if status is not S.RUNNING else S.ASSIGNED
    request = update(status, result={"x": 1} if status is S.COMPLETED else None)
    first = decide_update(ticket(start), request, now=LATER, actor="a")
    again = decide_update(first.ticket, request, now=LATER + timedelta(1), actor="a")
    assert not again.changed
    assert again.event is None
    assert again.error is None
    assert again.ticket == first.ticket


def test_identical_repeat_of_a_requeueing_failure_is_a_no_op_even_with_stale_attempt() -> None:
    request = update(S.FAILED, error_message="boom")
    first = decide_update(ticket(S.RUNNING), request, now=LATER, actor="a")
    assert first.ticket.attempt == 2
    again = decide_update(first.ticket, request, now=LATER, actor="a")
    assert not again.changed
    assert again.error is None
    assert again.event is None


def test_a_requeueing_failure_repeated_after_the_next_attempt_moved_on_is_a_no_op() -> None:
    # Its reply lost, the worker sends it again after the next attempt was assigned to
    # another worker and started: it was refused as stale and recorded as a late result.
    request = update(S.FAILED, error_message="transient")
    requeued = decide_update(ticket(S.RUNNING), request, now=LATER, actor="worker:a").ticket
    assigned = decide_assign(
        requeued,
        Assignment(ticket_id=requeued.ticket_id, worker_id="b", lease_seconds=30, attempt=2),
        now=LATER,
        actor="service:o",
    ).ticket
    running = decide_update(assigned, update(S.RUNNING, attempt=2), now=LATER, actor="worker:b")
    again = decide_update(running.ticket, request, now=LATER, actor="worker:a")
    assert (again.changed, again.event, again.error) == (False, None, None)
    assert again.ticket == running.ticket
    # Another report of the ended attempt is still a late result.
    other = decide_update(
        running.ticket, update(S.FAILED, error_message="other"), now=LATER, actor="worker:a"
    )
    assert isinstance(other.error, FailedPrecondition)


def test_repeat_with_different_content_is_not_a_no_op() -> None:
    first = decide_update(
        ticket(S.RUNNING), update(S.COMPLETED, result={"x": 1}), now=LATER, actor="a"
    )
    other = decide_update(first.ticket, update(S.COMPLETED, result={"x": 2}), now=LATER, actor="a")
    assert isinstance(other.error, FailedPrecondition)
    assert other.event is not None
    assert other.event.type is EventType.LATE_RESULT_REJECTED


def test_stale_attempt_is_recorded_as_late_result_and_not_applied() -> None:
    current = ticket(S.RUNNING, attempt=2)
    outcome = decide_update(
        current, update(S.COMPLETED, attempt=1, result={"r": 1}), now=LATER, actor="worker:old"
    )
    assert not outcome.changed
    assert outcome.ticket == current
    assert isinstance(outcome.error, FailedPrecondition)
    assert outcome.event is not None
    assert outcome.event.type is EventType.LATE_RESULT_REJECTED
    assert outcome.event.details["reported_attempt"] == 1
    assert outcome.event.details["reported_status"] == "COMPLETED"
    # The event concerns the worker that reported late, not the ticket's current holder.
    assert outcome.event.worker_id == "old"


def test_future_attempt_is_refused_without_event() -> None:
    with pytest.raises(FailedPrecondition):
        decide_update(ticket(S.RUNNING), update(S.COMPLETED, attempt=2), now=LATER, actor="a")


def test_expected_version_mismatch_is_aborted() -> None:
    with pytest.raises(Aborted):
        decide_update(
            ticket(S.RUNNING), update(S.COMPLETED, expected_version=2), now=LATER, actor="a"
        )
    ok = decide_update(
        ticket(S.RUNNING), update(S.COMPLETED, expected_version=3), now=LATER, actor="a"
    )
    assert ok.ticket.version == 4


def test_cancel_with_attempt_zero_applies_to_the_current_attempt() -> None:
    outcome = decide_update(
        ticket(S.RUNNING, attempt=3, max_retries=5),
        update(S.CANCELLED, attempt=0),
        now=LATER,
        actor="service:o",
    )
    assert outcome.ticket.status is S.CANCELLED
    assert outcome.ticket.attempt == 3


# ---- assignment ---------------------------------------------------------------------------


def assignment(**kwargs: object) -> Assignment:
    values: dict[str, object] = {
        "ticket_id": TID,
        "worker_id": "w9",
        "lease_seconds": 20,
        "attempt": 1,
    }
    values.update(kwargs)
    return Assignment(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "legal"),
    [
        (S.PENDING, True),
        (S.ASSIGNED, False),
        (S.RUNNING, False),
        (S.COMPLETED, False),
        (S.FAILED, False),
        (S.CANCELLED, False),
    ],
)
def test_assign_only_from_pending(current: S, legal: bool) -> None:
    before = ticket(current, worker="other")
    if not legal:
        with pytest.raises(FailedPrecondition):
            decide_assign(before, assignment(), now=LATER, actor="service:o")
        return
    outcome = decide_assign(before, assignment(), now=LATER, actor="service:o")
    assert outcome.ticket.status is S.ASSIGNED
    assert outcome.ticket.worker_id == "w9"
    assert outcome.ticket.lease_expires_at == LATER + timedelta(seconds=20)
    assert outcome.event is not None
    assert outcome.event.type is EventType.ASSIGNED


@pytest.mark.parametrize("current", [S.ASSIGNED, S.RUNNING])
def test_assigning_a_held_ticket_names_its_worker(current: S) -> None:
    # It said "illegal transition ASSIGNED -> ASSIGNED".
    with pytest.raises(FailedPrecondition) as raised:
        decide_assign(ticket(current, worker="other"), assignment(), now=LATER, actor="s")
    assert raised.value.message == (
        f"ticket {TID} is already {current.value} on worker other (attempt 1)"
    )


def test_repeated_assignment_is_a_no_op() -> None:
    first = decide_assign(ticket(), assignment(), now=LATER, actor="s")
    again = decide_assign(first.ticket, assignment(lease_seconds=99), now=LATER, actor="s")
    assert not again.changed
    assert again.event is None
    assert again.ticket == first.ticket


def test_assign_checks_attempt_and_version() -> None:
    with pytest.raises(FailedPrecondition):
        decide_assign(ticket(attempt=2), assignment(attempt=1), now=LATER, actor="s")
    with pytest.raises(Aborted):
        decide_assign(ticket(), assignment(expected_version=1), now=LATER, actor="s")


# ---- lease expiry ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(S))
def test_lease_expiry_only_touches_leased_tickets_past_their_lease(status: S) -> None:
    before = ticket(status)
    not_yet = decide_lease_expiry(before, now=NOW + timedelta(seconds=9))
    assert not not_yet.changed
    expired = decide_lease_expiry(before, now=NOW + timedelta(seconds=10))
    assert expired.changed is (status in (S.ASSIGNED, S.RUNNING))


def test_lease_expiry_requeues_with_retries_left() -> None:
    outcome = decide_lease_expiry(ticket(S.RUNNING), now=LATER + timedelta(minutes=1))
    assert outcome.ticket.status is S.PENDING
    assert outcome.ticket.attempt == 2
    assert outcome.ticket.worker_id == ""
    assert outcome.event is not None
    assert outcome.event.type is EventType.LEASE_EXPIRED
    assert outcome.event.worker_id == "w1"
    assert outcome.event.actor == "system:lease-sweeper"


def test_lease_expiry_fails_the_last_attempt_as_timed_out() -> None:
    outcome = decide_lease_expiry(
        ticket(S.RUNNING, attempt=3, max_retries=2), now=LATER + timedelta(minutes=1)
    )
    assert outcome.ticket.status is S.FAILED
    # Said who and what limit (it was a bare "timed out").
    assert outcome.ticket.error_message == (
        "timed out: worker w1 did not report within the task's timeout (30s)"
    )
    assert outcome.ticket.attempt == 3


def test_an_assignment_lease_expiry_is_a_lost_run_until_the_limit() -> None:
    # The worker never started the task: re-queued without using a retry.
    last = ticket(S.ASSIGNED, attempt=3, max_retries=2)
    outcome = decide_lease_expiry(last, now=LATER + timedelta(minutes=1))
    assert (outcome.ticket.status, outcome.ticket.attempt, outcome.ticket.lost_runs) == (
        S.PENDING,
        4,
        1,
    )
    assert not outcome.ticket.retries_left  # attempt 4, one lost: the last of 1 + 2 retries
    # Not "timed out": the task never ran (it read as if it had run too long).
    never_started = "not started: worker w1 did not start it within its assignment lease"
    assert outcome.ticket.error_message == never_started
    assert outcome.event is not None
    assert outcome.event.details["worker_lost"] is True
    assert outcome.event.details["error_message"] == never_started
    spent = replace(last, lost_runs=MAX_LOST_RUNS, attempt=3 + MAX_LOST_RUNS)
    assert decide_lease_expiry(spent, now=LATER + timedelta(minutes=1)).ticket.status is S.FAILED


def test_a_worker_lost_failure_requeues_without_using_a_retry() -> None:
    running = ticket(S.RUNNING, attempt=1, max_retries=0)
    lost = update(S.FAILED, error_message="worker w1 lost", worker_lost=True)
    outcome = decide_update(running, lost, now=LATER, actor="orchestrator")
    assert (outcome.ticket.status, outcome.ticket.attempt, outcome.ticket.lost_runs) == (
        S.PENDING,
        2,
        1,
    )
    assert outcome.event is not None
    assert outcome.event.details["worker_lost"] is True
    # An ordinary failure of that attempt then ends it: max_retries 0.
    again = replace(outcome.ticket, status=S.RUNNING, worker_id="w2")
    failed = decide_update(again, update(S.FAILED, attempt=2), now=LATER, actor="w2")
    assert failed.ticket.status is S.FAILED
    # worker_lost with permanent is permanent.
    permanent = update(S.FAILED, worker_lost=True, permanent=True)
    assert decide_update(running, permanent, now=LATER, actor="o").ticket.status is S.FAILED


@pytest.mark.parametrize("status", list(S))
def test_tokens_only_for_assigned_or_running(status: S) -> None:
    if status in (S.ASSIGNED, S.RUNNING):
        check_token_eligible(ticket(status))
    else:
        with pytest.raises(FailedPrecondition):
            check_token_eligible(ticket(status))


def test_digest_depends_on_every_field() -> None:
    base = update(S.FAILED, error_message="e", result={"a": 1})
    digests = {
        update_digest(base),
        update_digest(replace(base, attempt=2)),
        update_digest(replace(base, error_message="f")),
        update_digest(replace(base, result={"a": 2})),
        update_digest(replace(base, permanent=True)),
        update_digest(replace(base, worker_lost=True)),
        update_digest(replace(base, status=S.COMPLETED)),
    }
    assert len(digests) == 7
    assert update_digest(replace(base, expected_version=7)) == update_digest(base)
    # Whoever words a worker's loss, it is the same report.
    lost = replace(base, worker_lost=True)
    assert update_digest(replace(lost, error_message="f")) == update_digest(lost)


def test_a_lost_worker_reported_twice_requeues_once_without_a_late_result() -> None:
    # The worker hands its attempt back as it drains (through one ticket-service replica),
    # and the orchestrator, not yet aware of it, reports the worker lost (through another).
    running = ticket(S.RUNNING, attempt=1)
    handed_back = update(S.FAILED, error_message="the worker stopped", worker_lost=True)
    first = decide_update(running, handed_back, now=LATER, actor="worker:w1")
    assert first.event is not None
    assert first.event.type is EventType.REQUEUED
    reported = update(S.FAILED, error_message="worker w1 lost: deregistered", worker_lost=True)
    second = decide_update(first.ticket, reported, now=LATER, actor="service:orchestrator")
    assert (second.changed, second.event, second.error) == (False, None, None)
    assert second.ticket == first.ticket
    # Still so once the next attempt runs elsewhere.
    moved_on = replace(first.ticket, status=S.RUNNING, worker_id="w2", version=9)
    third = decide_update(moved_on, reported, now=LATER, actor="service:orchestrator")
    assert (third.changed, third.event, third.error) == (False, None, None)
    # Another report of that attempt is still a late result.
    late = decide_update(moved_on, update(S.FAILED, error_message="x"), now=LATER, actor="w1")
    assert late.event is not None
    assert late.event.type is EventType.LATE_RESULT_REJECTED
