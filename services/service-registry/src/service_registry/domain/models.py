"""Workers, their health and the events the registry publishes about them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

_NEVER = datetime.min.replace(tzinfo=UTC)


class WorkerStatus(StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


class WorkerEventType(StrEnum):
    REGISTERED = "REGISTERED"
    UPDATED = "UPDATED"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DEREGISTERED = "DEREGISTERED"
    EXPIRED = "EXPIRED"


def tiebreak_of(worker_id: uuid.UUID) -> int:
    """A stable signed 64-bit number per worker, used to break ranking ties (see ranking)."""
    return int.from_bytes(worker_id.bytes[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """HEALTHY -> UNHEALTHY after ``missed_heartbeats`` intervals -> EXPIRED after ``expire_after``.

    Health is a function of the last heartbeat and the clock, so every replica computes
    the same status at read time; the sweeper only announces transitions and removes
    expired rows.
    """

    heartbeat_interval: timedelta = timedelta(seconds=5)
    missed_heartbeats: int = 3
    expire_after: timedelta = timedelta(seconds=60)
    # Since when the registry could hear heartbeats (it started, or its database answered
    # again after an outage); None: always. Silence before that is the registry's, not
    # the workers': nobody expires until ``expire_after`` has passed since then.
    heard_since: datetime | None = None

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= timedelta(0):
            raise ValueError("heartbeat_interval must be positive")
        if self.missed_heartbeats < 1:
            raise ValueError("missed_heartbeats must be at least 1")
        if self.expire_after <= self.unhealthy_after:
            raise ValueError("expire_after must be longer than the unhealthy threshold")

    @property
    def unhealthy_after(self) -> timedelta:
        return self.heartbeat_interval * self.missed_heartbeats

    def unhealthy_cutoff(self, now: datetime) -> datetime:
        """A worker whose last heartbeat is older than this is UNHEALTHY."""
        return now - self.unhealthy_after

    def expiry_cutoff(self, now: datetime) -> datetime:
        """A worker whose last heartbeat is older than this is EXPIRED."""
        cutoff = now - self.expire_after
        if self.heard_since is not None and self.heard_since > cutoff:
            return _NEVER
        return cutoff

    def is_unhealthy(self, last_heartbeat_at: datetime, now: datetime) -> bool:
        return last_heartbeat_at < self.unhealthy_cutoff(now)

    def is_expired(self, last_heartbeat_at: datetime, now: datetime) -> bool:
        return last_heartbeat_at < self.expiry_cutoff(now)

    def status_of(
        self, *, last_heartbeat_at: datetime, draining: bool, now: datetime
    ) -> WorkerStatus:
        # A silent worker is UNHEALTHY even while draining: callers need to know it is gone.
        if self.is_unhealthy(last_heartbeat_at, now):
            return WorkerStatus.UNHEALTHY
        return WorkerStatus.DRAINING if draining else WorkerStatus.HEALTHY


@dataclass(frozen=True, slots=True)
class Worker:
    worker_id: uuid.UUID
    name: str
    namespace: str
    capabilities: tuple[str, ...]
    labels: Mapping[str, str]
    max_concurrent: int
    in_flight: int
    version: str
    status: WorkerStatus
    draining: bool
    # True once the UNHEALTHY transition was announced; a heartbeat clears it (recovery).
    marked_unhealthy: bool
    registered_at: datetime
    last_heartbeat_at: datetime
    succeeded_total: int = 0
    failed_total: int = 0
    # Exponentially weighted share of recent successes, 1.0 for a worker with no history.
    success_rate: float = 1.0
    # The process that registered last (RegisterRequest.instance_id); "" when it sent none.
    instance_id: str = ""

    @property
    def spare_capacity(self) -> int:
        return max(0, self.max_concurrent - self.in_flight)

    @property
    def tiebreak(self) -> int:
        return tiebreak_of(self.worker_id)


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    event_id: uuid.UUID
    type: WorkerEventType
    worker: Worker
    occurred_at: datetime
    # Position in the registry-wide event log; 0 until stored.
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class RegistrationSpec:
    name: str
    namespace: str
    capabilities: tuple[str, ...]
    labels: Mapping[str, str]
    max_concurrent: int
    version: str
    # Random per worker process; "" (a client that predates it) skips the duplicate check.
    instance_id: str = ""


@dataclass(frozen=True, slots=True)
class HeartbeatUpdate:
    worker_id: uuid.UUID
    in_flight: int
    succeeded_total: int | None = None
    failed_total: int | None = None
    draining: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryQuery:
    required_capabilities: tuple[str, ...]
    label_selector: Mapping[str, str]
    namespace: str
    max_results: int
    # Also workers with no spare slot at their last heartbeat (same score, which full lowers).
    include_full: bool = False


@dataclass(frozen=True, slots=True)
class ListCursor:
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class ListQuery:
    namespace: str | None
    statuses: frozenset[WorkerStatus]
    capability: str | None
    page_size: int
    after: ListCursor | None = None
    label_selector: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerPage:
    workers: list[Worker]
    next_cursor: ListCursor | None
