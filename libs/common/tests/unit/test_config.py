"""HiveSettings: defaults, per-service env prefixes, validation, insecure-secret warning."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field, FiniteFloat, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from hive_common.auth import TokenIssuer
from hive_common.config import (
    DAY,
    DEVELOPMENT_JWT_SECRET,
    HiveSettings,
    PostgresSettings,
    invalid_settings_message,
)

REAL_SECRET = "x" * 40


class TicketSettings(PostgresSettings):
    model_config = SettingsConfigDict(env_prefix="HIVE_TICKETS_")

    service_name: str = "execution-ticket-service"
    grpc_port: int = 50052
    postgres_dsn: SecretStr = SecretStr("postgresql://localhost/tickets")


class RegistrySettings(HiveSettings):
    model_config = SettingsConfigDict(env_prefix="HIVE_REGISTRY_")

    service_name: str = "service-registry"


class RecordingLogger:
    def __init__(self) -> None:
        self.warnings: list[tuple[str | None, dict[str, Any]]] = []

    def warning(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self.warnings.append((event, fields))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ambient HIVE_* variables must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("HIVE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = HiveSettings()
    assert settings.log_level == "INFO"
    assert settings.log_format == "auto"
    assert settings.host == "0.0.0.0"
    assert settings.metrics_port is None
    assert settings.jwt_audience == "neuralhive"
    assert settings.shutdown_grace_seconds == 10
    # Outlasts clients' and load balancers' idle timeouts (they close idle connections).
    assert settings.http_keep_alive_seconds > 60
    assert settings.uses_development_jwt_secret


def test_each_service_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_TICKETS_GRPC_PORT", "6001")
    monkeypatch.setenv("HIVE_TICKETS_POSTGRES_DSN", "postgresql://db/t")
    monkeypatch.setenv("HIVE_REGISTRY_GRPC_PORT", "6002")
    monkeypatch.setenv("HIVE_REGISTRY_LOG_LEVEL", "debug")
    monkeypatch.setenv("HIVE_GRPC_PORT", "6003")

    tickets = TicketSettings()
    registry = RegistrySettings()
    base = HiveSettings()

    assert tickets.grpc_port == 6001
    assert tickets.postgres_dsn.get_secret_value() == "postgresql://db/t"
    assert tickets.log_level == "INFO"
    assert tickets.service_name == "execution-ticket-service"
    assert registry.grpc_port == 6002
    assert registry.log_level == "DEBUG"
    assert base.grpc_port == 6003


def test_subclass_keeps_base_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_TICKETS_METRICS_PORT", "")  # empty = unset
    monkeypatch.setenv("HIVE_TICKETS_UNKNOWN_THING", "ignored")
    monkeypatch.setenv("HIVE_TICKETS_JWT_SECRET", "short")
    with pytest.raises(ValidationError, match="jwt_secret"):
        TicketSettings()
    monkeypatch.setenv("HIVE_TICKETS_JWT_SECRET", REAL_SECRET)
    settings = TicketSettings()
    assert settings.metrics_port is None
    assert not settings.uses_development_jwt_secret


def test_metrics_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_TICKETS_METRICS_PORT", "9090")
    assert TicketSettings().metrics_port == 9090


@pytest.mark.parametrize(("given", "expected"), [("debug", "DEBUG"), (" warn ", "WARNING")])
def test_log_level_is_normalised(given: str, expected: str) -> None:
    assert HiveSettings(log_level=given).log_level == expected


@pytest.mark.parametrize(
    "bad",
    [
        {"log_level": "LOUD"},
        {"log_format": "xml"},
        {"grpc_port": 70000},
        {"http_port": -1},
        {"shutdown_grace_seconds": -1},
        {"http_keep_alive_seconds": 0},
        {"http_keep_alive_seconds": "forever"},
        # Durations are finite and bounded (inf overflowed where it became a timedelta).
        {"startup_timeout_seconds": "inf"},
        {"startup_timeout_seconds": "nan"},
        {"startup_timeout_seconds": 86401},
        {"shutdown_grace_seconds": "inf"},
        {"shutdown_grace_seconds": 3601},
        {"http_keep_alive_seconds": 3601},
    ],
)
def test_invalid_values_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HiveSettings(**bad)


def test_secret_is_not_printed() -> None:
    settings = HiveSettings(jwt_secret=REAL_SECRET)
    assert REAL_SECRET not in repr(settings)
    assert REAL_SECRET not in str(settings.model_dump())
    assert settings.jwt_secret.get_secret_value() == REAL_SECRET


def test_warn_if_insecure_with_development_secret() -> None:
    logger = RecordingLogger()
    assert TicketSettings().warn_if_insecure(logger) is True
    [(event, fields)] = logger.warnings
    assert event == "INSECURE_DEVELOPMENT_JWT_SECRET"
    assert "HIVE_TICKETS_JWT_SECRET" in fields["detail"]
    assert DEVELOPMENT_JWT_SECRET not in str(fields)


def test_no_warning_with_real_secret() -> None:
    logger = RecordingLogger()
    assert TicketSettings(jwt_secret=REAL_SECRET).warn_if_insecure(logger) is False
    assert logger.warnings == []


def test_a_database_dsn_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ticket service's DSN was a plain string: repr(settings) showed its password.
    monkeypatch.setenv("HIVE_TICKETS_POSTGRES_DSN", "postgresql://hive:pg-password@db/t")
    settings = TicketSettings()
    assert "pg-password" not in repr(settings)
    assert "pg-password" not in str(settings.model_dump())
    assert settings.postgres_dsn.get_secret_value() == "postgresql://hive:pg-password@db/t"


def test_a_pool_smaller_at_least_than_at_most_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE", "11")  # the maximum's default is 10
    rule = "HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE"
    with pytest.raises(ValidationError, match=rule):
        TicketSettings()
    assert TicketSettings(postgres_pool_min_size=10).postgres_pool_max_size == 10


def test_an_accepted_jwt_secret_is_a_secret_of_the_same_strength(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HIVE_TICKETS_JWT_ACCEPTED_SECRET", "short")
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        TicketSettings()
    monkeypatch.setenv("HIVE_TICKETS_JWT_ACCEPTED_SECRET", "n" * 32)
    settings = TicketSettings(jwt_secret=REAL_SECRET)
    assert "n" * 32 not in repr(settings)
    token, _ = TokenIssuer(secret="n" * 32, issuer=settings.jwt_issuer).issue_worker_token(
        worker_id="w-1", ttl_seconds=60
    )
    assert settings.token_verifier().verify(token).worker_id == "w-1"


def test_env_name_is_the_variable_that_sets_a_field() -> None:
    # What the services' rules across settings name in their messages.
    assert TicketSettings.env_name("grpc_port") == "HIVE_TICKETS_GRPC_PORT"
    assert RegistrySettings.env_name("jwt_secret") == "HIVE_REGISTRY_JWT_SECRET"
    assert HiveSettings.env_name("log_level") == "HIVE_LOG_LEVEL"
    assert TicketSettings().env_name("postgres_dsn") == "HIVE_TICKETS_POSTGRES_DSN"


def test_env_name_refuses_a_name_that_is_not_a_setting() -> None:
    with pytest.raises(KeyError, match="no setting 'grpc_prot'"):
        TicketSettings.env_name("grpc_prot")


def test_the_shared_durations_at_their_maximums_are_accepted() -> None:
    settings = HiveSettings(
        startup_timeout_seconds=86400, shutdown_grace_seconds=3600, http_keep_alive_seconds=3600
    )
    assert settings.startup_timeout_seconds == 86400


def test_a_duration_setting_without_an_upper_bound_is_refused_at_import() -> None:
    # Else it is accepted up to inf and overflows later, far from the settings.
    with pytest.raises(TypeError, match=r"upper bound \(le=\.\.\.\): poll_seconds, keep_hours$"):

        class Unbounded(HiveSettings):
            poll_seconds: float = Field(default=1.0, gt=0)
            keep_hours: int = 24
            bounded_seconds: FiniteFloat = Field(default=1.0, gt=0, le=DAY)
            below_ms: int = Field(default=10, lt=1000)
            retries: int = 3  # not a duration


def _settings_lines(exc: ValidationError) -> list[str]:
    return invalid_settings_message("svc", exc, "HIVE_TICKETS_").splitlines()[1:]


@pytest.mark.parametrize(
    ("dsn", "reason", "secret"),
    [
        ("garbage", 'missing "=" after', "garbage"),
        # A raw '%' in a URL's password; libpq quotes the token it could not decode.
        ("postgresql://postgres:p%ss@db/tickets", "invalid percent-encoded token", "p%ss"),
        ("postgresql://hive:pw-secret@db/tickets?bogus_option=1", "invalid URI query", "pw-"),
        # An unquoted password with a space: libpq quotes the word after it.
        ("host=db password=top secret", 'missing "=" after', "secret"),
        ("host=db password=top secret=x", "invalid connection option", "secret"),
        ("mysql://hive:pw-secret@db/tickets", 'missing "=" after', "pw-secret"),
        ("postgresql://hive:pw-secret@[::1/tickets", "IPv6 host address", "pw-secret"),
        # A '"' in the DSN: libpq's quoted parts cannot be told apart, all of them go.
        ('host=db password=pa"ss word', 'missing "***" in connection info string', "word"),
        # psycopg's own check of connect_timeout (it refused it only when connecting) ...
        ("postgresql://hive:pw-secret@db/t?connect_timeout=abc", "bad value for connect", "pw-"),
        # ... and a percent escape that is no UTF-8 (a UnicodeDecodeError's text before).
        ("postgresql://hive:pw-secret@db/t?application_name=%E9%FF", "not UTF-8", "pw-"),
    ],
)
def test_a_malformed_postgres_dsn_is_an_invalid_setting_that_never_shows_it(
    monkeypatch: pytest.MonkeyPatch, dsn: str, reason: str, secret: str
) -> None:
    # It was a traceback at start-up (exit 1), or start-up retried it as "not ready"; and
    # libpq's message quotes parts of the DSN, a password among them.
    monkeypatch.setenv("HIVE_TICKETS_POSTGRES_DSN", dsn)
    with pytest.raises(ValidationError) as exc:
        TicketSettings()
    [line] = _settings_lines(exc.value)
    assert line.startswith("  HIVE_TICKETS_POSTGRES_DSN: not a PostgreSQL connection string: ")
    assert reason in line
    assert secret not in line
    assert secret not in str(exc.value)  # pydantic's own text shows no input either
    assert "\n" not in exc.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://hive:p%25ss@db:5432/tickets?sslmode=require&application_name=x",
        "postgres://db1:5432,db2:5433/tickets?target_session_attrs=read-write",
        "postgresql:///tickets?host=/var/run/postgresql",
        "host=db port=5432 dbname=tickets user=hive password='top secret'",
        "",  # libpq's defaults (PGHOST, the local socket ...)
    ],
)
def test_postgres_dsns_libpq_takes_are_accepted(dsn: str) -> None:
    assert TicketSettings(postgres_dsn=dsn).postgres_dsn.get_secret_value() == dsn


def test_every_rule_across_settings_is_reported_at_once() -> None:
    class TwoRules(PostgresSettings):
        model_config = SettingsConfigDict(env_prefix="HIVE_TICKETS_")

        low_seconds: int = Field(default=1, le=DAY)
        high_seconds: int = Field(default=2, le=DAY)

        def cross_field_violations(self) -> list[str]:
            violations = super().cross_field_violations()
            if self.low_seconds > self.high_seconds:
                name = self.env_name
                violations.append(f"{name('low_seconds')} must not exceed {name('high_seconds')}")
            return violations

    with pytest.raises(ValidationError) as exc:
        TwoRules(postgres_pool_min_size=5, postgres_pool_max_size=4, low_seconds=3)
    assert _settings_lines(exc.value) == [
        "  HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE",
        "  HIVE_TICKETS_LOW_SECONDS must not exceed HIVE_TICKETS_HIGH_SECONDS",
    ]
    assert TwoRules(low_seconds=2).low_seconds == 2
