"""The environments built by hive_common.flowc_processes (which may not import the services)
are read by the services' and the worker's settings classes as meant: every variable name
and prefix matches a field, and a wrong name would leave the field at its default."""

from __future__ import annotations

import os

import pytest

from execution_ticket_service.config import TicketSettings
from hive_common import flowc_processes as flowc
from hive_common.flowc_processes import Endpoint, Launch, WorkerOptions
from hive_worker.config import WorkerSettings
from orchestrator_dynamic.config import OrchestratorSettings
from service_registry.config import RegistrySettings

LAUNCH = Launch(log_level="WARNING", log_format="json")


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Only what a test sets: no HIVE_* variable of the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("HIVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def apply(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_ticket_service_reads_every_variable(environ: pytest.MonkeyPatch) -> None:
    apply(
        environ,
        flowc.ticket_service_env(
            endpoint=Endpoint(grpc_port=41001, http_port=41002, metrics_port=41003),
            postgres_dsn="postgresql://pg/tickets",
            mongo_uri="mongodb://mongo:27017",
            mongo_database="audit",
            jwt_secret="jwt-secret-for-the-env-test-0123456789",
            launch=LAUNCH,
            settings={"MONGO_TIMEOUT_MS": 321, "DEFAULT_LEASE_SECONDS": 7},
        ),
    )
    settings = TicketSettings()
    assert (settings.host, settings.grpc_port, settings.http_port, settings.metrics_port) == (
        "127.0.0.1",
        41001,
        41002,
        41003,
    )
    assert settings.postgres_dsn.get_secret_value() == "postgresql://pg/tickets"
    assert (settings.mongo_uri.get_secret_value(), settings.mongo_database) == (
        "mongodb://mongo:27017",
        "audit",
    )
    assert settings.jwt_secret.get_secret_value() == "jwt-secret-for-the-env-test-0123456789"
    assert (settings.log_level, settings.log_format) == ("WARNING", "json")
    assert (settings.mongo_timeout_ms, settings.default_lease_seconds) == (321, 7)


def test_registry_reads_every_variable(environ: pytest.MonkeyPatch) -> None:
    apply(
        environ,
        flowc.registry_env(
            endpoint=Endpoint(grpc_port=42001, http_port=42002),
            postgres_dsn="postgresql://pg/registry",
            jwt_secret="jwt-secret-for-the-env-test-0123456789",
            registration_secret="join-the-hive-secret",
            launch=LAUNCH,
            settings={"HEARTBEAT_INTERVAL_SECONDS": 600, "EXPIRE_AFTER_SECONDS": 6000},
        ),
    )
    settings = RegistrySettings()
    assert (settings.host, settings.grpc_port, settings.http_port) == ("127.0.0.1", 42001, 42002)
    assert settings.postgres_dsn.get_secret_value() == "postgresql://pg/registry"
    assert settings.jwt_secret.get_secret_value() == "jwt-secret-for-the-env-test-0123456789"
    assert settings.registration_secret is not None
    assert settings.registration_secret.get_secret_value() == "join-the-hive-secret"
    assert (settings.log_level, settings.log_format) == ("WARNING", "json")
    assert (settings.heartbeat_interval_seconds, settings.expire_after_seconds) == (600, 6000)


def test_orchestrator_reads_every_variable(environ: pytest.MonkeyPatch) -> None:
    apply(
        environ,
        flowc.orchestrator_env(
            endpoint=Endpoint(grpc_port=43001, http_port=43002),
            postgres_dsn="postgresql://pg/orchestrator",
            tickets_target="127.0.0.1:41001",
            registry_target="127.0.0.1:42001",
            jwt_secret="jwt-secret-for-the-env-test-0123456789",
            launch=LAUNCH,
            settings={"CLAIM_INTERVAL_SECONDS": 0.3},
        ),
    )
    settings = OrchestratorSettings()
    assert (settings.host, settings.grpc_port, settings.http_port) == ("127.0.0.1", 43001, 43002)
    assert settings.postgres_dsn.get_secret_value() == "postgresql://pg/orchestrator"
    assert settings.ticket_service_target == "127.0.0.1:41001"
    assert settings.registry_target == "127.0.0.1:42001"
    assert settings.jwt_secret.get_secret_value() == "jwt-secret-for-the-env-test-0123456789"
    assert (settings.log_level, settings.log_format) == ("WARNING", "json")
    assert settings.claim_interval_seconds == 0.3


def test_worker_reads_every_variable(environ: pytest.MonkeyPatch) -> None:
    apply(
        environ,
        flowc.worker_env(
            WorkerOptions(
                name="worker-1",
                capabilities=("python", "shell"),
                labels={"stack": "dev", "worker": "1"},
                max_concurrent=8,
                settings={"SHELL_ALLOW_LIST": "echo,true", "DRAIN_GRACE_SECONDS": 2},
            ),
            tickets_target="127.0.0.1:41001",
            registry_target="127.0.0.1:42001",
            registration_secret="join-the-hive-secret",
            launch=LAUNCH,
        ),
    )
    settings = WorkerSettings()
    assert settings.name == "worker-1"
    assert settings.capabilities == ["python", "shell"]
    assert settings.labels == {"stack": "dev", "worker": "1"}
    assert settings.max_concurrent == 8
    assert (settings.tickets_target, settings.registry_target) == (
        "127.0.0.1:41001",
        "127.0.0.1:42001",
    )
    assert settings.registration_secret is not None
    assert settings.registration_secret.get_secret_value() == "join-the-hive-secret"
    assert settings.shell_allow_list == ["echo", "true"]
    assert settings.drain_grace_seconds == 2
    assert (settings.log_level, settings.log_format) == ("WARNING", "json")
