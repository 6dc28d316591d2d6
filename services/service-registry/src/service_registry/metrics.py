"""The registry's own Prometheus metrics (on the per-service registry from app.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hive_common.metrics import LATENCY_BUCKETS
from service_registry.domain.models import WorkerEventType, WorkerStatus


class RegistryMetrics:
    """Workers by status, heartbeats, discovery latency, sweeper transitions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge(
            "hive_registry_workers",
            "Registered (not expired) workers by status, as of the last sweep.",
            ("status",),
            registry=registry,
        )
        self.heartbeats = Counter(
            "hive_registry_heartbeats_total",
            "Heartbeats past the token check, by outcome (ok, not_found, refused: invalid or "
            "for another worker); those refused for their token are in grpc_server_handled_total "
            "(UNAUTHENTICATED, PERMISSION_DENIED).",
            ("outcome",),
            registry=registry,
        )
        self.registrations = Counter(
            "hive_registry_registrations_total",
            "Register calls, by result (new, again, name_in_use).",
            ("result",),
            registry=registry,
        )
        self.discovery_seconds = Histogram(
            "hive_registry_discovery_seconds",
            "DiscoverWorkers latency (validation, query and ranking).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.discovery_results = Histogram(
            "hive_registry_discovery_results",
            "Workers returned per DiscoverWorkers call.",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100),
            registry=registry,
        )
        self.events = Counter(
            "hive_registry_worker_events_total",
            "Worker events published, by type.",
            ("type",),
            registry=registry,
        )
        self.mass_transitions = Counter(
            "hive_registry_mass_transitions_total",
            "Sweeps that turned at least the alarm threshold of workers UNHEALTHY or EXPIRED.",
            ("transition",),
            registry=registry,
        )
        for status in WorkerStatus:
            self.workers.labels(status.value)
        for kind in WorkerEventType:
            self.events.labels(kind.value)
        for transition in ("unhealthy", "expired"):
            self.mass_transitions.labels(transition)

    def set_worker_counts(self, counts: dict[WorkerStatus, int]) -> None:
        for status, count in counts.items():
            self.workers.labels(status.value).set(count)

    def count_events(self, kinds: list[WorkerEventType]) -> None:
        for kind in kinds:
            self.events.labels(kind.value).inc()
