"""The execution ticket and its events (DESIGN.md section 4)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JsonObject = dict[str, Any]


class TicketStatus(enum.StrEnum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TicketStatus.COMPLETED, TicketStatus.FAILED, TicketStatus.CANCELLED})
LEASED_STATUSES = frozenset({TicketStatus.ASSIGNED, TicketStatus.RUNNING})


class Priority(enum.StrEnum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class EventType(enum.StrEnum):
    CREATED = "CREATED"
    ASSIGNED = "ASSIGNED"
    STATUS_CHANGED = "STATUS_CHANGED"
    REQUEUED = "REQUEUED"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    LATE_RESULT_REJECTED = "LATE_RESULT_REJECTED"
    SNAPSHOT = "SNAPSHOT"


@dataclass(frozen=True, slots=True)
class TicketSpec:
    """What a creator supplies for one ticket, validated and with defaults resolved."""

    plan_id: str
    task_id: str
    task_type: str
    intent_id: str = ""
    description: str = ""
    parameters: JsonObject = field(default_factory=dict)
    required_capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    priority: Priority = Priority.NORMAL
    max_retries: int = 0
    timeout_seconds: int = 3600


# Fields of a spec that must match for a repeated create to be "the same ticket".
SPEC_CONTENT_FIELDS: tuple[str, ...] = (
    "intent_id",
    "task_type",
    "description",
    "parameters",
    "required_capabilities",
    "depends_on",
    "priority",
    "max_retries",
    "timeout_seconds",
)


@dataclass(frozen=True, slots=True)
class Ticket:
    ticket_id: str
    spec: TicketSpec
    status: TicketStatus
    attempt: int
    version: int
    created_at: datetime
    updated_at: datetime
    worker_id: str = ""
    lease_expires_at: datetime | None = None
    error_message: str = ""
    result: JsonObject | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    # Fingerprint of the last applied status update, so an identical retry is a no-op.
    last_update_digest: str = ""
    # ... and of the failure report that re-queued the ticket last: retried once the next
    # attempt has moved on (its first report replaced last_update_digest), it is still the
    # same report, not a late result of the attempt it ended.
    requeue_digest: str = ""
    # Attempts that ended with their worker (stopped or lost), not with the task.
    lost_runs: int = 0

    @property
    def plan_id(self) -> str:
        return self.spec.plan_id

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def retries_left(self) -> bool:
        """Attempts start at 1, so attempt ``max_retries + 1`` is the last one (not
        counting the lost runs: they did not use a retry)."""
        return self.attempt - self.lost_runs <= self.spec.max_retries


def ticket_document(ticket: Ticket) -> dict[str, Any]:
    """The ticket as a plain document (MongoDB audit, HTTP); datetimes stay datetimes."""
    spec = ticket.spec
    return {
        "ticket_id": ticket.ticket_id,
        "plan_id": spec.plan_id,
        "intent_id": spec.intent_id,
        "task_id": spec.task_id,
        "task_type": spec.task_type,
        "description": spec.description,
        "parameters": spec.parameters,
        "required_capabilities": list(spec.required_capabilities),
        "depends_on": list(spec.depends_on),
        "priority": spec.priority.value,
        "status": ticket.status.value,
        "attempt": ticket.attempt,
        "lost_runs": ticket.lost_runs,
        "max_retries": spec.max_retries,
        "timeout_seconds": spec.timeout_seconds,
        "worker_id": ticket.worker_id,
        "lease_expires_at": ticket.lease_expires_at,
        "error_message": ticket.error_message,
        "result": ticket.result,
        "version": ticket.version,
        "created_at": ticket.created_at,
        "updated_at": ticket.updated_at,
        "started_at": ticket.started_at,
        "completed_at": ticket.completed_at,
    }


@dataclass(frozen=True, slots=True)
class TicketEvent:
    """One change of one ticket; also the outbox row relayed to the audit trail."""

    event_id: str
    type: EventType
    ticket: Ticket
    previous_status: TicketStatus | None
    occurred_at: datetime
    actor: str
    # The worker the event concerns (the one that lost the ticket on a re-queue).
    worker_id: str = ""
    details: JsonObject = field(default_factory=dict)
    # Opaque resume position; empty until the event has been stored.
    cursor: str = ""

    @property
    def status_changed(self) -> bool:
        return self.previous_status is not None and self.previous_status != self.ticket.status


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A validated UpdateTicketStatus request."""

    ticket_id: str
    status: TicketStatus
    attempt: int
    expected_version: int | None = None
    result: JsonObject | None = None
    error_message: str = ""
    permanent: bool = False
    worker_lost: bool = False


@dataclass(frozen=True, slots=True)
class Assignment:
    """A validated AssignTicket request."""

    ticket_id: str
    worker_id: str
    lease_seconds: int
    attempt: int
    expected_version: int | None = None
    # The worker's max_concurrent: refused when it holds this many ASSIGNED or RUNNING
    # tickets already (0: not checked).
    worker_capacity: int = 0


@dataclass(frozen=True, slots=True)
class TicketFilter:
    """ListTickets / WatchTickets filters; empty means "any"."""

    plan_id: str = ""
    statuses: frozenset[TicketStatus] = frozenset()
    worker_id: str = ""


# How many events of each (type, previous status, new status) a write produced.
TransitionCounts = Mapping[tuple[EventType, TicketStatus | None, TicketStatus], int]
