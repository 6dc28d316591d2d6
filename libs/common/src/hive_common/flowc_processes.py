"""How to run Flow C's services and reference workers as OS processes: one place for their
commands, environment variables, ports, readiness checks and shutdown order.

The dev stack (``scripts/dev-stack.py``), the integration tests
(``tests/integration/conftest.py``) and the benchmarks (``bench/stack.py``) build their
:class:`~hive_common.procstack.ProcessSpec` s here and pass what differs between them
(ports, databases, secrets, log level and format, tuning settings, worker options) as
parameters. Only environments are built: nothing here imports the services' packages, so the
names below must follow each service's ``config.py`` (its env prefix and field names).

Tuning settings are given without the prefix, as a mapping from the upper-case field name
to a value (``{"DEFAULT_LEASE_SECONDS": 2}``); values become strings with ``str``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hive_common.procstack import ProcessSpec, http_ready, log_ready

__all__ = [
    "LOOPBACK",
    "ORCHESTRATOR",
    "REGISTRY",
    "TICKET_SERVICE",
    "WORKER",
    "WORKER_READY_PATTERN",
    "Endpoint",
    "Launch",
    "Program",
    "StackPorts",
    "WorkerOptions",
    "flow_specs",
    "loopback_no_proxy",
    "orchestrator_env",
    "prefixed",
    "registry_env",
    "service_spec",
    "ticket_service_env",
    "worker_env",
    "worker_spec",
]

LOOPBACK = "127.0.0.1"
WORKER_READY_PATTERN = "worker registered"
"""What a reference worker logs once the registry accepted it (its readiness)."""

Settings = Mapping[str, object]
_NO_SETTINGS: Settings = {}


@dataclass(frozen=True, slots=True)
class Program:
    """One runnable of the workspace: its console script (also the default process name),
    its package for ``python -m`` and the prefix of the environment variables it reads."""

    name: str
    module: str
    env_prefix: str


TICKET_SERVICE = Program("execution-ticket-service", "execution_ticket_service", "HIVE_TICKETS_")
REGISTRY = Program("service-registry", "service_registry", "HIVE_REGISTRY_")
ORCHESTRATOR = Program("orchestrator-dynamic", "orchestrator_dynamic", "HIVE_ORCHESTRATOR_")
WORKER = Program("hive-worker", "hive_worker", "HIVE_WORKER_")

# Shutdown order of ProcessStack.stop_all (highest tier first): workers, then the orchestrator
# (a client of the other two), then the services.
_SERVICE_TIER = 0
_ORCHESTRATOR_TIER = 1
_WORKER_TIER = 2


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one process listens on loopback (0: not used)."""

    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC server."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def ready_url(self) -> str:
        """The HTTP readiness endpoint (200 once the service can serve)."""
        return f"{self.http_url}/ready"


@dataclass(frozen=True, slots=True)
class StackPorts:
    """Where each of the three services listens."""

    registry: Endpoint
    tickets: Endpoint
    orchestrator: Endpoint

    @classmethod
    def defaults(cls, offset: int = 0) -> StackPorts:
        """The services' local defaults (see each ``config.py``) moved by ``offset``."""
        return cls(
            registry=Endpoint(grpc_port=50051 + offset, http_port=8001 + offset),
            tickets=Endpoint(
                grpc_port=50052 + offset, http_port=8002 + offset, metrics_port=9092 + offset
            ),
            orchestrator=Endpoint(grpc_port=50053 + offset, http_port=8003 + offset),
        )

    @classmethod
    def allocate(cls, port: Callable[[], int]) -> StackPorts:
        """Every port from ``port()`` (e.g. a free-port picker)."""
        return cls(
            registry=Endpoint(grpc_port=port(), http_port=port()),
            tickets=Endpoint(grpc_port=port(), http_port=port(), metrics_port=port()),
            orchestrator=Endpoint(grpc_port=port(), http_port=port()),
        )

    def named(self) -> dict[str, int]:
        """Every port by a readable name (``tickets_grpc`` ...), for messages and checks."""
        ports: dict[str, int] = {}
        for service, endpoint in (
            ("registry", self.registry),
            ("tickets", self.tickets),
            ("orchestrator", self.orchestrator),
        ):
            for kind, port in (
                ("grpc", endpoint.grpc_port),
                ("http", endpoint.http_port),
                ("metrics", endpoint.metrics_port),
            ):
                if port:
                    ports[f"{service}_{kind}"] = port
        return ports


@dataclass(frozen=True, slots=True)
class Launch:
    """What every process of one stack shares: how it is started and logs, and how long
    the supervisor waits for it.

    ``console_scripts`` runs the workspace venv's console scripts (next to ``python``), so
    the supervised pid is the program's own; otherwise ``python -m <package>``.
    ``log_level`` / ``log_format`` of None leave the programs' defaults.
    """

    python: str = field(default_factory=lambda: sys.executable)
    console_scripts: bool = False
    log_level: str | None = None
    log_format: str | None = None
    ready_timeout: float = 60.0
    stop_grace: float = 10.0
    cwd: Path | None = None

    def argv(self, program: Program) -> list[str]:
        """The command that runs ``program``."""
        if self.console_scripts:
            return [str(Path(self.python).parent / program.name)]
        return [self.python, "-m", program.module]

    def logging(self) -> dict[str, object]:
        """The logging settings (unprefixed) that are set."""
        values: dict[str, object] = {}
        if self.log_level is not None:
            values["LOG_LEVEL"] = self.log_level
        if self.log_format is not None:
            values["LOG_FORMAT"] = self.log_format
        return values


def loopback_no_proxy(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``no_proxy`` / ``NO_PROXY`` extended with loopback: gRPC and HTTP clients honour
    ``http_proxy`` from the environment, which must not capture calls between local
    processes. ``environ`` defaults to ``os.environ``."""
    source = os.environ if environ is None else environ
    existing = source.get("no_proxy") or source.get("NO_PROXY") or ""
    value = ",".join(filter(None, [existing, f"{LOOPBACK},localhost"]))
    return {"no_proxy": value, "NO_PROXY": value}


def prefixed(prefix: str, values: Settings) -> dict[str, str]:
    """``{prefix + name: str(value)}`` for every item."""
    return {f"{prefix}{name}": str(value) for name, value in values.items()}


def _program_env(program: Program, launch: Launch, *layers: Settings) -> dict[str, str]:
    merged: dict[str, object] = dict(launch.logging())
    for layer in layers:
        merged.update(layer)
    return loopback_no_proxy() | prefixed(program.env_prefix, merged)


def _service_wiring(endpoint: Endpoint, postgres_dsn: str, jwt_secret: str) -> dict[str, object]:
    """What every service is given: where to listen, its database, the JWT secret."""
    return {
        "HOST": LOOPBACK,
        "GRPC_PORT": endpoint.grpc_port,
        "HTTP_PORT": endpoint.http_port,
        "POSTGRES_DSN": postgres_dsn,
        "JWT_SECRET": jwt_secret,
    }


def ticket_service_env(
    *,
    endpoint: Endpoint,
    postgres_dsn: str,
    mongo_uri: str,
    mongo_database: str,
    jwt_secret: str,
    launch: Launch,
    settings: Settings = _NO_SETTINGS,
) -> dict[str, str]:
    """The ticket service's environment (``HIVE_TICKETS_*``); ``settings`` win."""
    wiring = _service_wiring(endpoint, postgres_dsn, jwt_secret)
    wiring |= {"MONGO_URI": mongo_uri, "MONGO_DATABASE": mongo_database}
    if endpoint.metrics_port:
        wiring["METRICS_PORT"] = endpoint.metrics_port
    return _program_env(TICKET_SERVICE, launch, wiring, settings)


def registry_env(
    *,
    endpoint: Endpoint,
    postgres_dsn: str,
    jwt_secret: str,
    registration_secret: str,
    launch: Launch,
    settings: Settings = _NO_SETTINGS,
) -> dict[str, str]:
    """The service registry's environment (``HIVE_REGISTRY_*``); ``settings`` win."""
    wiring = _service_wiring(endpoint, postgres_dsn, jwt_secret)
    wiring["REGISTRATION_SECRET"] = registration_secret
    return _program_env(REGISTRY, launch, wiring, settings)


def orchestrator_env(
    *,
    endpoint: Endpoint,
    postgres_dsn: str,
    tickets_target: str,
    registry_target: str,
    jwt_secret: str,
    launch: Launch,
    settings: Settings = _NO_SETTINGS,
) -> dict[str, str]:
    """The orchestrator's environment (``HIVE_ORCHESTRATOR_*``); ``settings`` win."""
    wiring = _service_wiring(endpoint, postgres_dsn, jwt_secret)
    wiring |= {"TICKET_SERVICE_TARGET": tickets_target, "REGISTRY_TARGET": registry_target}
    return _program_env(ORCHESTRATOR, launch, wiring, settings)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """One reference worker: its name, what it offers and any further settings
    (unprefixed ``HIVE_WORKER_*`` names, e.g. ``{"SHELL_ALLOW_LIST": "echo,true"}``)."""

    name: str
    capabilities: Sequence[str] = ("python",)
    labels: Mapping[str, str] = field(default_factory=dict)
    max_concurrent: int | None = None
    settings: Settings = field(default_factory=dict)


def worker_env(
    worker: WorkerOptions,
    *,
    tickets_target: str,
    registry_target: str,
    registration_secret: str,
    launch: Launch,
) -> dict[str, str]:
    """A reference worker's environment (``HIVE_WORKER_*``); the worker's settings win.

    Workers only make outgoing calls: no host or ports.
    """
    wiring: dict[str, object] = {
        "NAME": worker.name,
        "CAPABILITIES": ",".join(worker.capabilities),
        "REGISTRY_TARGET": registry_target,
        "TICKETS_TARGET": tickets_target,
        "REGISTRATION_SECRET": registration_secret,
    }
    if worker.labels:
        wiring["LABELS"] = ",".join(f"{key}={value}" for key, value in worker.labels.items())
    if worker.max_concurrent is not None:
        wiring["MAX_CONCURRENT"] = worker.max_concurrent
    return _program_env(WORKER, launch, wiring, worker.settings)


def service_spec(
    program: Program,
    *,
    endpoint: Endpoint,
    env: dict[str, str],
    launch: Launch,
    name: str | None = None,
) -> ProcessSpec:
    """A service (``env`` from its ``*_env`` function) as a process, ready once its HTTP
    ``/ready`` answers 200; the orchestrator stops before the services it calls."""
    return ProcessSpec(
        name=name or program.name,
        argv=launch.argv(program),
        env=env,
        cwd=launch.cwd,
        ready=http_ready(endpoint.ready_url),
        ready_timeout=launch.ready_timeout,
        stop_grace=launch.stop_grace,
        tier=_ORCHESTRATOR_TIER if program is ORCHESTRATOR else _SERVICE_TIER,
    )


def worker_spec(
    worker: WorkerOptions,
    *,
    tickets_target: str,
    registry_target: str,
    registration_secret: str,
    launch: Launch,
) -> ProcessSpec:
    """A reference worker as a process named after the worker (stopped first), ready once
    it logged its registration: so it logs at INFO (DEBUG if ``launch`` says so), whatever
    ``launch`` or the environment ask for."""
    verbose = "DEBUG" if (launch.log_level or "").upper() == "DEBUG" else "INFO"
    return ProcessSpec(
        name=worker.name,
        argv=launch.argv(WORKER),
        env=worker_env(
            worker,
            tickets_target=tickets_target,
            registry_target=registry_target,
            registration_secret=registration_secret,
            launch=replace(launch, log_level=verbose),
        ),
        cwd=launch.cwd,
        ready=log_ready(WORKER_READY_PATTERN),
        ready_timeout=launch.ready_timeout,
        stop_grace=launch.stop_grace,
        tier=_WORKER_TIER,
    )


def flow_specs(
    *,
    ports: StackPorts,
    tickets_dsn: str,
    registry_dsn: str,
    orchestrator_dsn: str,
    mongo_uri: str,
    mongo_database: str,
    jwt_secret: str,
    registration_secret: str,
    workers: Sequence[WorkerOptions],
    launch: Launch,
    tickets_settings: Settings = _NO_SETTINGS,
    registry_settings: Settings = _NO_SETTINGS,
    orchestrator_settings: Settings = _NO_SETTINGS,
) -> list[ProcessSpec]:
    """The whole of Flow C: registry, ticket service, orchestrator (wired to the other two)
    and ``workers``, in that order, under their default process names."""
    specs = [
        service_spec(
            REGISTRY,
            endpoint=ports.registry,
            env=registry_env(
                endpoint=ports.registry,
                postgres_dsn=registry_dsn,
                jwt_secret=jwt_secret,
                registration_secret=registration_secret,
                launch=launch,
                settings=registry_settings,
            ),
            launch=launch,
        ),
        service_spec(
            TICKET_SERVICE,
            endpoint=ports.tickets,
            env=ticket_service_env(
                endpoint=ports.tickets,
                postgres_dsn=tickets_dsn,
                mongo_uri=mongo_uri,
                mongo_database=mongo_database,
                jwt_secret=jwt_secret,
                launch=launch,
                settings=tickets_settings,
            ),
            launch=launch,
        ),
        service_spec(
            ORCHESTRATOR,
            endpoint=ports.orchestrator,
            env=orchestrator_env(
                endpoint=ports.orchestrator,
                postgres_dsn=orchestrator_dsn,
                tickets_target=ports.tickets.grpc_target,
                registry_target=ports.registry.grpc_target,
                jwt_secret=jwt_secret,
                launch=launch,
                settings=orchestrator_settings,
            ),
            launch=launch,
        ),
    ]
    specs += [
        worker_spec(
            worker,
            tickets_target=ports.tickets.grpc_target,
            registry_target=ports.registry.grpc_target,
            registration_secret=registration_secret,
            launch=launch,
        )
        for worker in workers
    ]
    return specs
