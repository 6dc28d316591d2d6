"""OrchestratorSettings: invalid settings, rules across settings too, are named by their
environment variables.

Rules across settings used to name Python fields ("lease_renew_interval_seconds must be
below lease_ttl_seconds"), where every other invalid setting is named by its variable.
Durations had no upper bound: HIVE_ORCHESTRATOR_LEASE_TTL_SECONDS=inf was a traceback.
"""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from hive_common.config import invalid_settings_message
from hive_testsupport.durations import at_their_maximums, beyond_maximum_cases
from orchestrator_dynamic.config import OrchestratorSettings

PROGRAM = "orchestrator-dynamic"

DURATION_MAXIMUMS = {
    "startup_timeout_seconds": 86400,
    "shutdown_grace_seconds": 3600,
    "http_keep_alive_seconds": 3600,
    "rpc_timeout_seconds": 3600,
    "rpc_deadline_seconds": 3600,
    "service_token_ttl_seconds": 30 * 86400,
    "backoff_base_seconds": 86400,
    "backoff_cap_seconds": 86400,
    "assign_lease_seconds": 86400,
    "dispatch_retry_seconds": 86400,
    "discovery_cache_seconds": 60,
    "resync_interval_seconds": 86400,
    "error_retry_seconds": 3600,
    "lease_ttl_seconds": 86400,
    "lease_renew_interval_seconds": 3600,
    "claim_interval_seconds": 86400,
    "submit_wait_seconds": 3600,
    "readiness_interval_seconds": 86400,
    "watch_plan_interval_seconds": 60,
}
"""Every duration setting and its largest value."""


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
        *beyond_maximum_cases(OrchestratorSettings, DURATION_MAXIMUMS, "HIVE_ORCHESTRATOR_"),
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
    settings = at_their_maximums(
        OrchestratorSettings, DURATION_MAXIMUMS, "HIVE_ORCHESTRATOR_", monkeypatch
    )
    assert isinstance(settings, OrchestratorSettings)
    assert settings.lease_ttl.total_seconds() == 86400


def test_every_rule_across_settings_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each showed up only once the one before it was fixed.
    for name, value in {
        "POSTGRES_POOL_MIN_SIZE": "30",
        "LEASE_RENEW_INTERVAL_SECONDS": "40",
        "BACKOFF_BASE_SECONDS": "500",
    }.items():
        monkeypatch.setenv(f"HIVE_ORCHESTRATOR_{name}", value)
    with pytest.raises(ValidationError) as exc:
        OrchestratorSettings()
    message = invalid_settings_message(PROGRAM, exc.value, "HIVE_ORCHESTRATOR_")
    assert message.splitlines() == [
        f"{PROGRAM}: invalid settings:",
        "  HIVE_ORCHESTRATOR_POSTGRES_POOL_MIN_SIZE must not exceed "
        "HIVE_ORCHESTRATOR_POSTGRES_POOL_MAX_SIZE",
        "  HIVE_ORCHESTRATOR_LEASE_RENEW_INTERVAL_SECONDS must be below "
        "HIVE_ORCHESTRATOR_LEASE_TTL_SECONDS",
        "  HIVE_ORCHESTRATOR_BACKOFF_BASE_SECONDS must not exceed "
        "HIVE_ORCHESTRATOR_BACKOFF_CAP_SECONDS",
    ]


@pytest.mark.parametrize("token", ["a b", "tab\there", "tökén", "line\nbreak"])
def test_an_api_token_no_client_can_send_is_refused(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    # It was accepted, and every request then got 401: "Authorization: Bearer a b" is
    # not a bearer token (the hive CLI refuses to send it).
    monkeypatch.setenv("HIVE_ORCHESTRATOR_API_TOKEN", token)
    with pytest.raises(ValidationError) as exc:
        OrchestratorSettings()
    message = invalid_settings_message(PROGRAM, exc.value, "HIVE_ORCHESTRATOR_")
    assert message.splitlines() == [
        f"{PROGRAM}: invalid settings:",
        "  HIVE_ORCHESTRATOR_API_TOKEN: must be printable ASCII without whitespace "
        "(clients send it as 'Authorization: Bearer <token>')",
    ]


def test_an_api_token_a_client_can_send_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_ORCHESTRATOR_API_TOKEN", "s3cret-Token_~+/=")
    token = OrchestratorSettings().api_token
    assert token is not None
    assert token.get_secret_value() == "s3cret-Token_~+/="
