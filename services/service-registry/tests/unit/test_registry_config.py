"""RegistrySettings: environment prefix, defaults, bounds and consistency checks.

Durations had no upper bound: a huge HIVE_REGISTRY_EXPIRE_AFTER_SECONDS was a traceback at
start-up, a huge HIVE_REGISTRY_EVENT_RETENTION_SECONDS killed the health sweeper.
"""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from hive_common.config import invalid_settings_message
from hive_testsupport.durations import at_their_maximums, beyond_maximum_cases
from service_registry.config import RegistrySettings

DURATION_MAXIMUMS = {
    "startup_timeout_seconds": 86400,
    "shutdown_grace_seconds": 3600,
    "http_keep_alive_seconds": 3600,
    "worker_token_ttl_seconds": 30 * 86400,
    "heartbeat_interval_seconds": 3600,
    "expire_after_seconds": 86400,
    "sweep_interval_seconds": 3600,
    "event_retention_seconds": 5 * 365 * 86400,
    "watch_poll_interval_seconds": 60,
}
"""Every duration setting and its largest value."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ambient HIVE_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("HIVE_"):
            monkeypatch.delenv(name)


def test_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_REGISTRY_GRPC_PORT", "6000")
    monkeypatch.setenv("HIVE_REGISTRY_EXPIRE_AFTER_SECONDS", "90")
    monkeypatch.setenv("HIVE_TICKETS_GRPC_PORT", "7000")
    settings = RegistrySettings()
    assert settings.grpc_port == 6000
    assert settings.http_port == 8001
    assert settings.health_policy().expire_after.total_seconds() == 90


@pytest.mark.parametrize(
    "overrides",
    [
        {"expire_after_seconds": 15},  # not longer than 5 s x 3 missed
        {
            "ranking_weight_spare_capacity": 0,
            "ranking_weight_success_rate": 0,
            "ranking_weight_freshness": 0,
        },
        {"registration_secret": "short"},
        {"registration_secret": "a registration secret with spaces"},
        {"postgres_pool_min_size": 5, "postgres_pool_max_size": 2},
    ],
)
def test_inconsistent_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RegistrySettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            {"expire_after_seconds": 10},  # not longer than 5 s x 3 missed heartbeats
            "HIVE_REGISTRY_EXPIRE_AFTER_SECONDS must be longer than "
            "HIVE_REGISTRY_HEARTBEAT_INTERVAL_SECONDS x "
            "HIVE_REGISTRY_UNHEALTHY_AFTER_MISSED_HEARTBEATS (a worker expires after it "
            "turned UNHEALTHY)",
        ),
        (
            {"heartbeat_interval_seconds": 30},  # 30 s x 3 is longer than 60 s
            "HIVE_REGISTRY_EXPIRE_AFTER_SECONDS must be longer than "
            "HIVE_REGISTRY_HEARTBEAT_INTERVAL_SECONDS x "
            "HIVE_REGISTRY_UNHEALTHY_AFTER_MISSED_HEARTBEATS (a worker expires after it "
            "turned UNHEALTHY)",
        ),
        (
            {"postgres_pool_min_size": 30},  # the maximum's default is 10
            "HIVE_REGISTRY_POSTGRES_POOL_MIN_SIZE must not exceed "
            "HIVE_REGISTRY_POSTGRES_POOL_MAX_SIZE",
        ),
        (
            {
                "ranking_weight_spare_capacity": 0,
                "ranking_weight_success_rate": 0,
                "ranking_weight_freshness": 0,
            },
            "HIVE_REGISTRY_RANKING_WEIGHT_SPARE_CAPACITY, HIVE_REGISTRY_RANKING_WEIGHT_SUCCESS_RATE"
            " and HIVE_REGISTRY_RANKING_WEIGHT_FRESHNESS must be finite and not all zero",
        ),
        (
            {"ranking_weight_freshness": "inf"},
            "HIVE_REGISTRY_RANKING_WEIGHT_SPARE_CAPACITY, HIVE_REGISTRY_RANKING_WEIGHT_SUCCESS_RATE"
            " and HIVE_REGISTRY_RANKING_WEIGHT_FRESHNESS must be finite and not all zero",
        ),
        # Each a traceback, or a sweeper dead, before durations were bounded.
        (
            {"expire_after_seconds": 10**15},
            "HIVE_REGISTRY_EXPIRE_AFTER_SECONDS: Input should be less than or equal to 86400",
        ),
        (
            {"event_retention_seconds": 99999999999},
            "HIVE_REGISTRY_EVENT_RETENTION_SECONDS: Input should be less than or equal to "
            "157680000",
        ),
        *beyond_maximum_cases(RegistrySettings, DURATION_MAXIMUMS, "HIVE_REGISTRY_"),
    ],
)
def test_invalid_settings_name_the_environment_variables(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object], line: str
) -> None:
    # What an operator reads: the variables they set, not Python fields ("expire_after").
    for name, value in overrides.items():
        monkeypatch.setenv(f"HIVE_REGISTRY_{name.upper()}", str(value))
    with pytest.raises(ValidationError) as exc:
        RegistrySettings()
    message = invalid_settings_message("service-registry", exc.value, "HIVE_REGISTRY_")
    assert message.splitlines() == ["service-registry: invalid settings:", f"  {line}"]


def test_every_duration_at_its_maximum_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = at_their_maximums(RegistrySettings, DURATION_MAXIMUMS, "HIVE_REGISTRY_", monkeypatch)
    assert isinstance(settings, RegistrySettings)
    assert settings.health_policy().expire_after.total_seconds() == 86400


def test_every_rule_across_settings_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each showed up only once the one before it was fixed.
    for name, value in {
        "POSTGRES_POOL_MIN_SIZE": "30",
        "EXPIRE_AFTER_SECONDS": "10",
        "RANKING_WEIGHT_SPARE_CAPACITY": "0",
        "RANKING_WEIGHT_SUCCESS_RATE": "0",
        "RANKING_WEIGHT_FRESHNESS": "0",
    }.items():
        monkeypatch.setenv(f"HIVE_REGISTRY_{name}", value)
    with pytest.raises(ValidationError) as exc:
        RegistrySettings()
    message = invalid_settings_message("service-registry", exc.value, "HIVE_REGISTRY_")
    assert message.splitlines() == [
        "service-registry: invalid settings:",
        "  HIVE_REGISTRY_POSTGRES_POOL_MIN_SIZE must not exceed "
        "HIVE_REGISTRY_POSTGRES_POOL_MAX_SIZE",
        "  HIVE_REGISTRY_EXPIRE_AFTER_SECONDS must be longer than "
        "HIVE_REGISTRY_HEARTBEAT_INTERVAL_SECONDS x "
        "HIVE_REGISTRY_UNHEALTHY_AFTER_MISSED_HEARTBEATS (a worker expires after it "
        "turned UNHEALTHY)",
        "  HIVE_REGISTRY_RANKING_WEIGHT_SPARE_CAPACITY, HIVE_REGISTRY_RANKING_WEIGHT_SUCCESS_RATE"
        " and HIVE_REGISTRY_RANKING_WEIGHT_FRESHNESS must be finite and not all zero",
    ]
