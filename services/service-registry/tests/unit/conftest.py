"""Builders shared by the registry unit tests (fixtures: import mode is importlib)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from service_registry.domain.models import HealthPolicy, Worker, WorkerStatus

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def policy() -> HealthPolicy:
    return HealthPolicy(
        heartbeat_interval=timedelta(seconds=5),
        missed_heartbeats=3,
        expire_after=timedelta(seconds=60),
    )


def _make_worker(
    name: str = "w1",
    *,
    worker_id: uuid.UUID | None = None,
    namespace: str = "default",
    capabilities: tuple[str, ...] = ("python",),
    labels: dict[str, str] | None = None,
    max_concurrent: int = 4,
    in_flight: int = 0,
    draining: bool = False,
    last_heartbeat_at: datetime = T0,
    success_rate: float = 1.0,
) -> Worker:
    return Worker(
        worker_id=worker_id or uuid.uuid5(uuid.NAMESPACE_DNS, name),
        name=name,
        namespace=namespace,
        capabilities=capabilities,
        labels=labels or {},
        max_concurrent=max_concurrent,
        in_flight=in_flight,
        version="1.0",
        status=WorkerStatus.DRAINING if draining else WorkerStatus.HEALTHY,
        draining=draining,
        marked_unhealthy=False,
        registered_at=T0,
        last_heartbeat_at=last_heartbeat_at,
        success_rate=success_rate,
    )


WorkerFactory = Callable[..., Worker]


@pytest.fixture
def make_worker() -> WorkerFactory:
    return _make_worker


@pytest.fixture
def t0() -> datetime:
    return T0
