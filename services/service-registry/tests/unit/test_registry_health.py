"""Health timeline and lifecycle transitions, with a manual clock."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from hive_common.errors import NotFound
from hive_testsupport.clock import ManualClock
from service_registry.domain import lifecycle
from service_registry.domain.models import (
    HealthPolicy,
    HeartbeatUpdate,
    RegistrationSpec,
    Worker,
    WorkerEventType,
    WorkerStatus,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MakeWorker = Callable[..., Worker]

SPEC = RegistrationSpec(
    name="w1",
    namespace="default",
    capabilities=("python",),
    labels={"zone": "a"},
    max_concurrent=4,
    version="1.0",
)


@pytest.mark.parametrize(
    ("age_seconds", "draining", "status", "expired"),
    [
        (0, False, WorkerStatus.HEALTHY, False),
        (14.9, False, WorkerStatus.HEALTHY, False),
        (15, False, WorkerStatus.HEALTHY, False),  # exactly N intervals is still on time
        (15.1, False, WorkerStatus.UNHEALTHY, False),
        (10, True, WorkerStatus.DRAINING, False),
        (20, True, WorkerStatus.UNHEALTHY, False),  # silent while draining: unhealthy
        (60, False, WorkerStatus.UNHEALTHY, False),
        (60.1, False, WorkerStatus.UNHEALTHY, True),
    ],
)
def test_status_follows_heartbeat_age(
    policy: HealthPolicy, age_seconds: float, draining: bool, status: WorkerStatus, expired: bool
) -> None:
    now = T0 + timedelta(seconds=age_seconds)
    assert policy.status_of(last_heartbeat_at=T0, draining=draining, now=now) is status
    assert policy.is_expired(T0, now) is expired


@pytest.mark.parametrize(
    ("interval", "missed", "expire_after"),
    [(0, 3, 60), (5, 0, 60), (5, 3, 15), (5, 3, 10)],
)
def test_inconsistent_policies_are_refused(interval: int, missed: int, expire_after: int) -> None:
    with pytest.raises(ValueError, match="must"):
        HealthPolicy(
            heartbeat_interval=timedelta(seconds=interval),
            missed_heartbeats=missed,
            expire_after=timedelta(seconds=expire_after),
        )


def test_timeline_register_unhealthy_recover_expire_reregister(policy: HealthPolicy) -> None:
    clock = ManualClock(T0)

    first = lifecycle.register(None, SPEC, now=clock.now(), policy=policy)
    assert [e.type for e in first.events] == [WorkerEventType.REGISTERED]
    worker = first.worker
    assert worker.status is WorkerStatus.HEALTHY

    clock.advance(16)
    assert policy.is_unhealthy(worker.last_heartbeat_at, clock.now())
    # The sweeper announced it; the next heartbeat is a recovery, published as UPDATED.
    worker = replace(worker, marked_unhealthy=True, status=WorkerStatus.UNHEALTHY)
    recovered = lifecycle.heartbeat(
        worker, HeartbeatUpdate(worker.worker_id, in_flight=1), now=clock.now(), policy=policy
    )
    assert recovered.worker.status is WorkerStatus.HEALTHY
    assert not recovered.worker.marked_unhealthy
    assert [e.type for e in recovered.events] == [WorkerEventType.UPDATED]

    clock.advance(61)
    with pytest.raises(NotFound):
        lifecycle.heartbeat(
            recovered.worker,
            HeartbeatUpdate(worker.worker_id, in_flight=0),
            now=clock.now(),
            policy=policy,
        )
    again = lifecycle.register(recovered.worker, SPEC, now=clock.now(), policy=policy)
    assert [e.type for e in again.events] == [
        WorkerEventType.EXPIRED,
        WorkerEventType.REGISTERED,
    ]
    assert again.events[0].worker.worker_id == worker.worker_id
    assert again.worker.worker_id != worker.worker_id


def test_register_again_is_idempotent_and_clears_draining(
    policy: HealthPolicy, make_worker: MakeWorker
) -> None:
    existing = make_worker("w1", draining=True, in_flight=3, success_rate=0.5)
    later = T0 + timedelta(seconds=3)
    spec = RegistrationSpec(
        name="w1",
        namespace="default",
        capabilities=("gpu", "python"),
        labels={},
        max_concurrent=8,
        version="2.0",
    )
    result = lifecycle.register(existing, spec, now=later, policy=policy)
    assert result.worker.worker_id == existing.worker_id
    assert result.worker.registered_at == existing.registered_at
    assert result.worker.capabilities == ("gpu", "python")
    assert result.worker.max_concurrent == 8
    assert not result.worker.draining
    assert result.worker.in_flight == 0
    assert result.worker.success_rate == 0.5  # the track record survives
    assert result.worker.last_heartbeat_at == later
    assert [e.type for e in result.events] == [WorkerEventType.UPDATED]


def test_heartbeat_unknown_worker_is_not_found(policy: HealthPolicy) -> None:
    with pytest.raises(NotFound):
        lifecycle.heartbeat(None, HeartbeatUpdate(uuid.uuid4(), in_flight=0), now=T0, policy=policy)


def test_draining_is_sticky_and_announced_once(
    policy: HealthPolicy, make_worker: MakeWorker
) -> None:
    worker = make_worker("w1")
    drained = lifecycle.heartbeat(
        worker,
        HeartbeatUpdate(worker.worker_id, in_flight=2, draining=True),
        now=T0 + timedelta(seconds=1),
        policy=policy,
    )
    assert drained.worker.status is WorkerStatus.DRAINING
    assert [e.type for e in drained.events] == [WorkerEventType.DRAINING]
    still = lifecycle.heartbeat(
        drained.worker,
        HeartbeatUpdate(worker.worker_id, in_flight=1, draining=False),
        now=T0 + timedelta(seconds=2),
        policy=policy,
    )
    assert still.worker.draining
    assert still.events == []


@pytest.mark.parametrize(
    ("before", "reported", "expected_total", "rate_moves"),
    [
        ((0, 0), (None, None), (0, 0), "same"),
        ((10, 0), (10, 0), (10, 0), "same"),
        ((10, 0), (10, 5), (10, 5), "down"),
        ((10, 5), (20, 5), (20, 5), "same_or_up"),
        ((10, 5), (2, 0), (2, 0), "same_or_up"),  # counters restarted: 2 new successes
        ((10, 5), (0, 3), (0, 3), "down"),
    ],
)
def test_heartbeat_counters_and_success_rate(
    policy: HealthPolicy,
    make_worker: MakeWorker,
    before: tuple[int, int],
    reported: tuple[int | None, int | None],
    expected_total: tuple[int, int],
    rate_moves: str,
) -> None:
    worker = replace(
        make_worker("w1", success_rate=0.9),
        succeeded_total=before[0],
        failed_total=before[1],
    )
    result = lifecycle.heartbeat(
        worker,
        HeartbeatUpdate(
            worker.worker_id, in_flight=0, succeeded_total=reported[0], failed_total=reported[1]
        ),
        now=T0 + timedelta(seconds=1),
        policy=policy,
    )
    assert (result.worker.succeeded_total, result.worker.failed_total) == expected_total
    rate = result.worker.success_rate
    assert 0.0 <= rate <= 1.0
    if rate_moves == "same":
        assert rate == 0.9
    elif rate_moves == "down":
        assert rate < 0.9
    else:
        assert rate >= 0.9
