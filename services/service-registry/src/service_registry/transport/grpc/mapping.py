"""Protobuf <-> domain conversions of the registry."""

from __future__ import annotations

from hive_common.errors import FieldViolation
from hive_common.timestamps import datetime_to_timestamp
from neuralhive.registry.v1 import registry_service_pb2 as pb
from service_registry.domain.models import Worker, WorkerEvent, WorkerEventType, WorkerStatus
from service_registry.domain.ranking import RankedWorker

STATUS_TO_PB: dict[WorkerStatus, pb.WorkerStatus.ValueType] = {
    WorkerStatus.HEALTHY: pb.WORKER_STATUS_HEALTHY,
    WorkerStatus.UNHEALTHY: pb.WORKER_STATUS_UNHEALTHY,
    WorkerStatus.DRAINING: pb.WORKER_STATUS_DRAINING,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}

EVENT_TO_PB: dict[WorkerEventType, pb.WorkerEventType.ValueType] = {
    WorkerEventType.REGISTERED: pb.WORKER_EVENT_TYPE_REGISTERED,
    WorkerEventType.UPDATED: pb.WORKER_EVENT_TYPE_UPDATED,
    WorkerEventType.UNHEALTHY: pb.WORKER_EVENT_TYPE_UNHEALTHY,
    WorkerEventType.DRAINING: pb.WORKER_EVENT_TYPE_DRAINING,
    WorkerEventType.DEREGISTERED: pb.WORKER_EVENT_TYPE_DEREGISTERED,
    WorkerEventType.EXPIRED: pb.WORKER_EVENT_TYPE_EXPIRED,
}


def worker_to_pb(worker: Worker) -> pb.Worker:
    return pb.Worker(
        worker_id=str(worker.worker_id),
        name=worker.name,
        namespace=worker.namespace,
        capabilities=list(worker.capabilities),
        labels=dict(worker.labels),
        max_concurrent=worker.max_concurrent,
        in_flight=worker.in_flight,
        version=worker.version,
        status=STATUS_TO_PB[worker.status],
        registered_at=datetime_to_timestamp(worker.registered_at),
        last_heartbeat_at=datetime_to_timestamp(worker.last_heartbeat_at),
        succeeded_total=worker.succeeded_total,
        failed_total=worker.failed_total,
    )


def ranked_to_pb(ranked: RankedWorker) -> pb.RankedWorker:
    return pb.RankedWorker(
        worker=worker_to_pb(ranked.worker),
        score=ranked.score,
        spare_capacity=ranked.spare_capacity,
    )


def event_to_pb(event: WorkerEvent) -> pb.WorkerEvent:
    return pb.WorkerEvent(
        event_id=str(event.event_id),
        type=EVENT_TO_PB[event.type],
        worker=worker_to_pb(event.worker),
        occurred_at=datetime_to_timestamp(event.occurred_at),
    )


def statuses_from_pb(values: list[int]) -> tuple[list[WorkerStatus], list[FieldViolation]]:
    """The statuses, and a violation for each value that is not one."""
    statuses: list[WorkerStatus] = []
    violations: list[FieldViolation] = []
    for i, value in enumerate(values):
        status = STATUS_FROM_PB.get(value)  # type: ignore[call-overload]
        if status is None:
            violations.append(
                FieldViolation(f"statuses[{i}]", "must be HEALTHY, UNHEALTHY or DRAINING")
            )
        else:
            statuses.append(status)
    return statuses, violations
