"""The real services (and the echo floor) as separate OS processes, via hive_common.procstack."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.echo import READY_LINE
from bench.report import Report
from hive_common import flowc_processes as flowc
from hive_common.auth import DEFAULT_ISSUER, TokenIssuer
from hive_common.flowc_processes import Endpoint, Launch
from hive_common.localdb import quiet_port
from hive_common.procstack import ManagedProcess, ProcessSpec, log_ready

# Benchmark-only credentials: the services run on loopback for the length of a run.
JWT_SECRET = "bench-only-jwt-secret-not-for-any-real-deployment-0123456789"
REGISTRATION_SECRET = "bench-only-registration-secret"
REPO_ROOT = Path(__file__).resolve().parent.parent


def service_token() -> str:
    """A service token every service accepts (same secret, default issuer and audience)."""
    token, _ = TokenIssuer(secret=JWT_SECRET, issuer=DEFAULT_ISSUER).issue_service_token(
        service="bench", ttl_seconds=6 * 3600
    )
    return token


def bearer() -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {service_token()}"),)


def _launch(log_level: str) -> Launch:
    # Console scripts of the workspace venv: the pid we get is the service's own.
    return Launch(console_scripts=True, log_level=log_level, log_format="json", ready_timeout=90)


@dataclass(slots=True)
class Built:
    spec: ProcessSpec
    endpoint: Endpoint = field(default_factory=Endpoint)


def _ports() -> Endpoint:
    return Endpoint(grpc_port=quiet_port(), http_port=quiet_port(), metrics_port=quiet_port())


def echo_server(name: str = "echo", *, postgres_dsn: str | None = None) -> Built:
    """The echo service; with ``postgres_dsn`` the durable floor (see bench.echo)."""
    endpoint = Endpoint(grpc_port=quiet_port())
    argv = [sys.executable, "-m", "bench.echo", "--port", str(endpoint.grpc_port)]
    if postgres_dsn:
        argv += ["--postgres-dsn", postgres_dsn]
    spec = ProcessSpec(
        name=name,
        argv=argv,
        cwd=REPO_ROOT,
        ready=log_ready(re.escape(READY_LINE)),
        ready_timeout=60,
        stop_grace=5,
    )
    return Built(spec, endpoint)


def ticket_service(
    *,
    name: str,
    postgres_dsn: str,
    mongo_uri: str,
    mongo_database: str,
    log_level: str,
    mongo_timeout_ms: int | None = None,
) -> Built:
    endpoint = _ports()
    settings = {} if mongo_timeout_ms is None else {"MONGO_TIMEOUT_MS": mongo_timeout_ms}
    launch = _launch(log_level)
    env = flowc.ticket_service_env(
        endpoint=endpoint,
        postgres_dsn=postgres_dsn,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database,
        jwt_secret=JWT_SECRET,
        launch=launch,
        settings=settings,
    )
    spec = flowc.service_spec(
        flowc.TICKET_SERVICE, name=name, endpoint=endpoint, env=env, launch=launch
    )
    return Built(spec, endpoint)


def registry(
    *,
    name: str,
    postgres_dsn: str,
    log_level: str,
    heartbeat_interval_seconds: int | None = None,
) -> Built:
    endpoint = _ports()
    settings: dict[str, object] = {}
    if heartbeat_interval_seconds is not None:
        # Registered-but-silent workers must stay HEALTHY while they are being discovered.
        settings["HEARTBEAT_INTERVAL_SECONDS"] = heartbeat_interval_seconds
        settings["EXPIRE_AFTER_SECONDS"] = heartbeat_interval_seconds * 10
    launch = _launch(log_level)
    env = flowc.registry_env(
        endpoint=endpoint,
        postgres_dsn=postgres_dsn,
        jwt_secret=JWT_SECRET,
        registration_secret=REGISTRATION_SECRET,
        launch=launch,
        settings=settings,
    )
    spec = flowc.service_spec(flowc.REGISTRY, name=name, endpoint=endpoint, env=env, launch=launch)
    return Built(spec, endpoint)


def orchestrator(
    *, name: str, postgres_dsn: str, tickets: Endpoint, registry: Endpoint, log_level: str
) -> Built:
    endpoint = _ports()
    launch = _launch(log_level)
    env = flowc.orchestrator_env(
        endpoint=endpoint,
        postgres_dsn=postgres_dsn,
        tickets_target=tickets.grpc_target,
        registry_target=registry.grpc_target,
        jwt_secret=JWT_SECRET,
        launch=launch,
    )
    spec = flowc.service_spec(
        flowc.ORCHESTRATOR, name=name, endpoint=endpoint, env=env, launch=launch
    )
    return Built(spec, endpoint)


def worker(
    *, name: str, tickets: Endpoint, registry: Endpoint, max_concurrent: int, log_level: str
) -> Built:
    options = flowc.WorkerOptions(
        name=name, max_concurrent=max_concurrent, settings={"DRAIN_GRACE_SECONDS": 2}
    )
    spec = flowc.worker_spec(
        options,
        tickets_target=tickets.grpc_target,
        registry_target=registry.grpc_target,
        registration_secret=REGISTRATION_SECRET,
        launch=_launch(log_level),
    )
    return Built(spec)


def vm_hwm_mib(pid: int | None) -> float:
    """Peak resident set size (VmHWM) of a running process in MiB; NaN if unknown."""
    if pid is None:
        return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def record_memory(
    report: Report, phase: str, processes: Iterable[ManagedProcess], note: str
) -> None:
    """Peak memory of each running process of ``processes`` (the echo is the baseline)."""
    for process in (p for p in processes if p.is_running):
        report.memory.append(
            {
                "phase": phase,
                "process": process.name,
                "pid": process.pid,
                "vmhwm_mib": vm_hwm_mib(process.pid),
                "note": "baseline: bare grpc.aio process" if process.name == "echo" else note,
            }
        )
