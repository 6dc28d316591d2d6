"""Settings of the execution-ticket-service, from ``HIVE_TICKETS_*`` environment variables.

Defaults suit a local run next to the other services (gRPC 50052, HTTP 8002, metrics 9092);
containers set ``HIVE_TICKETS_HTTP_PORT=8000`` and ``HIVE_TICKETS_METRICS_PORT=9090``.
"""

from __future__ import annotations

import warnings

from pydantic import Field, FiniteFloat, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict
from pymongo.errors import ConfigurationError
from pymongo.uri_parser import parse_uri

from execution_ticket_service.domain.validation import Limits
from hive_common.config import (
    DAY,
    HOUR,
    MINUTE,
    RETENTION_LIMIT,
    TOKEN_TTL_LIMIT,
    PostgresSettings,
)

MAX_TIMEOUT_SECONDS = Limits().max_timeout_seconds
"""The longest task timeout a ticket may have (7 days; not a setting)."""

MAX_LEASE_SECONDS_LIMIT = DAY
"""The highest ``max_lease_seconds``: a lease is the time a worker has to start a task."""


class TicketSettings(PostgresSettings):
    model_config = SettingsConfigDict(env_prefix="HIVE_TICKETS_", extra="ignore")

    service_name: str = "execution-ticket-service"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    http_port: int = Field(default=8002, ge=0, le=65535)
    metrics_port: int | None = Field(default=9092, ge=0, le=65535)

    postgres_dsn: SecretStr = SecretStr("postgresql://localhost/tickets")
    postgres_pool_max_size: int = Field(default=20, ge=1)
    # A secret too: a MongoDB URI may carry a password.
    mongo_uri: SecretStr = SecretStr("mongodb://localhost:27017")
    mongo_database: str = "hive_tickets"
    # Server selection and connect timeout (the socket timeout is 5 times it): at most an
    # hour, already far past a useful wait (pymongo itself refuses 10^9 ms or more).
    mongo_timeout_ms: int = Field(default=2000, ge=100, le=HOUR * 1000)

    # Request limits and defaults (sizes as compact UTF-8 JSON).
    max_parameters_bytes: int = Field(default=64 * 1024, ge=2)
    max_result_bytes: int = Field(default=1024 * 1024, ge=2)
    max_batch_size: int = Field(default=10_000, ge=1)
    default_timeout_seconds: int = Field(default=3600, ge=1, le=MAX_TIMEOUT_SECONDS)
    default_lease_seconds: int = Field(default=60, ge=1, le=MAX_LEASE_SECONDS_LIMIT)
    max_lease_seconds: int = Field(default=DAY, ge=1, le=MAX_LEASE_SECONDS_LIMIT)
    default_page_size: int = Field(default=100, ge=1)
    max_page_size: int = Field(default=1000, ge=1)
    default_token_ttl_seconds: int = Field(default=3600, ge=1, le=TOKEN_TTL_LIMIT)
    max_token_ttl_seconds: int = Field(default=DAY, ge=1, le=TOKEN_TTL_LIMIT)

    @field_validator("mongo_uri")
    @classmethod
    def _mongo_uri(cls, secret: SecretStr) -> SecretStr:
        # The client parses it only when it is built: a bad one was a traceback (exit 1)
        # after the migrations. A mongodb+srv:// URI is checked as its mongodb:// form
        # (its hosts come from DNS when the client connects, not now).
        srv = "mongodb+srv://"
        value = secret.get_secret_value()
        is_srv = value.startswith(srv)
        plain = "mongodb://" + value[len(srv) :] if is_srv else value
        hosts = plain[len("mongodb://") :].split("/")[0].rpartition("@")[2]
        if is_srv and ("," in hosts or ":" in hosts):
            raise ValueError("not a MongoDB URI: a mongodb+srv:// URI names one host, no port")
        try:
            with warnings.catch_warnings():  # unknown options: the client warns of them
                warnings.simplefilter("ignore")
                parse_uri(plain, warn=True)
        except (ConfigurationError, ValueError) as exc:
            raise ValueError(f"not a MongoDB URI: {exc}") from None
        return secret

    # Background work. Periods are at most a day; the sub-second knobs of the live paths
    # (relay, watch) at most a minute.
    lease_sweep_interval_seconds: FiniteFloat = Field(default=1.0, gt=0, le=DAY)
    # No lease expires this long after the service starts or its database answers again:
    # the workers' reports held back meanwhile get in first (see LeaseSweeper).
    lease_grace_seconds: FiniteFloat = Field(default=30.0, ge=0, le=DAY)
    relay_batch_size: int = Field(default=500, ge=1)
    relay_idle_interval_seconds: FiniteFloat = Field(default=0.5, gt=0, le=MINUTE)
    # Events arriving within this window after a change are relayed together (lag target < 1 s).
    relay_batch_window_seconds: FiniteFloat = Field(default=0.15, ge=0, le=MINUTE)
    relay_max_backoff_seconds: FiniteFloat = Field(default=10.0, gt=0, le=HOUR)
    stats_interval_seconds: FiniteFloat = Field(default=5.0, gt=0, le=DAY)
    watch_poll_interval_seconds: FiniteFloat = Field(default=0.5, gt=0, le=MINUTE)
    watch_batch_size: int = Field(default=500, ge=1)
    # Recent events kept in memory for WatchTickets streams (one database read per change
    # for all streams); a stream further behind reads the database until it catches up.
    watch_window_events: int = Field(default=5_000, ge=1)
    # ... and at most this many bytes of their tickets' parameters and results (and of the
    # results in their details) as JSON.
    watch_window_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # The event-log reader's reads start at least this far apart: under load one read
    # picks up the changes of a few milliseconds instead of one query per change.
    watch_read_gap_seconds: FiniteFloat = Field(default=0.005, ge=0, le=MINUTE)
    # Unfinished tickets whose last written state is remembered, so that their next change
    # needs no read first (the write is checked against the version); 0 turns it off.
    recent_tickets: int = Field(default=5_000, ge=0)
    readiness_interval_seconds: FiniteFloat = Field(default=2.0, gt=0, le=DAY)
    # Relayed events older than this are deleted (bounds the watch log and outbox table).
    event_retention_hours: FiniteFloat = Field(default=7 * 24, gt=0, le=RETENTION_LIMIT // HOUR)
    event_purge_interval_seconds: FiniteFloat = Field(default=300.0, gt=0, le=DAY)

    # The HTTP read API asks for a bearer token like the gRPC API does.
    http_require_auth: bool = True

    def cross_field_violations(self) -> list[str]:
        # A default above its maximum would be accepted here and then refuse every
        # request relying on it, blaming a field the client never set. Messages name the
        # environment variables: they are what an operator sets.
        violations = super().cross_field_violations()
        name = self.env_name
        pairs = (
            ("default_lease_seconds", "max_lease_seconds"),
            ("default_token_ttl_seconds", "max_token_ttl_seconds"),
        )
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                violations.append(f"{name(low)} must not exceed {name(high)}")
        return violations

    def limits(self) -> Limits:
        return Limits(
            max_parameters_bytes=self.max_parameters_bytes,
            max_result_bytes=self.max_result_bytes,
            max_batch_size=self.max_batch_size,
            default_timeout_seconds=self.default_timeout_seconds,
            default_lease_seconds=self.default_lease_seconds,
            max_lease_seconds=self.max_lease_seconds,
            default_page_size=self.default_page_size,
            max_page_size=self.max_page_size,
            default_token_ttl_seconds=self.default_token_ttl_seconds,
            max_token_ttl_seconds=self.max_token_ttl_seconds,
        )
