"""The ticket state machine (DESIGN.md section 4) as data plus three decision functions.

Each ``decide_*`` function is pure: given the current ticket and a request it returns an
:class:`Outcome` saying what to store (the new ticket and/or an event) and what to answer.
Storage applies the outcome only to the ticket version it was decided on (re-deciding on
a fresh read if the ticket changed meanwhile), so the rules live in one place.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from execution_ticket_service.domain.models import (
    LEASED_STATUSES,
    Assignment,
    EventType,
    StatusUpdate,
    Ticket,
    TicketEvent,
    TicketStatus,
)
from hive_common.errors import Aborted, FailedPrecondition, HiveError, ResourceExhausted

S = TicketStatus

# Every legal edge of the state machine; anything else is FAILED_PRECONDITION.
LEGAL_TRANSITIONS: dict[TicketStatus, frozenset[TicketStatus]] = {
    S.PENDING: frozenset({S.ASSIGNED, S.CANCELLED}),
    # -> PENDING is a re-queue (lease expired or retryable failure with attempts left).
    S.ASSIGNED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED, S.PENDING}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PENDING}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Targets a caller may request through UpdateTicketStatus (ASSIGNED has its own RPC,
# PENDING only happens as a consequence of a failure or an expired lease).
UPDATE_TARGETS: frozenset[TicketStatus] = frozenset({S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED})

MAX_LOST_RUNS = 3
"""Attempts per ticket that may end with their worker (stopped or lost) without using one
of the task's retries; after that such an ending counts as an ordinary failure."""
LEASE_SWEEPER_ACTOR = "system:lease-sweeper"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request does to a ticket.

    ``ticket`` is what the caller gets back (unchanged for an idempotent repeat);
    ``changed`` says whether the ticket row must be written; ``event`` is the outbox row to
    write (also present for a rejected late result); ``error`` is raised after the
    transaction commits, so a rejected late result is still recorded.
    """

    ticket: Ticket
    changed: bool = False
    event: TicketEvent | None = None
    error: HiveError | None = None


_LATE_RESULTS = uuid.UUID("5f0c4e52-7d1b-4a53-9a8e-2a6f1c0b9d47")


def update_digest(update: StatusUpdate) -> str:
    """Fingerprint of a status update; an identical retry has the same digest.

    A ``worker_lost`` report states one fact whoever words it: the attempt ended with its
    worker. So its message is left out, and the worker's own hand-back and the
    orchestrator's report of the same lost worker (through different replicas, each
    unaware of the other) are one report, not a re-queue and a late result."""
    body = {
        "status": update.status.value,
        "attempt": update.attempt,
        "result": update.result,
        "error_message": "" if update.worker_lost else update.error_message,
        "permanent": update.permanent,
        "worker_lost": update.worker_lost,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _event(
    kind: EventType,
    *,
    before: Ticket,
    after: Ticket,
    now: datetime,
    actor: str,
    worker_id: str | None = None,
    details: dict[str, object] | None = None,
    event_id: str | None = None,
) -> TicketEvent:
    return TicketEvent(
        event_id=event_id or str(uuid.uuid4()),
        type=kind,
        ticket=after,
        previous_status=before.status,
        occurred_at=now,
        actor=actor,
        worker_id=worker_id if worker_id is not None else after.worker_id or before.worker_id,
        details=dict(details or {}),
    )


def _check_version(ticket: Ticket, expected: int | None) -> None:
    if expected is not None and expected != ticket.version:
        raise Aborted(
            f"ticket {ticket.ticket_id} is at version {ticket.version}, not {expected}",
            details={"current_version": ticket.version, "expected_version": expected},
        )


def _terminal(ticket: Ticket, target: TicketStatus) -> FailedPrecondition:
    return FailedPrecondition(
        f"ticket {ticket.ticket_id} is {ticket.status.value}, a terminal status",
        details={"status": ticket.status.value, "requested": target.value},
    )


def _check_edge(ticket: Ticket, target: TicketStatus) -> None:
    if ticket.status.terminal:
        raise _terminal(ticket, target)
    if target not in LEGAL_TRANSITIONS[ticket.status]:
        raise FailedPrecondition(
            f"illegal transition {ticket.status.value} -> {target.value}",
            details={"status": ticket.status.value, "requested": target.value},
        )


def _requeue(ticket: Ticket, now: datetime, *, lost_run: bool = False) -> Ticket:
    return replace(
        ticket,
        status=S.PENDING,
        attempt=ticket.attempt + 1,
        lost_runs=ticket.lost_runs + (1 if lost_run else 0),
        worker_id="",
        lease_expires_at=None,
        started_at=None,
        version=ticket.version + 1,
        updated_at=now,
    )


def decide_assign(ticket: Ticket, request: Assignment, *, now: datetime, actor: str) -> Outcome:
    """PENDING -> ASSIGNED for the ticket's current attempt, with a lease."""
    if (
        ticket.status is S.ASSIGNED
        and ticket.worker_id == request.worker_id
        and ticket.attempt == request.attempt
    ):
        return Outcome(ticket=ticket)  # a retried assignment: same answer, no event
    if request.attempt != ticket.attempt:
        raise FailedPrecondition(
            f"attempt {request.attempt} is not the current attempt {ticket.attempt}",
            details={"current_attempt": ticket.attempt, "attempt": request.attempt},
        )
    _check_version(ticket, request.expected_version)
    if ticket.status in LEASED_STATUSES:
        # Not "illegal transition ASSIGNED -> ASSIGNED": say who holds it.
        raise FailedPrecondition(
            f"ticket {ticket.ticket_id} is already {ticket.status.value} on worker "
            f"{ticket.worker_id} (attempt {ticket.attempt})",
            details={"status": ticket.status.value, "worker_id": ticket.worker_id},
        )
    _check_edge(ticket, S.ASSIGNED)
    after = replace(
        ticket,
        status=S.ASSIGNED,
        worker_id=request.worker_id,
        lease_expires_at=now + timedelta(seconds=request.lease_seconds),
        version=ticket.version + 1,
        updated_at=now,
    )
    event = _event(EventType.ASSIGNED, before=ticket, after=after, now=now, actor=actor)
    return Outcome(ticket=after, changed=True, event=event)


def check_worker_capacity(request: Assignment, held: int) -> None:
    """An assignment that would take its worker past ``worker_capacity`` (``held``: its
    tickets ASSIGNED or RUNNING now, whoever assigned them) is RESOURCE_EXHAUSTED."""
    if request.worker_capacity and held >= request.worker_capacity:
        raise ResourceExhausted(
            f"worker {request.worker_id} holds {held} tickets, its capacity "
            f"{request.worker_capacity}: no free slot",
            details={"worker_id": request.worker_id, "held": held},
        )


def decide_update(ticket: Ticket, update: StatusUpdate, *, now: datetime, actor: str) -> Outcome:
    """Every other transition: start, complete, fail (maybe re-queue), cancel.

    ``update.attempt == 0`` is only valid for CANCELLED (validation enforces it) and means
    "whatever attempt is current": cancellation is an operator action, not a worker result.
    """
    digest = update_digest(update)
    if digest in (ticket.last_update_digest, ticket.requeue_digest):
        return Outcome(ticket=ticket)  # identical retry: same answer, no second event
    if update.attempt and update.attempt < ticket.attempt:
        # Fencing: a result from an attempt that was re-queued is never applied, only recorded.
        error = FailedPrecondition(
            f"attempt {update.attempt} is stale; the ticket is at attempt {ticket.attempt}",
            details={"current_attempt": ticket.attempt, "attempt": update.attempt},
        )
        return _late_result(ticket, update, now=now, actor=actor, error=error)
    if update.attempt > ticket.attempt:
        raise FailedPrecondition(
            f"attempt {update.attempt} does not exist; the ticket is at attempt {ticket.attempt}",
            details={"current_attempt": ticket.attempt, "attempt": update.attempt},
        )
    if ticket.status.terminal and update.status in (S.COMPLETED, S.FAILED):
        # The attempt already ended another way (timed out with no retry left, cancelled,
        # another report): its result comes too late, and is recorded as one that came
        # after a re-queue is (whatever expected_version says: the ticket can never take it).
        return _late_result(
            ticket, update, now=now, actor=actor, error=_terminal(ticket, update.status)
        )
    _check_version(ticket, update.expected_version)
    _check_edge(ticket, update.status)

    base = replace(ticket, version=ticket.version + 1, updated_at=now, last_update_digest=digest)
    kind = EventType.STATUS_CHANGED
    details: dict[str, object] = {}
    # The worker, not the task, ended this attempt: a re-queue that uses no retry.
    lost_run = update.worker_lost and ticket.lost_runs < MAX_LOST_RUNS
    if update.status is S.RUNNING:
        # From here the worker has the task's own timeout to finish.
        after = replace(
            base,
            status=S.RUNNING,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=ticket.spec.timeout_seconds),
        )
    elif update.status is S.COMPLETED:
        after = replace(
            base,
            status=S.COMPLETED,
            result=update.result,
            error_message="",
            completed_at=now,
            lease_expires_at=None,
        )
    elif update.status is S.FAILED and not update.permanent and (lost_run or ticket.retries_left):
        after = replace(
            _requeue(ticket, now, lost_run=lost_run),
            error_message=update.error_message,
            last_update_digest=digest,
            requeue_digest=digest,
        )
        kind = EventType.REQUEUED
        # The failed attempt's result is kept here (the ticket's result is only the final
        # attempt's), so the audit history shows what every attempt reported.
        details = {
            "failed_attempt": ticket.attempt,
            "error_message": update.error_message,
            "worker_lost": lost_run,
            "result": update.result,
        }
    elif update.status is S.FAILED:
        after = replace(
            base,
            status=S.FAILED,
            result=update.result,
            error_message=update.error_message,
            completed_at=now,
            lease_expires_at=None,
        )
        details = {"permanent": update.permanent}
    else:  # CANCELLED
        after = replace(
            base,
            status=S.CANCELLED,
            error_message=update.error_message,
            completed_at=now,
            lease_expires_at=None,
        )
    event = _event(kind, before=ticket, after=after, now=now, actor=actor, details=details)
    return Outcome(ticket=after, changed=True, event=event)


def _late_result(
    ticket: Ticket, update: StatusUpdate, *, now: datetime, actor: str, error: HiveError
) -> Outcome:
    """A report the ticket can no longer take: refused with ``error``, never applied, and
    recorded as a LATE_RESULT_REJECTED event with what it reported."""
    event = _event(
        EventType.LATE_RESULT_REJECTED,
        before=ticket,
        after=ticket,
        now=now,
        actor=actor,
        # Recorded once per reporter, attempt and reported status: the first such late
        # result. Sent again, or with another result or message, it is the same event,
        # so a holder of a stale ticket token cannot grow the log (up to a result's
        # size per report) for as long as its token lives.
        event_id=str(
            uuid.uuid5(
                _LATE_RESULTS,
                f"{ticket.ticket_id}:{actor}:{update.attempt}:{update.status.value}",
            )
        ),
        # Concerns the reporting worker, not whoever holds the ticket now.
        worker_id=actor.removeprefix("worker:") if actor.startswith("worker:") else "",
        details={
            "reported_status": update.status.value,
            "reported_attempt": update.attempt,
            "result": update.result,
            "error_message": update.error_message,
        },
    )
    return Outcome(ticket=ticket, event=event, error=error)


def decide_lease_expiry(ticket: Ticket, *, now: datetime) -> Outcome:
    """An ASSIGNED or RUNNING ticket whose lease passed: re-queue, or FAILED when out of retries."""
    if (
        ticket.status not in LEASED_STATUSES
        or ticket.lease_expires_at is None
        or ticket.lease_expires_at > now
    ):
        return Outcome(ticket=ticket)
    # An ASSIGNED lease that passed: the worker never started the task (lost, or gone).
    never_started = ticket.status is S.ASSIGNED
    message = (
        f"not started: worker {ticket.worker_id} did not start it within its assignment lease"
        if never_started
        else f"timed out: worker {ticket.worker_id} did not report within the task's timeout "
        f"({ticket.spec.timeout_seconds}s)"
    )
    lost_run = never_started and ticket.lost_runs < MAX_LOST_RUNS
    if lost_run or ticket.retries_left:
        after = replace(_requeue(ticket, now, lost_run=lost_run), error_message=message)
        details: dict[str, object] = {
            "expired_attempt": ticket.attempt,
            "requeued": True,
            "worker_lost": lost_run,
            "error_message": message,
        }
    else:
        after = replace(
            ticket,
            status=S.FAILED,
            error_message=message,
            completed_at=now,
            lease_expires_at=None,
            version=ticket.version + 1,
            updated_at=now,
        )
        details = {"expired_attempt": ticket.attempt, "requeued": False, "error_message": message}
    event = _event(
        EventType.LEASE_EXPIRED,
        before=ticket,
        after=after,
        now=now,
        actor=LEASE_SWEEPER_ACTOR,
        details=details,
    )
    return Outcome(ticket=after, changed=True, event=event)


def token_eligible(ticket: Ticket) -> bool:
    """Ticket tokens are only for an assigned (or running) ticket."""
    return ticket.status in LEASED_STATUSES and bool(ticket.worker_id)


def check_token_eligible(ticket: Ticket) -> None:
    """GenerateToken is only for an assigned (or running), non-terminal ticket."""
    if not token_eligible(ticket):
        raise FailedPrecondition(
            f"ticket {ticket.ticket_id} is {ticket.status.value}; tokens are only issued "
            "for an assigned ticket",
            details={"status": ticket.status.value},
        )
