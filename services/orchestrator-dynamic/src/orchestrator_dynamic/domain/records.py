"""What the orchestrator stores about a plan, and the lease that lets one replica drive it.

Ownership is a lease on the plan row (``owner_id``, ``owner_epoch``,
``owner_lease_expires_at``) rather than a PostgreSQL advisory lock: a lease works with a
connection pool (an advisory lock would pin one connection per driven plan), survives
connection loss without silently vanishing, is visible to operators, and its epoch fences
writes: every claim increments the epoch, and a write made with an older epoch is refused,
so a replica that stalled past its lease can never overwrite the new owner's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from hive_common.errors import FailedPrecondition
from orchestrator_dynamic.domain.plan import Plan, Priority
from orchestrator_dynamic.domain.scheduler import PlanStatus, TicketState


class PlanOwnershipLost(FailedPrecondition):
    """The caller's lease on a plan is no longer the current one: stop driving the plan."""


@dataclass(frozen=True, slots=True)
class PlanLease:
    """Proof that ``owner_id`` drives ``plan_id``; ``epoch`` fences its writes."""

    plan_id: str
    owner_id: str
    epoch: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class PlanSummary:
    plan_id: str
    intent_id: str
    name: str
    priority: Priority
    task_count: int
    status: PlanStatus
    error_message: str | None
    # Ticket count per status name, every status present.
    counts: Mapping[str, int]
    created_at: datetime
    updated_at: datetime
    # When the status became terminal.
    completed_at: datetime | None
    # When every ticket was terminal: nothing left to drive.
    settled_at: datetime | None
    cancel_requested_at: datetime | None
    # The plan row's lease as stored (see ``lease_holder`` for what it means).
    owner_id: str | None
    owner_lease_expires_at: datetime | None

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    @property
    def lease_holder(self) -> tuple[str, datetime] | None:
        """The replica the plan's lease names and when the lease ends (in the past: that
        replica has not renewed it, and any replica may claim the plan), or None when no
        replica holds it: not claimed yet, released at shutdown, or settled (the lease
        is released then, and one a failed release left behind means nothing: a settled
        plan is never claimed again)."""
        if self.settled or self.owner_id is None or self.owner_lease_expires_at is None:
            return None
        return self.owner_id, self.owner_lease_expires_at


@dataclass(frozen=True, slots=True)
class StoredPlan:
    summary: PlanSummary
    plan: Plan
    body_hash: str
    # In plan order; ``ticket_id`` is None until the ticket was created.
    tasks: tuple[TicketState, ...]

    @property
    def plan_id(self) -> str:
        return self.summary.plan_id

    def ticket_states(self) -> dict[str, TicketState]:
        return {state.task_id: state for state in self.tasks}


@dataclass(frozen=True, slots=True)
class PlanPage:
    plans: tuple[PlanSummary, ...]
    # None on the last page.
    next_page_token: str | None
