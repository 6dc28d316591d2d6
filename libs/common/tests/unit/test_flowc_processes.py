"""hive_common.flowc_processes: the commands, environments, readiness and shutdown order it
builds for given ports, databases, secrets and options (no process is started)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hive_common import flowc_processes as flowc
from hive_common.flowc_processes import Endpoint, Launch, StackPorts, WorkerOptions
from hive_common.procstack import ProcessSpec

TICKETS = Endpoint(grpc_port=41001, http_port=41002, metrics_port=41003)
REGISTRY = Endpoint(grpc_port=42001, http_port=42002)
ORCHESTRATOR = Endpoint(grpc_port=43001, http_port=43002)
PORTS = StackPorts(registry=REGISTRY, tickets=TICKETS, orchestrator=ORCHESTRATOR)


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


LOOPBACK_NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def test_endpoint_addresses_are_on_loopback() -> None:
    assert TICKETS.grpc_target == "127.0.0.1:41001"
    assert TICKETS.http_url == "http://127.0.0.1:41002"
    assert TICKETS.ready_url == "http://127.0.0.1:41002/ready"


def test_default_ports_are_the_services_local_defaults_moved_by_the_offset() -> None:
    assert StackPorts.defaults().named() == {
        "registry_grpc": 50051,
        "registry_http": 8001,
        "tickets_grpc": 50052,
        "tickets_http": 8002,
        "tickets_metrics": 9092,
        "orchestrator_grpc": 50053,
        "orchestrator_http": 8003,
    }
    moved = StackPorts.defaults(100)
    assert moved.tickets == Endpoint(grpc_port=50152, http_port=8102, metrics_port=9192)
    assert moved.orchestrator.http_url == "http://127.0.0.1:8103"


def test_allocate_takes_seven_distinct_ports_from_the_picker() -> None:
    counter = itertools.count(30000)
    ports = StackPorts.allocate(lambda: next(counter))
    assert sorted(ports.named().values()) == list(range(30000, 30007))
    assert ports.registry.metrics_port == 0  # only the ticket service has a metrics port


def test_loopback_no_proxy_extends_an_existing_list() -> None:
    assert flowc.loopback_no_proxy({}) == LOOPBACK_NO_PROXY
    assert flowc.loopback_no_proxy({"NO_PROXY": "corp.example"}) == {
        "no_proxy": "corp.example,127.0.0.1,localhost",
        "NO_PROXY": "corp.example,127.0.0.1,localhost",
    }
    # The lower-case variable wins, as in the HTTP and gRPC clients.
    assert flowc.loopback_no_proxy({"no_proxy": "a", "NO_PROXY": "b"})["NO_PROXY"] == (
        "a,127.0.0.1,localhost"
    )


def test_launch_argv_is_python_dash_m_or_the_venv_console_script() -> None:
    assert Launch(python="/venv/bin/python").argv(flowc.TICKET_SERVICE) == [
        "/venv/bin/python",
        "-m",
        "execution_ticket_service",
    ]
    scripts = Launch(python="/venv/bin/python", console_scripts=True)
    assert scripts.argv(flowc.ORCHESTRATOR) == ["/venv/bin/orchestrator-dynamic"]
    assert scripts.argv(flowc.WORKER) == ["/venv/bin/hive-worker"]


def test_ticket_service_env_wires_ports_databases_secret_and_logging() -> None:
    env = flowc.ticket_service_env(
        endpoint=TICKETS,
        postgres_dsn="postgresql://pg/tickets",
        mongo_uri="mongodb://mongo",
        mongo_database="audit",
        jwt_secret="jwt",
        launch=Launch(log_level="WARNING", log_format="json"),
        settings={"MONGO_TIMEOUT_MS": 200, "LEASE_SWEEP_INTERVAL_SECONDS": 0.5},
    )
    assert env == LOOPBACK_NO_PROXY | {
        "HIVE_TICKETS_HOST": "127.0.0.1",
        "HIVE_TICKETS_GRPC_PORT": "41001",
        "HIVE_TICKETS_HTTP_PORT": "41002",
        "HIVE_TICKETS_METRICS_PORT": "41003",
        "HIVE_TICKETS_POSTGRES_DSN": "postgresql://pg/tickets",
        "HIVE_TICKETS_MONGO_URI": "mongodb://mongo",
        "HIVE_TICKETS_MONGO_DATABASE": "audit",
        "HIVE_TICKETS_JWT_SECRET": "jwt",
        "HIVE_TICKETS_LOG_LEVEL": "WARNING",
        "HIVE_TICKETS_LOG_FORMAT": "json",
        "HIVE_TICKETS_MONGO_TIMEOUT_MS": "200",
        "HIVE_TICKETS_LEASE_SWEEP_INTERVAL_SECONDS": "0.5",
    }


def test_logging_left_unset_and_no_metrics_port_leave_the_service_defaults() -> None:
    env = flowc.ticket_service_env(
        endpoint=Endpoint(grpc_port=1, http_port=2),
        postgres_dsn="pg",
        mongo_uri="mongo",
        mongo_database="db",
        jwt_secret="jwt",
        launch=Launch(),
    )
    assert "HIVE_TICKETS_METRICS_PORT" not in env
    assert "HIVE_TICKETS_LOG_LEVEL" not in env
    assert "HIVE_TICKETS_LOG_FORMAT" not in env


def test_settings_override_wiring_and_logging() -> None:
    env = flowc.registry_env(
        endpoint=REGISTRY,
        postgres_dsn="pg",
        jwt_secret="jwt",
        registration_secret="join",
        launch=Launch(log_level="INFO"),
        settings={"HOST": "0.0.0.0", "LOG_LEVEL": "DEBUG"},
    )
    assert env["HIVE_REGISTRY_HOST"] == "0.0.0.0"
    assert env["HIVE_REGISTRY_LOG_LEVEL"] == "DEBUG"


def test_registry_env() -> None:
    env = flowc.registry_env(
        endpoint=REGISTRY,
        postgres_dsn="postgresql://pg/registry",
        jwt_secret="jwt",
        registration_secret="join",
        launch=Launch(log_format="pretty"),
        settings={"HEARTBEAT_INTERVAL_SECONDS": 600},
    )
    assert env == LOOPBACK_NO_PROXY | {
        "HIVE_REGISTRY_HOST": "127.0.0.1",
        "HIVE_REGISTRY_GRPC_PORT": "42001",
        "HIVE_REGISTRY_HTTP_PORT": "42002",
        "HIVE_REGISTRY_POSTGRES_DSN": "postgresql://pg/registry",
        "HIVE_REGISTRY_JWT_SECRET": "jwt",
        "HIVE_REGISTRY_REGISTRATION_SECRET": "join",
        "HIVE_REGISTRY_LOG_FORMAT": "pretty",
        "HIVE_REGISTRY_HEARTBEAT_INTERVAL_SECONDS": "600",
    }


def test_orchestrator_env_points_at_the_other_services() -> None:
    env = flowc.orchestrator_env(
        endpoint=ORCHESTRATOR,
        postgres_dsn="postgresql://pg/orchestrator",
        tickets_target=TICKETS.grpc_target,
        registry_target=REGISTRY.grpc_target,
        jwt_secret="jwt",
        launch=Launch(),
    )
    assert env == LOOPBACK_NO_PROXY | {
        "HIVE_ORCHESTRATOR_HOST": "127.0.0.1",
        "HIVE_ORCHESTRATOR_GRPC_PORT": "43001",
        "HIVE_ORCHESTRATOR_HTTP_PORT": "43002",
        "HIVE_ORCHESTRATOR_POSTGRES_DSN": "postgresql://pg/orchestrator",
        "HIVE_ORCHESTRATOR_TICKET_SERVICE_TARGET": "127.0.0.1:41001",
        "HIVE_ORCHESTRATOR_REGISTRY_TARGET": "127.0.0.1:42001",
        "HIVE_ORCHESTRATOR_JWT_SECRET": "jwt",
    }


def test_worker_env_has_no_host_and_joins_capabilities_and_labels() -> None:
    worker = WorkerOptions(
        name="w1",
        capabilities=("python", "shell"),
        labels={"stack": "dev", "worker": "1"},
        max_concurrent=8,
        settings={"SHELL_ALLOW_LIST": "echo,true", "DRAIN_GRACE_SECONDS": 10},
    )
    env = flowc.worker_env(
        worker,
        tickets_target="127.0.0.1:41001",
        registry_target="127.0.0.1:42001",
        registration_secret="join",
        launch=Launch(log_level="INFO", log_format="json"),
    )
    assert env == LOOPBACK_NO_PROXY | {
        "HIVE_WORKER_NAME": "w1",
        "HIVE_WORKER_CAPABILITIES": "python,shell",
        "HIVE_WORKER_LABELS": "stack=dev,worker=1",
        "HIVE_WORKER_MAX_CONCURRENT": "8",
        "HIVE_WORKER_REGISTRY_TARGET": "127.0.0.1:42001",
        "HIVE_WORKER_TICKETS_TARGET": "127.0.0.1:41001",
        "HIVE_WORKER_REGISTRATION_SECRET": "join",
        "HIVE_WORKER_SHELL_ALLOW_LIST": "echo,true",
        "HIVE_WORKER_DRAIN_GRACE_SECONDS": "10",
        "HIVE_WORKER_LOG_LEVEL": "INFO",
        "HIVE_WORKER_LOG_FORMAT": "json",
    }
    bare = flowc.worker_env(
        WorkerOptions(name="w2"),
        tickets_target="t",
        registry_target="r",
        registration_secret="s",
        launch=Launch(),
    )
    assert bare["HIVE_WORKER_CAPABILITIES"] == "python"
    assert "HIVE_WORKER_LABELS" not in bare
    assert "HIVE_WORKER_MAX_CONCURRENT" not in bare


def flow(launch: Launch) -> list[ProcessSpec]:
    return flowc.flow_specs(
        ports=PORTS,
        tickets_dsn="pg/tickets",
        registry_dsn="pg/registry",
        orchestrator_dsn="pg/orchestrator",
        mongo_uri="mongodb://mongo",
        mongo_database="audit",
        jwt_secret="jwt",
        registration_secret="join",
        workers=[WorkerOptions(name="worker-1"), WorkerOptions(name="worker-2")],
        launch=launch,
        tickets_settings={"DEFAULT_LEASE_SECONDS": 2},
        registry_settings={"EXPIRE_AFTER_SECONDS": 6},
        orchestrator_settings={"CLAIM_INTERVAL_SECONDS": 0.3},
    )


def test_flow_specs_names_order_tiers_and_launch_options() -> None:
    launch = Launch(python="/venv/bin/python", stop_grace=20, ready_timeout=90, cwd=Path("/w"))
    specs = flow(launch)
    assert [(s.name, s.tier) for s in specs] == [
        ("service-registry", 0),
        ("execution-ticket-service", 0),
        ("orchestrator-dynamic", 1),
        ("worker-1", 2),
        ("worker-2", 2),
    ]
    assert [list(s.argv)[-1] for s in specs] == [
        "service_registry",
        "execution_ticket_service",
        "orchestrator_dynamic",
        "hive_worker",
        "hive_worker",
    ]
    assert {(s.stop_grace, s.ready_timeout, s.cwd) for s in specs} == {(20, 90, Path("/w"))}
    assert all(s.ready is not None for s in specs)


def test_flow_specs_wire_each_service_to_its_database_and_the_others() -> None:
    registry, tickets, orchestrator, worker, _ = flow(Launch())
    assert registry.env["HIVE_REGISTRY_POSTGRES_DSN"] == "pg/registry"
    assert registry.env["HIVE_REGISTRY_EXPIRE_AFTER_SECONDS"] == "6"
    assert tickets.env["HIVE_TICKETS_POSTGRES_DSN"] == "pg/tickets"
    assert tickets.env["HIVE_TICKETS_DEFAULT_LEASE_SECONDS"] == "2"
    assert tickets.env["HIVE_TICKETS_METRICS_PORT"] == "41003"
    assert orchestrator.env["HIVE_ORCHESTRATOR_POSTGRES_DSN"] == "pg/orchestrator"
    assert orchestrator.env["HIVE_ORCHESTRATOR_TICKET_SERVICE_TARGET"] == "127.0.0.1:41001"
    assert orchestrator.env["HIVE_ORCHESTRATOR_REGISTRY_TARGET"] == "127.0.0.1:42001"
    assert orchestrator.env["HIVE_ORCHESTRATOR_CLAIM_INTERVAL_SECONDS"] == "0.3"
    assert worker.env["HIVE_WORKER_TICKETS_TARGET"] == "127.0.0.1:41001"
    assert worker.env["HIVE_WORKER_REGISTRY_TARGET"] == "127.0.0.1:42001"
    assert worker.env["HIVE_WORKER_REGISTRATION_SECRET"] == "join"
    # Settings of one service never leak into another's environment.
    assert not any("DEFAULT_LEASE" in key for key in registry.env)


@pytest.mark.parametrize(
    ("asked", "worker_level"),
    [(None, "INFO"), ("WARNING", "INFO"), ("error", "INFO"), ("INFO", "INFO"), ("debug", "DEBUG")],
)
def test_workers_log_their_registration_whatever_the_stack_log_level(
    asked: str | None, worker_level: str
) -> None:
    """A worker is ready once it logged "worker registered" (at INFO): a stack started at
    WARNING never saw its workers ready. The services keep the level asked for."""
    registry, *_, worker, _ = flow(Launch(log_level=asked))
    assert worker.env["HIVE_WORKER_LOG_LEVEL"] == worker_level
    assert registry.env.get("HIVE_REGISTRY_LOG_LEVEL") == asked


def test_a_spec_can_take_another_name() -> None:
    launch = Launch(console_scripts=True, python="/venv/bin/python")
    env = flowc.ticket_service_env(
        endpoint=TICKETS,
        postgres_dsn="pg",
        mongo_uri="mongo",
        mongo_database="db",
        jwt_secret="jwt",
        launch=launch,
    )
    spec = flowc.service_spec(
        flowc.TICKET_SERVICE,
        name="execution-ticket-service-relay-idle",
        endpoint=TICKETS,
        env=env,
        launch=launch,
    )
    assert spec.name == "execution-ticket-service-relay-idle"
    assert list(spec.argv) == ["/venv/bin/execution-ticket-service"]
