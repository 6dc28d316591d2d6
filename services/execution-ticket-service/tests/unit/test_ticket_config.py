"""TicketSettings: invalid settings, rules across settings too, refused at start with the
variables' names.

A default above its maximum used to be accepted, then every request relying on it was
refused (INVALID_ARGUMENT, blaming a field the client never set); a pool minimum above
its maximum ended in a traceback from psycopg_pool. Durations had no upper bound: ``inf``
or 10^12 s was accepted, then overflowed (a traceback at start-up, every AssignTicket
INTERNAL, or a purge failing every round).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from execution_ticket_service.config import MAX_TIMEOUT_SECONDS, TicketSettings
from hive_common.config import invalid_settings_message
from hive_common.entrypoint import EXIT_INVALID_SETTINGS, run_service
from hive_testsupport.durations import at_their_maximums, beyond_maximum_cases

PROGRAM = "execution-ticket-service"

DURATION_MAXIMUMS = {
    "startup_timeout_seconds": 86400,
    "shutdown_grace_seconds": 3600,
    "http_keep_alive_seconds": 3600,
    "mongo_timeout_ms": 3_600_000,
    "default_timeout_seconds": MAX_TIMEOUT_SECONDS,
    "default_lease_seconds": 86400,
    "max_lease_seconds": 86400,
    "default_token_ttl_seconds": 30 * 86400,
    "max_token_ttl_seconds": 30 * 86400,
    "lease_sweep_interval_seconds": 86400,
    "lease_grace_seconds": 86400,
    "relay_idle_interval_seconds": 60,
    "relay_batch_window_seconds": 60,
    "relay_max_backoff_seconds": 3600,
    "stats_interval_seconds": 86400,
    "watch_poll_interval_seconds": 60,
    "watch_read_gap_seconds": 60,
    "readiness_interval_seconds": 86400,
    "event_retention_hours": 5 * 365 * 24,
    "event_purge_interval_seconds": 86400,
}
"""Every duration setting and its largest value."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ambient HIVE_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("HIVE_"):
            monkeypatch.delenv(name)


def refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    """The lines the service prints for these ``HIVE_TICKETS_*`` variables, headline off."""
    for name, value in env.items():
        monkeypatch.setenv(f"HIVE_TICKETS_{name}", value)
    with pytest.raises(ValidationError) as exc:
        TicketSettings()
    headline, *lines = invalid_settings_message(PROGRAM, exc.value, "HIVE_TICKETS_").splitlines()
    assert headline == f"{PROGRAM}: invalid settings:"
    return lines


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"POSTGRES_POOL_MIN_SIZE": "25"},  # the maximum's default is 20
            "HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed "
            "HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE",
        ),
        (
            {"POSTGRES_POOL_MIN_SIZE": "5", "POSTGRES_POOL_MAX_SIZE": "4"},
            "HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed "
            "HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE",
        ),
        (
            {"DEFAULT_LEASE_SECONDS": "7200", "MAX_LEASE_SECONDS": "3600"},
            "HIVE_TICKETS_DEFAULT_LEASE_SECONDS must not exceed HIVE_TICKETS_MAX_LEASE_SECONDS",
        ),
        (
            {"MAX_LEASE_SECONDS": "30"},  # below the default lease, 60
            "HIVE_TICKETS_DEFAULT_LEASE_SECONDS must not exceed HIVE_TICKETS_MAX_LEASE_SECONDS",
        ),
        (
            {"DEFAULT_TOKEN_TTL_SECONDS": "100000"},
            "HIVE_TICKETS_DEFAULT_TOKEN_TTL_SECONDS must not exceed "
            "HIVE_TICKETS_MAX_TOKEN_TTL_SECONDS",
        ),
        (
            {"MAX_TOKEN_TTL_SECONDS": "600"},  # below the default TTL, 3600
            "HIVE_TICKETS_DEFAULT_TOKEN_TTL_SECONDS must not exceed "
            "HIVE_TICKETS_MAX_TOKEN_TTL_SECONDS",
        ),
        (
            {"DEFAULT_TIMEOUT_SECONDS": "700000"},  # a ticket's timeout is at most 7 days
            f"HIVE_TICKETS_DEFAULT_TIMEOUT_SECONDS: Input should be less than or equal to "
            f"{MAX_TIMEOUT_SECONDS}",
        ),
        *beyond_maximum_cases(TicketSettings, DURATION_MAXIMUMS, "HIVE_TICKETS_"),
    ],
)
def test_invalid_settings_are_refused_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    assert refusal(monkeypatch, **env) == [f"  {line}"]


def test_leases_of_10_to_the_12_seconds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Accepted before, then every AssignTicket relying on the default answered INTERNAL
    # ("date value out of range").
    assert refusal(
        monkeypatch, DEFAULT_LEASE_SECONDS=str(10**12), MAX_LEASE_SECONDS=str(10**12)
    ) == [
        "  HIVE_TICKETS_DEFAULT_LEASE_SECONDS: Input should be less than or equal to 86400",
        "  HIVE_TICKETS_MAX_LEASE_SECONDS: Input should be less than or equal to 86400",
    ]


def test_every_duration_at_its_maximum_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    at_their_maximums(TicketSettings, DURATION_MAXIMUMS, "HIVE_TICKETS_", monkeypatch)


def test_defaults_up_to_their_maximums_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "POSTGRES_POOL_MIN_SIZE": "20",
        "DEFAULT_LEASE_SECONDS": "86400",
        "DEFAULT_TOKEN_TTL_SECONDS": "86400",
        "DEFAULT_TIMEOUT_SECONDS": str(MAX_TIMEOUT_SECONDS),
    }.items():
        monkeypatch.setenv(f"HIVE_TICKETS_{name}", value)
    limits = TicketSettings().limits()
    assert limits.default_lease_seconds == limits.max_lease_seconds == 86400
    assert limits.default_token_ttl_seconds == limits.max_token_ttl_seconds == 86400
    assert limits.default_timeout_seconds == limits.max_timeout_seconds == MAX_TIMEOUT_SECONDS
    assert TicketSettings(postgres_pool_min_size=3, postgres_pool_max_size=3)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"POSTGRES_POOL_MIN_SIZE": "25"},
            "HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed "
            "HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE",
        ),
        # Each a traceback (exit 1) at start-up or later, before durations were bounded.
        (
            {"LEASE_GRACE_SECONDS": "inf"},
            "HIVE_TICKETS_LEASE_GRACE_SECONDS: Input should be a finite number",
        ),
        (
            {"EVENT_RETENTION_HOURS": "100000000"},
            "HIVE_TICKETS_EVENT_RETENTION_HOURS: Input should be less than or equal to 43800",
        ),
    ],
)
def test_the_console_script_exits_2_with_one_line_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    line: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"HIVE_TICKETS_{name}", value)

    async def serve(settings: TicketSettings, logger: Any) -> None:
        raise AssertionError("must not start")

    assert run_service(TicketSettings, serve, program=PROGRAM) == EXIT_INVALID_SETTINGS
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"{PROGRAM}: invalid settings:", f"  {line}"]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("foo://x", "Invalid URI scheme"),
        ("mongodb://h:99999", "Port must be an integer between 0 and 65535"),
        ("mongodb://", "Must provide at least one hostname or IP"),
        ("mongodb+srv://a.example.com:27017", "a mongodb+srv:// URI names one host, no port"),
        ("mongodb+srv://a.example.com,b.example.com", "names one host"),
    ],
)
def test_a_malformed_mongo_uri_is_an_invalid_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], uri: str, reason: str
) -> None:
    # The client parsed it only when built, after the migrations: a traceback, exit 1.
    monkeypatch.setenv("HIVE_TICKETS_MONGO_URI", uri)

    async def serve(settings: TicketSettings, logger: Any) -> None:
        raise AssertionError("must not start")

    assert run_service(TicketSettings, serve, program=PROGRAM) == EXIT_INVALID_SETTINGS
    [_header, line] = capsys.readouterr().err.splitlines()
    assert line.startswith("  HIVE_TICKETS_MONGO_URI: not a MongoDB URI: ")
    assert reason in line


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://localhost:27017",
        "mongodb://u:p@h1,h2:27018/db?replicaSet=rs&authSource=admin",
        "mongodb+srv://cluster0.example.com/?retryWrites=true",  # hosts from DNS, later
    ],
)
def test_mongo_uris_the_client_takes_are_accepted(uri: str) -> None:
    assert TicketSettings(mongo_uri=uri).mongo_uri.get_secret_value() == uri


def test_database_addresses_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both usually carry a password; the DSN was a plain string shown by repr(settings).
    monkeypatch.setenv("HIVE_TICKETS_POSTGRES_DSN", "postgresql://hive:pg-password@db/tickets")
    monkeypatch.setenv("HIVE_TICKETS_MONGO_URI", "mongodb://audit:mongo-password@mongo:27017")
    settings = TicketSettings()
    assert "password" not in repr(settings)
    assert settings.mongo_uri.get_secret_value() == "mongodb://audit:mongo-password@mongo:27017"


def test_every_rule_across_settings_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each showed up only once the one before it was fixed.
    assert refusal(
        monkeypatch,
        POSTGRES_POOL_MIN_SIZE="25",
        MAX_LEASE_SECONDS="30",
        MAX_TOKEN_TTL_SECONDS="600",
    ) == [
        "  HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE must not exceed HIVE_TICKETS_POSTGRES_POOL_MAX_SIZE",
        "  HIVE_TICKETS_DEFAULT_LEASE_SECONDS must not exceed HIVE_TICKETS_MAX_LEASE_SECONDS",
        "  HIVE_TICKETS_DEFAULT_TOKEN_TTL_SECONDS must not exceed "
        "HIVE_TICKETS_MAX_TOKEN_TTL_SECONDS",
    ]
