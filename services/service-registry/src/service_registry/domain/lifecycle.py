"""Pure state transitions of a worker: registration and heartbeat.

Storage locks the row, calls these, and writes back the result and the events, so the
rules live here and are unit-tested without a database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from hive_common.errors import WORKER_NAME_IN_USE, AlreadyExists, NotFound
from hive_common.namespaces import DEFAULT_NAMESPACE
from service_registry.domain.models import (
    HealthPolicy,
    HeartbeatUpdate,
    RegistrationSpec,
    Worker,
    WorkerEvent,
    WorkerEventType,
    WorkerStatus,
)

SUCCESS_RATE_ALPHA = 0.1
"""Weight of one task outcome in the success-rate moving average (about the last 20 count)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """The worker after a change and the events to publish, in order."""

    worker: Worker
    events: list[WorkerEvent]
    previous: Worker | None = None


class WorkerNameInUse(AlreadyExists):
    """Another live process (another ``instance_id``) holds this (namespace, name)."""


class WorkerExpired(NotFound):
    """The worker was found past its TTL and expired by this very call (EXPIRED published):
    for the caller a worker that is gone, like any other NOT_FOUND."""


def _event(kind: WorkerEventType, worker: Worker, now: datetime) -> WorkerEvent:
    return WorkerEvent(event_id=uuid.uuid4(), type=kind, worker=worker, occurred_at=now)


def register(
    existing: Worker | None,
    spec: RegistrationSpec,
    *,
    now: datetime,
    policy: HealthPolicy,
    new_worker_id: uuid.UUID | None = None,
) -> Transition:
    """Register ``spec``; idempotent on (namespace, name) while the worker is not expired.

    Registering again keeps the worker_id and the track record, refreshes the attributes,
    clears draining (the only way to undo it) and counts as a heartbeat. An expired
    worker that was not swept yet is expired now and registered afresh with a new id, so
    watchers always see EXPIRED for the old identity.

    :class:`WorkerNameInUse` when another instance holds the name and is live (heartbeat
    within the unhealthy window): two processes sharing one worker_id would both run
    every assignment. A holder silent for longer (crashed, or only paused) is taken over
    under a new worker id, its own ending with EXPIRED (its tickets are handed back): a
    paused process that wakes up must not find its id alive, or it would run the new
    process's assignments too. A ``spec`` without an instance (older clients) is refused
    only by a live holder that named one: else leaving the field out would hand anyone
    with the registration secret a running worker's identity, token and assignments.
    """
    events: list[WorkerEvent] = []
    if existing is not None and (
        policy.is_expired(existing.last_heartbeat_at, now)
        or _taken_over(existing, spec, now=now, policy=policy)
    ):
        events.append(_event(WorkerEventType.EXPIRED, expired_view(existing, policy, now), now))
        existing = None
    if existing is None:
        worker = Worker(
            worker_id=new_worker_id or uuid.uuid4(),
            name=spec.name,
            namespace=spec.namespace,
            capabilities=spec.capabilities,
            labels=dict(spec.labels),
            max_concurrent=spec.max_concurrent,
            in_flight=0,
            version=spec.version,
            status=WorkerStatus.HEALTHY,
            draining=False,
            marked_unhealthy=False,
            registered_at=now,
            last_heartbeat_at=now,
            instance_id=spec.instance_id,
        )
        events.append(_event(WorkerEventType.REGISTERED, worker, now))
        return Transition(worker=worker, events=events)
    worker = replace(
        existing,
        capabilities=spec.capabilities,
        labels=dict(spec.labels),
        max_concurrent=spec.max_concurrent,
        # A re-registering process is normally fresh; its next heartbeat corrects this.
        in_flight=0,
        version=spec.version,
        status=WorkerStatus.HEALTHY,
        draining=False,
        marked_unhealthy=False,
        last_heartbeat_at=now,
        instance_id=spec.instance_id,
    )
    events.append(_event(WorkerEventType.UPDATED, worker, now))
    return Transition(worker=worker, events=events, previous=existing)


def _taken_over(
    existing: Worker, spec: RegistrationSpec, *, now: datetime, policy: HealthPolicy
) -> bool:
    """Whether ``spec`` is another instance taking the name over from a silent holder;
    :class:`WorkerNameInUse` while that holder is live."""
    if existing.instance_id == spec.instance_id:
        return False  # the same process again (or, both empty, a client older than instances)
    if policy.is_unhealthy(existing.last_heartbeat_at, now):
        return True  # silent past the unhealthy window: crashed (or paused)
    age = max(0.0, (now - existing.last_heartbeat_at).total_seconds())
    window = policy.unhealthy_after.total_seconds()
    where = "" if spec.namespace == DEFAULT_NAMESPACE else f" in namespace '{spec.namespace}'"
    raise WorkerNameInUse(
        f"worker name '{spec.name}'{where} is held by a running instance (last heartbeat "
        f"{age:.1f} s ago): give this worker another name (--name), or stop the other one "
        f"(the name of a worker that stopped heartbeating is free {window:g} s after its "
        "last heartbeat)",
        details={
            "reason": WORKER_NAME_IN_USE,
            "name": spec.name,
            "namespace": spec.namespace,
            "last_heartbeat_age_seconds": round(age, 3),
            # When the holder's registration lapses if it sends no further heartbeat.
            "retry_after_seconds": round(max(0.0, window - age), 3),
            "unhealthy_after_seconds": window,
        },
    )


def expired_view(worker: Worker, policy: HealthPolicy, now: datetime) -> Worker:
    """The worker as published in its EXPIRED event (status as of ``now``)."""
    return replace(
        worker,
        status=policy.status_of(
            last_heartbeat_at=worker.last_heartbeat_at, draining=worker.draining, now=now
        ),
    )


def _updated_success_rate(
    rate: float, succeeded_delta: int, failed_delta: int, alpha: float = SUCCESS_RATE_ALPHA
) -> float:
    outcomes = succeeded_delta + failed_delta
    if outcomes <= 0:
        return rate
    # Same as applying the per-outcome average ``outcomes`` times with the batch's mean.
    keep = (1.0 - alpha) ** outcomes
    return keep * rate + (1.0 - keep) * (succeeded_delta / outcomes)


def _delta(previous: int, reported: int | None) -> tuple[int, int]:
    """(new total, delta); a total lower than before means the worker restarted counting."""
    if reported is None:
        return previous, 0
    if reported < previous:
        return reported, reported
    return reported, reported - previous


def heartbeat(
    existing: Worker | None,
    update: HeartbeatUpdate,
    *,
    now: datetime,
    policy: HealthPolicy,
) -> Transition:
    """Apply a heartbeat. NOT_FOUND for an unknown or expired worker (it must register again).

    Storage removes an expired worker and publishes EXPIRED before passing this error on.
    """
    if existing is None or policy.is_expired(existing.last_heartbeat_at, now):
        raise NotFound(
            "worker is not registered (unknown or expired); register again",
            details={"worker_id": str(update.worker_id)},
        )
    succeeded, succeeded_delta = _delta(existing.succeeded_total, update.succeeded_total)
    failed, failed_delta = _delta(existing.failed_total, update.failed_total)
    draining = existing.draining or update.draining  # draining cannot be cleared
    worker = replace(
        existing,
        in_flight=update.in_flight,
        succeeded_total=succeeded,
        failed_total=failed,
        success_rate=_updated_success_rate(existing.success_rate, succeeded_delta, failed_delta),
        draining=draining,
        marked_unhealthy=False,
        last_heartbeat_at=now,
        status=policy.status_of(last_heartbeat_at=now, draining=draining, now=now),
    )
    events: list[WorkerEvent] = []
    if existing.marked_unhealthy:
        # Recovery: watchers saw UNHEALTHY, so they must see the worker back.
        events.append(_event(WorkerEventType.UPDATED, worker, now))
    if draining and not existing.draining:
        events.append(_event(WorkerEventType.DRAINING, worker, now))
    return Transition(worker=worker, events=events, previous=existing)


def event(kind: WorkerEventType, worker: Worker, now: datetime) -> WorkerEvent:
    """A new event about ``worker`` (deregistration, sweeper transitions)."""
    return _event(kind, worker, now)
