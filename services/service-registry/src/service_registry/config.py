"""Settings of the service-registry, from ``HIVE_REGISTRY_*`` environment variables."""

from __future__ import annotations

import math
from datetime import timedelta

from pydantic import Field, FiniteFloat, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from hive_common.auth import BEARER_TOKEN_RULE, is_bearer_token
from hive_common.config import DAY, HOUR, MINUTE, RETENTION_LIMIT, TOKEN_TTL_LIMIT, PostgresSettings
from service_registry.domain.models import HealthPolicy
from service_registry.domain.ranking import RankingWeights
from service_registry.domain.validation import Limits

MIN_REGISTRATION_SECRET = 16


class RegistrySettings(PostgresSettings):
    """Local defaults (gRPC 50051, HTTP 8001) avoid the other services' local ports;
    containers set ``HIVE_REGISTRY_HTTP_PORT=8000``."""

    model_config = SettingsConfigDict(
        env_prefix="HIVE_REGISTRY_",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    service_name: str = "service-registry"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8001, ge=0, le=65535)
    postgres_dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/registry")
    migrate_on_start: bool = True

    # Workers present this as "authorization: Bearer <secret>" to Register; unset means
    # only the service token may register workers.
    registration_secret: SecretStr | None = None
    worker_token_ttl_seconds: int = Field(default=DAY, ge=60, le=TOKEN_TTL_LIMIT)

    # Workers are told to heartbeat at least hourly, and a silent one expires within a day.
    heartbeat_interval_seconds: int = Field(default=5, ge=1, le=HOUR)
    unhealthy_after_missed_heartbeats: int = Field(default=3, ge=1)
    expire_after_seconds: int = Field(default=60, ge=2, le=DAY)
    sweep_interval_seconds: FiniteFloat = Field(default=2.0, gt=0, le=HOUR)
    mass_transition_threshold: int = Field(default=10, ge=1)
    event_retention_seconds: int = Field(default=HOUR, ge=60, le=RETENTION_LIMIT)
    watch_poll_interval_seconds: FiniteFloat = Field(default=0.25, gt=0, le=MINUTE)

    ranking_weight_spare_capacity: float = Field(default=0.6, ge=0)
    ranking_weight_success_rate: float = Field(default=0.3, ge=0)
    ranking_weight_freshness: float = Field(default=0.1, ge=0)

    default_max_results: int = Field(default=10, ge=1)
    max_results_cap: int = Field(default=100, ge=1)
    default_page_size: int = Field(default=50, ge=1)
    page_size_cap: int = Field(default=500, ge=1)

    @field_validator("registration_secret")
    @classmethod
    def _check_registration_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_REGISTRATION_SECRET:
            raise ValueError(f"must be at least {MIN_REGISTRATION_SECRET} characters")
        # Workers send it as 'Authorization: Bearer <secret>': another one locks them out.
        if value is not None and not is_bearer_token(value.get_secret_value()):
            raise ValueError(f"must be {BEARER_TOKEN_RULE} (workers send it as a bearer token)")
        return value

    def cross_field_violations(self) -> list[str]:
        # Messages name the environment variables: they are what an operator sets.
        violations = super().cross_field_violations()
        name = self.env_name
        if self.expire_after_seconds <= (
            self.heartbeat_interval_seconds * self.unhealthy_after_missed_heartbeats
        ):
            violations.append(
                f"{name('expire_after_seconds')} must be longer than "
                f"{name('heartbeat_interval_seconds')} x "
                f"{name('unhealthy_after_missed_heartbeats')} (a worker expires after "
                "it turned UNHEALTHY)"
            )
        weights = (
            self.ranking_weight_spare_capacity,
            self.ranking_weight_success_rate,
            self.ranking_weight_freshness,
        )
        if not all(math.isfinite(w) for w in weights) or sum(weights) <= 0:
            violations.append(
                f"{name('ranking_weight_spare_capacity')}, "
                f"{name('ranking_weight_success_rate')} and "
                f"{name('ranking_weight_freshness')} must be finite and not all zero"
            )
        if not violations:
            # The domain's own checks (the same rules, in its terms) as a backstop.
            self.health_policy()
            self.ranking_weights()
        return violations

    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(
            heartbeat_interval=timedelta(seconds=self.heartbeat_interval_seconds),
            missed_heartbeats=self.unhealthy_after_missed_heartbeats,
            expire_after=timedelta(seconds=self.expire_after_seconds),
        )

    def ranking_weights(self) -> RankingWeights:
        return RankingWeights(
            spare_capacity=self.ranking_weight_spare_capacity,
            success_rate=self.ranking_weight_success_rate,
            freshness=self.ranking_weight_freshness,
        )

    def limits(self) -> Limits:
        return Limits(
            default_max_results=min(self.default_max_results, self.max_results_cap),
            max_results_cap=self.max_results_cap,
            default_page_size=min(self.default_page_size, self.page_size_cap),
            page_size_cap=self.page_size_cap,
        )
