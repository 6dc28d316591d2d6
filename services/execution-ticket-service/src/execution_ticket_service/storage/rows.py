"""Mapping between ticket rows (or their to_jsonb form) and domain objects."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from execution_ticket_service.domain.models import (
    Priority,
    Ticket,
    TicketSpec,
    TicketStatus,
)


def _ts(value: Any) -> datetime | None:
    """A timestamp from a psycopg row (datetime) or from to_jsonb (ISO string)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _required_ts(value: Any) -> datetime:
    ts = _ts(value)
    if ts is None:
        raise ValueError("missing timestamp")
    return ts


def ticket_from_row(row: Mapping[str, Any]) -> Ticket:
    """Works for ``SELECT * FROM tickets`` rows and for ``to_jsonb(tickets)`` payloads."""
    ticket_id = row["ticket_id"]
    return Ticket(
        ticket_id=str(ticket_id) if isinstance(ticket_id, uuid.UUID) else ticket_id,
        spec=TicketSpec(
            plan_id=row["plan_id"],
            task_id=row["task_id"],
            task_type=row["task_type"],
            intent_id=row["intent_id"],
            description=row["description"],
            parameters=dict(row["parameters"]),
            required_capabilities=tuple(row["required_capabilities"]),
            depends_on=tuple(row["depends_on"]),
            priority=Priority(row["priority"]),
            max_retries=row["max_retries"],
            timeout_seconds=row["timeout_seconds"],
        ),
        status=TicketStatus(row["status"]),
        attempt=row["attempt"],
        version=row["version"],
        created_at=_required_ts(row["created_at"]),
        updated_at=_required_ts(row["updated_at"]),
        worker_id=row["worker_id"] or "",
        lease_expires_at=_ts(row["lease_expires_at"]),
        error_message=row["error_message"],
        result=row["result"],
        started_at=_ts(row["started_at"]),
        completed_at=_ts(row["completed_at"]),
        last_update_digest=row["last_update_digest"],
        # Absent from the outbox payloads of events written before migration 0006.
        requeue_digest=row.get("requeue_digest", ""),
        # Absent from the outbox payloads of events written before migration 0003.
        lost_runs=row.get("lost_runs", 0),
    )
