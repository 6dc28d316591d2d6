"""Mapping between the ticket service's and registry's protobuf messages and the domain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from hive_common.clients import to_struct
from neuralhive.registry.v1 import registry_service_pb2 as registry_pb
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.domain.plan import Plan, Priority, TaskSpec
from orchestrator_dynamic.domain.scheduler import (
    FreedSlot,
    TicketState,
    TicketStatus,
    WorkerCandidate,
    WorkerHealth,
    WorkerView,
    freed_since_heartbeat,
)

_STATUS_FROM_PROTO: dict[int, TicketStatus] = {
    ticket_pb.TICKET_STATUS_PENDING: TicketStatus.PENDING,
    ticket_pb.TICKET_STATUS_ASSIGNED: TicketStatus.ASSIGNED,
    ticket_pb.TICKET_STATUS_RUNNING: TicketStatus.RUNNING,
    ticket_pb.TICKET_STATUS_COMPLETED: TicketStatus.COMPLETED,
    ticket_pb.TICKET_STATUS_FAILED: TicketStatus.FAILED,
    ticket_pb.TICKET_STATUS_CANCELLED: TicketStatus.CANCELLED,
}

_PRIORITY_TO_PROTO: dict[Priority, ticket_pb.Priority.ValueType] = {
    Priority.LOW: ticket_pb.PRIORITY_LOW,
    Priority.NORMAL: ticket_pb.PRIORITY_NORMAL,
    Priority.HIGH: ticket_pb.PRIORITY_HIGH,
    Priority.CRITICAL: ticket_pb.PRIORITY_CRITICAL,
}

_HEALTH_FROM_PROTO: dict[int, WorkerHealth] = {
    registry_pb.WORKER_STATUS_HEALTHY: WorkerHealth.HEALTHY,
    registry_pb.WORKER_STATUS_UNHEALTHY: WorkerHealth.UNHEALTHY,
    registry_pb.WORKER_STATUS_DRAINING: WorkerHealth.DRAINING,
}


def timestamp(
    message: ticket_pb.ExecutionTicket | registry_pb.Worker, field: str
) -> datetime | None:
    """A timestamp field of a ticket or worker as an aware datetime, None when unset."""
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    return value.ToDatetime(tzinfo=UTC)


def ticket_state(task_id: str, ticket: ticket_pb.ExecutionTicket) -> TicketState:
    """What the orchestrator keeps of a ticket (keyed by the plan's task id)."""
    return TicketState(
        task_id=task_id,
        ticket_id=ticket.ticket_id or None,
        status=_STATUS_FROM_PROTO.get(ticket.status, TicketStatus.PENDING),
        attempt=max(1, ticket.attempt),
        lost_runs=ticket.lost_runs,
        worker_id=ticket.worker_id or None,
        error_message=ticket.error_message or None,
        lease_expires_at=timestamp(ticket, "lease_expires_at"),
        version=ticket.version,
        updated_at=timestamp(ticket, "updated_at"),
    )


def ticket_spec(plan: Plan, task: TaskSpec) -> ticket_pb.TicketSpec:
    """The TicketSpec of one task (C2); ``plan.plan_id`` must be set."""
    assert plan.plan_id is not None
    return ticket_pb.TicketSpec(
        plan_id=plan.plan_id,
        intent_id=plan.intent_id,
        task_id=task.task_id,
        task_type=task.task_type,
        description=task.description,
        parameters=to_struct(task.parameters),
        required_capabilities=list(task.required_capabilities),
        depends_on=list(task.depends_on),
        priority=_PRIORITY_TO_PROTO[plan.priority],
        max_retries=task.max_retries,
        timeout_seconds=task.timeout_seconds or 0,
    )


def worker_candidate(
    ranked: registry_pb.RankedWorker, known_active: int, freed: Sequence[FreedSlot] = ()
) -> WorkerCandidate:
    """A DiscoverWorkers result. Its spare capacity is the registry's (as of the worker's
    last heartbeat) plus the slots this orchestrator saw freed since that heartbeat, and
    at most what the tickets this orchestrator knows to be assigned to or running on the
    worker leave (the registry only learns of them at the worker's next heartbeat).
    ``freed``: sorted by ``freed_at``."""
    worker = ranked.worker
    heartbeat_at = timestamp(worker, "last_heartbeat_at")
    by_registry = ranked.spare_capacity + freed_since_heartbeat(freed, heartbeat_at)
    return WorkerCandidate(
        worker_id=worker.worker_id,
        spare_capacity=min(by_registry, worker.max_concurrent - known_active),
        score=ranked.score,
    )


def worker_view(worker: registry_pb.Worker) -> WorkerView:
    return WorkerView(
        worker_id=worker.worker_id,
        capabilities=frozenset(worker.capabilities),
        status=_HEALTH_FROM_PROTO.get(worker.status, WorkerHealth.UNHEALTHY),
        spare_capacity=worker.max_concurrent - worker.in_flight,
        last_heartbeat_at=(
            worker.last_heartbeat_at.ToDatetime(tzinfo=UTC)
            if worker.HasField("last_heartbeat_at")
            else None
        ),
    )
