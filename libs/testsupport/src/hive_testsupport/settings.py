"""Settings of the services and the reference worker for in-process tests.

Every service listens on 127.0.0.1, port 0, with small pools and background loops fast
enough that tests see state changes within a fraction of a second. Keyword overrides win
(any field of the settings class), so a test module keeps its own values where it needs
them.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from execution_ticket_service.config import TicketSettings
from hive_worker.config import WorkerSettings
from orchestrator_dynamic.config import OrchestratorSettings
from service_registry.config import RegistrySettings

__all__ = [
    "FAST_TICKET_LOOPS",
    "orchestrator_settings",
    "registry_settings",
    "ticket_settings",
    "worker_settings",
]

LOOPBACK = "127.0.0.1"

FAST_TICKET_LOOPS: dict[str, Any] = {
    "lease_sweep_interval_seconds": 0.05,
    "relay_idle_interval_seconds": 0.05,
    "relay_max_backoff_seconds": 0.5,
    "readiness_interval_seconds": 0.1,
    "stats_interval_seconds": 0.2,
}
"""Ticket service loops faster still, for tests that watch that service closely (leases,
the audit relay, readiness) rather than a whole plan."""


def ticket_settings(
    *, postgres_dsn: str, mongo_uri: str, mongo_database: str, jwt_secret: str, **overrides: Any
) -> TicketSettings:
    """A ticket service on free ports with fast background loops."""
    values: dict[str, Any] = {
        "host": LOOPBACK,
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "postgres_dsn": postgres_dsn,
        "postgres_pool_min_size": 1,
        "postgres_pool_max_size": 10,
        "mongo_uri": mongo_uri,
        "mongo_database": mongo_database,
        "mongo_timeout_ms": 500,
        "jwt_secret": SecretStr(jwt_secret),
        "lease_sweep_interval_seconds": 0.1,
        # Tests expire leases right after starting the service (a test of the grace
        # itself sets one).
        "lease_grace_seconds": 0,
        "relay_idle_interval_seconds": 0.1,
        "watch_poll_interval_seconds": 0.05,
        "readiness_interval_seconds": 0.5,
        "stats_interval_seconds": 1.0,
        "shutdown_grace_seconds": 1.0,
    }
    return TicketSettings(**(values | overrides))


def registry_settings(
    *, postgres_dsn: str, jwt_secret: str, registration_secret: str, **overrides: Any
) -> RegistrySettings:
    """A service registry on free ports; workers heartbeat every second."""
    values: dict[str, Any] = {
        "host": LOOPBACK,
        "grpc_port": 0,
        "http_port": 0,
        "postgres_dsn": SecretStr(postgres_dsn),
        "postgres_pool_min_size": 1,
        "jwt_secret": SecretStr(jwt_secret),
        "registration_secret": SecretStr(registration_secret),
        "heartbeat_interval_seconds": 1,
        "watch_poll_interval_seconds": 0.05,
        "shutdown_grace_seconds": 1.0,
    }
    return RegistrySettings(**(values | overrides))


def orchestrator_settings(
    *,
    postgres_dsn: str,
    tickets_target: str,
    registry_target: str,
    jwt_secret: str,
    **overrides: Any,
) -> OrchestratorSettings:
    """An orchestrator on free ports calling the given services with short timeouts and
    retries, so that a stopped dependency is noticed and recovered from within seconds."""
    values: dict[str, Any] = {
        "host": LOOPBACK,
        "http_port": 0,
        "grpc_port": 0,
        "watch_plan_interval_seconds": 0.1,
        "postgres_dsn": SecretStr(postgres_dsn),
        "postgres_pool_min_size": 1,
        "ticket_service_target": tickets_target,
        "registry_target": registry_target,
        "jwt_secret": SecretStr(jwt_secret),
        "rpc_timeout_seconds": 2.0,
        "rpc_deadline_seconds": 4.0,
        "backoff_base_seconds": 0.2,
        "backoff_cap_seconds": 0.5,
        "dispatch_retry_seconds": 0.5,
        "resync_interval_seconds": 2.0,
        "error_retry_seconds": 0.2,
        "lease_ttl_seconds": 5.0,
        "lease_renew_interval_seconds": 1.0,
        "claim_interval_seconds": 0.3,
        "readiness_interval_seconds": 0.5,
        "shutdown_grace_seconds": 1.0,
    }
    return OrchestratorSettings(**(values | overrides))


def worker_settings(
    *,
    registry_target: str,
    tickets_target: str,
    registration_secret: str,
    name: str,
    capabilities: list[str],
    **overrides: Any,
) -> WorkerSettings:
    """A reference worker with four slots, short call timeouts and a short drain."""
    values: dict[str, Any] = {
        "registry_target": registry_target,
        "tickets_target": tickets_target,
        "registration_secret": SecretStr(registration_secret),
        "name": name,
        "capabilities": capabilities,
        "max_concurrent": 4,
        "heartbeat_interval_seconds": 0.5,
        "drain_grace_seconds": 1.0,
        "call_timeout_seconds": 2.0,
        "call_deadline_seconds": 5.0,
        "reconnect_max_backoff_seconds": 0.5,
    }
    return WorkerSettings(**(values | overrides))
