"""The orchestrator's own Prometheus metrics (HTTP and RPC metrics come from hive_common)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a few seconds (small plans) to a day (large or long-running ones).
_PLAN_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.plans_driven = Gauge(
            "hive_orchestrator_plans_driven",
            "Plans this replica owns and drives.",
            registry=registry,
        )
        self.tickets_waiting_for_workers = Gauge(
            "hive_orchestrator_tickets_waiting_for_workers",
            "Ready tickets of the driven plans that found no worker with the capabilities "
            "and spare capacity in their plan's last dispatch round.",
            registry=registry,
        )
        self.assignments = Counter(
            "hive_orchestrator_assignments_total",
            "Ticket assignments by outcome (assigned; refused: a race, the ticket is re-read; "
            "worker_full: the worker's capacity was taken, through another replica).",
            ("outcome",),
            registry=registry,
        )
        self.cancellations = Counter(
            "hive_orchestrator_ticket_cancellations_total",
            "Tickets the orchestrator cancelled (plan cancel, fail-fast, blocked dependents).",
            registry=registry,
        )
        self.plans_settled = Counter(
            "hive_orchestrator_plans_settled_total",
            "Plans whose tickets all reached a terminal status, by plan status.",
            ("status",),
            registry=registry,
        )
        self.plan_duration_seconds = Histogram(
            "hive_orchestrator_plan_duration_seconds",
            "Seconds from a plan's submission until every ticket of it was terminal, by plan "
            "status (observed by the replica that settled it).",
            ("status",),
            buckets=_PLAN_SECONDS_BUCKETS,
            registry=registry,
        )
        self.round_failures = Counter(
            "hive_orchestrator_round_failures_total",
            "Plan rounds that failed and are retried, by kind (transient, too_large, error, "
            "ownership_lost).",
            ("kind",),
            registry=registry,
        )
        self.submissions = Counter(
            "hive_orchestrator_plan_submissions_total",
            "Accepted plan submissions (created, existing).",
            ("result",),
            registry=registry,
        )
