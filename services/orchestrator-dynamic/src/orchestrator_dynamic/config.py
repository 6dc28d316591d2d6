"""Settings of orchestrator-dynamic, from ``HIVE_ORCHESTRATOR_*`` environment variables.

Local defaults (HTTP 8003, gRPC 50053) sit beside the registry (8001/50051) and the ticket
service (8002/50052); containers set ``HIVE_ORCHESTRATOR_HTTP_PORT=8000``.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, FiniteFloat, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from hive_common.auth import BEARER_TOKEN_RULE, is_bearer_token
from hive_common.config import DAY, HOUR, MINUTE, TOKEN_TTL_LIMIT, PostgresSettings
from hive_common.namespaces import NAMESPACE_RE, NAMESPACE_RULE
from orchestrator_dynamic.domain.scheduler import RetryBackoff, SchedulingPolicy
from orchestrator_dynamic.domain.validation import PlanLimits

MAX_PARAMETERS_BYTES_LIMIT = 256 * 1024
"""The highest ``max_parameters_bytes``. A task's parameters travel in its ticket as a
protobuf Struct, at most 5.5 times their size as C1 (and the ticket service) measure it
(a number costs 11 bytes for the 2 of ``0,``; text about its UTF-8 size), beside at most
~50 KB of other fields: up to 256 KiB, a ticket C1 accepts is under 1.5 MiB, so it can
always be created (one call carries up to ``TICKET_CALL_BYTES``, 2 MiB, of tickets, and a
larger one alone) and leaves 2.5 MiB of the 4 MiB of a gRPC message for its result."""


class OrchestratorSettings(PostgresSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVE_ORCHESTRATOR_",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    service_name: str = "orchestrator-dynamic"
    grpc_port: int = Field(default=50053, ge=0, le=65535)
    http_port: int = Field(default=8003, ge=0, le=65535)

    postgres_dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/orchestrator")
    postgres_pool_min_size: int = Field(default=1, ge=1)

    ticket_service_target: str = "127.0.0.1:50052"
    registry_target: str = "127.0.0.1:50051"
    # Per attempt / whole call (retries of UNAVAILABLE included) for unary calls.
    rpc_timeout_seconds: FiniteFloat = Field(default=5.0, gt=0, le=HOUR)
    rpc_deadline_seconds: FiniteFloat = Field(default=15.0, gt=0, le=HOUR)
    service_token_ttl_seconds: int = Field(default=HOUR, ge=60, le=TOKEN_TTL_LIMIT)
    # Registry namespace the workers are discovered in; empty means "default". The
    # registry's rule (a DNS label): another value would make every discovery a refusal.
    worker_namespace: str = ""

    # Optional static token for the HTTP API (``Authorization: Bearer <token>``); unset
    # leaves the API open (local development; put it behind a gateway otherwise).
    api_token: SecretStr | None = None
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    # Plan limits (C1).
    max_tasks: int = Field(default=10_000, ge=1)
    max_dag_depth: int = Field(default=256, ge=1)
    max_parameters_bytes: int = Field(default=64 * 1024, ge=2, le=MAX_PARAMETERS_BYTES_LIMIT)
    max_retries: int = Field(default=20, ge=0)
    # Tickets per BatchCreateTickets call (C2).
    ticket_batch_size: int = Field(default=500, ge=1)

    # Scheduling (C3 to C5).
    fail_fast: bool = True
    backoff_base_seconds: FiniteFloat = Field(default=1.0, ge=0, le=DAY)
    backoff_cap_seconds: FiniteFloat = Field(default=300.0, ge=0, le=DAY)
    # AssignTicket lease; 0 means the ticket service's default. At most the ticket
    # service's default MAX_LEASE_SECONDS (a day): a longer one would refuse every assignment.
    assign_lease_seconds: int = Field(default=0, ge=0, le=DAY)
    # Re-check tickets that found no worker (besides registry events) this often.
    dispatch_retry_seconds: FiniteFloat = Field(default=5.0, gt=0, le=DAY)
    # Reuse a DiscoverWorkers answer for this long (0: ask every scheduling round); at most
    # a minute, the registry's default time for a silent worker to expire.
    discovery_cache_seconds: FiniteFloat = Field(default=0.25, ge=0, le=MINUTE)
    # Full ListTickets resync of every driven plan (the watch is the fast path).
    resync_interval_seconds: FiniteFloat = Field(default=30.0, gt=0, le=DAY)
    # Wait after a failed round before trying again (dependency outage).
    error_retry_seconds: FiniteFloat = Field(default=1.0, gt=0, le=HOUR)

    # Plan ownership (one replica drives a plan at a time): a plan whose replica died
    # waits at most a day (the lease) for another; renewals are at most hourly.
    owner_id: str | None = None
    lease_ttl_seconds: FiniteFloat = Field(default=30.0, gt=0, le=DAY)
    lease_renew_interval_seconds: FiniteFloat = Field(default=10.0, gt=0, le=HOUR)
    claim_interval_seconds: FiniteFloat = Field(default=5.0, gt=0, le=DAY)
    # How long POST /api/v1/plans waits for ticket creation before answering without ids.
    submit_wait_seconds: FiniteFloat = Field(default=10.0, ge=0, le=HOUR)

    readiness_interval_seconds: FiniteFloat = Field(default=5.0, gt=0, le=DAY)

    # The OrchestratorService gRPC twin of the HTTP API (on grpc_port).
    grpc_enabled: bool = True
    watch_plan_interval_seconds: FiniteFloat = Field(default=0.5, gt=0, le=MINUTE)
    watch_plan_max_streams: int = Field(default=256, ge=1)

    @field_validator("worker_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if value and not NAMESPACE_RE.fullmatch(value):
            raise ValueError(NAMESPACE_RULE)
        return value

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Another one was accepted, and every request then got 401: no client can send it.
        if value is not None and not is_bearer_token(value.get_secret_value()):
            raise ValueError(
                f"must be {BEARER_TOKEN_RULE} (clients send it as 'Authorization: Bearer <token>')"
            )
        return value

    def cross_field_violations(self) -> list[str]:
        # Messages name the environment variables: they are what an operator sets.
        violations = super().cross_field_violations()
        name = self.env_name
        if self.lease_renew_interval_seconds >= self.lease_ttl_seconds:
            violations.append(
                f"{name('lease_renew_interval_seconds')} must be below {name('lease_ttl_seconds')}"
            )
        if self.backoff_base_seconds > self.backoff_cap_seconds:
            violations.append(
                f"{name('backoff_base_seconds')} must not exceed {name('backoff_cap_seconds')}"
            )
        return violations

    def plan_limits(self) -> PlanLimits:
        return PlanLimits(
            max_tasks=self.max_tasks,
            max_dag_depth=self.max_dag_depth,
            max_parameters_bytes=self.max_parameters_bytes,
            max_retries=self.max_retries,
        )

    def scheduling_policy(self) -> SchedulingPolicy:
        return SchedulingPolicy(
            fail_fast=self.fail_fast,
            backoff=RetryBackoff(
                base_seconds=self.backoff_base_seconds, cap_seconds=self.backoff_cap_seconds
            ),
        )

    @property
    def lease_ttl(self) -> timedelta:
        return timedelta(seconds=self.lease_ttl_seconds)
