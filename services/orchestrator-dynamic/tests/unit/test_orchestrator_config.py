"""OrchestratorSettings: invalid settings, rules across settings too, are named by their
environment variables.

Rules across settings used to name Python fields ("lease_renew_interval_seconds must be
below lease_ttl_seconds"), where every other invalid setting is named by its variable.
Durations had no upper bound: HIVE_ORCHESTRATOR_LEASE_TTL_SECONDS=inf was a traceback.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from hive_common.config import DURATION_SUFFIXES, invalid_settings_message
from orchestrator_dynamic.config import OrchestratorSettings

PROGRAM = "orchestrator-dynamic"

DURATION_MAXIMUMS = {
    "STARTUP_TIMEOUT_SECONDS": 86400,
    "SHUTDOWN_GRACE_SECONDS": 3600,
    "HTTP_KEEP_ALIVE_SECONDS": 3600,
    "RPC_TIMEOUT_SECONDS": 3600,
    "RPC_DEADLINE_SECONDS": 3600,
    "SERVICE_TOKEN_TTL_SECONDS": 30 * 86400,
    "BACKOFF_BASE_SECONDS": 86400,
    "BACKOFF_CAP_SECONDS": 86400,
    "ASSIGN_LEASE_SECONDS": 86400,
    "DISPATCH_RETRY_SECONDS": 86400,
    "DISCOVERY_CACHE_SECONDS": 60,
    "RESYNC_INTERVAL_SECONDS": 86400,
    "ERROR_RETRY_SECONDS": 3600,
    "LEASE_TTL_SECONDS": 86400,
    "LEASE_RENEW_INTERVAL_SECONDS": 3600,
    "CLAIM_INTERVAL_SECONDS": 86400,
    "SUBMIT_WAIT_SECONDS": 3600,
    "READINESS_INTERVAL_SECONDS": 86400,
    "WATCH_PLAN_INTERVAL_SECONDS": 60,
}
"""Every duration setting and its largest value."""


def beyond_maximum_cases() -> list[Any]:
    """Each duration given ``inf``, a huge number and one more than its maximum."""
    cases = []
    for name, maximum in DURATION_MAXIMUMS.items():
        is_int = OrchestratorSettings.model_fields[name.lower()].annotation is int
        not_finite = (
            "Input should be a valid integer, unable to parse string as an integer"
            if is_int
            else "Input should be a finite number"
        )
        too_big = f"Input should be less than or equal to {maximum}"
        for value, message in (
            ("inf", not_finite),
            ("1e300", not_finite if is_int else too_big),
            (str(maximum + 1), too_big),
        ):
            line = f"HIVE_ORCHESTRATOR_{name}: {message}"
            cases.append(pytest.param({name: value}, line, id=f"{name}={value}"))
    return cases


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ambient HIVE_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("HIVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LEASE_RENEW_INTERVAL_SECONDS": "40"},  # the lease's default TTL is 30 s
            "HIVE_ORCHESTRATOR_LEASE_RENEW_INTERVAL_SECONDS must be below "
            "HIVE_ORCHESTRATOR_LEASE_TTL_SECONDS",
        ),
        (
            {"LEASE_TTL_SECONDS": "10"},  # the renewal's default interval is 10 s
            "HIVE_ORCHESTRATOR_LEASE_RENEW_INTERVAL_SECONDS must be below "
            "HIVE_ORCHESTRATOR_LEASE_TTL_SECONDS",
        ),
        (
            {"POSTGRES_POOL_MIN_SIZE": "30"},  # the maximum's default is 10
            "HIVE_ORCHESTRATOR_POSTGRES_POOL_MIN_SIZE must not exceed "
            "HIVE_ORCHESTRATOR_POSTGRES_POOL_MAX_SIZE",
        ),
        (
            {"BACKOFF_BASE_SECONDS": "500"},  # the cap's default is 300 s
            "HIVE_ORCHESTRATOR_BACKOFF_BASE_SECONDS must not exceed "
            "HIVE_ORCHESTRATOR_BACKOFF_CAP_SECONDS",
        ),
        # Settings the other services would refuse: each was accepted, and every plan then
        # stayed PENDING (every discovery or every assignment refused).
        (
            {"WORKER_NAMESPACE": "Team_A"},
            "HIVE_ORCHESTRATOR_WORKER_NAMESPACE: must be a DNS label: 1-63 lowercase "
            "letters, digits or '-'",
        ),
        (
            {"ASSIGN_LEASE_SECONDS": "90000"},
            "HIVE_ORCHESTRATOR_ASSIGN_LEASE_SECONDS: Input should be less than or equal to 86400",
        ),
        *beyond_maximum_cases(),
    ],
)
def test_invalid_settings_are_named_by_their_environment_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"HIVE_ORCHESTRATOR_{name}", value)
    with pytest.raises(ValidationError) as exc:
        OrchestratorSettings()
    message = invalid_settings_message(PROGRAM, exc.value, "HIVE_ORCHESTRATOR_")
    assert message.splitlines() == [f"{PROGRAM}: invalid settings:", f"  {line}"]


def test_a_namespace_within_the_rule_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_ORCHESTRATOR_WORKER_NAMESPACE", "team-a")
    assert OrchestratorSettings().worker_namespace == "team-a"


def test_every_duration_at_its_maximum_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    durations = {n for n in OrchestratorSettings.model_fields if n.endswith(DURATION_SUFFIXES)}
    assert set(DURATION_MAXIMUMS) == {n.upper() for n in durations}  # none forgotten
    for name, maximum in DURATION_MAXIMUMS.items():
        monkeypatch.setenv(f"HIVE_ORCHESTRATOR_{name}", str(maximum))
    settings = OrchestratorSettings()
    for name, maximum in DURATION_MAXIMUMS.items():
        assert getattr(settings, name.lower()) == maximum
    assert settings.lease_ttl.total_seconds() == 86400
