"""The service's own Prometheus metrics (RPC metrics come from hive_common)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from execution_ticket_service.domain.models import EventType, TicketStatus, TransitionCounts


class TicketMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tickets_by_status = Gauge(
            "hive_tickets",
            "Unfinished tickets by status: PENDING, ASSIGNED, RUNNING (refreshed"
            " periodically; finished ones: hive_ticket_transitions_total).",
            ("status",),
            registry=registry,
        )
        self.transitions = Counter(
            "hive_ticket_transitions_total",
            "Ticket events written, by type and status edge.",
            ("event_type", "from_status", "to_status"),
            registry=registry,
        )
        self.lease_expiries = Counter(
            "hive_ticket_lease_expiries_total",
            "Leases that expired, by outcome (requeued or failed).",
            ("outcome",),
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "hive_ticket_outbox_pending",
            "Events not yet relayed to the MongoDB audit trail.",
            registry=registry,
        )
        self.outbox_lag_seconds = Gauge(
            "hive_ticket_outbox_lag_seconds",
            "Age of the oldest event not yet relayed to MongoDB (0 when none).",
            registry=registry,
        )
        self.relayed = Counter(
            "hive_ticket_outbox_relayed_total",
            "Events delivered to the MongoDB audit trail.",
            registry=registry,
        )
        self.relay_failures = Counter(
            "hive_ticket_outbox_relay_failures_total",
            "Failed relay rounds (MongoDB or PostgreSQL unavailable).",
            registry=registry,
        )

    def record_transitions(self, counts: TransitionCounts) -> None:
        for (kind, before, after), n in counts.items():
            self.transitions.labels(kind.value, before.value if before else "", after.value).inc(n)
            if kind is EventType.LEASE_EXPIRED:
                outcome = "requeued" if after is TicketStatus.PENDING else "failed"
                self.lease_expiries.labels(outcome).inc(n)

    def set_status_counts(self, counts: Mapping[TicketStatus, int]) -> None:
        for status, n in counts.items():
            self.tickets_by_status.labels(status.value).set(n)

    def set_backlog(self, pending: int, oldest: datetime | None, now: datetime) -> None:
        self.outbox_pending.set(pending)
        self.outbox_lag_seconds.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
