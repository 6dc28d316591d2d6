"""The real services (and the echo floor) as separate OS processes, via hive_common.procstack."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.echo import READY_LINE
from hive_common.auth import TokenIssuer
from hive_common.localdb import free_port
from hive_common.procstack import ProcessSpec, http_ready, log_ready

# Benchmark-only credentials: the services run on loopback for the length of a run.
JWT_SECRET = "bench-only-jwt-secret-not-for-any-real-deployment-0123456789"
REGISTRATION_SECRET = "bench-only-registration-secret"
REPO_ROOT = Path(__file__).resolve().parent.parent


def service_token() -> str:
    """A service token every service accepts (same secret, default issuer and audience)."""
    token, _ = TokenIssuer(secret=JWT_SECRET, issuer="hive-bench").issue_service_token(
        service="bench", ttl_seconds=6 * 3600
    )
    return token


def bearer() -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {service_token()}"),)


def _script(name: str) -> str:
    # Console scripts of the workspace venv: the pid we get is the service's own.
    return str(Path(sys.executable).parent / name)


@dataclass(slots=True)
class Endpoint:
    """Where one process listens."""

    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass(slots=True)
class Built:
    spec: ProcessSpec
    endpoint: Endpoint = field(default_factory=Endpoint)


def _ports() -> Endpoint:
    return Endpoint(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())


def echo_server(name: str = "echo") -> Built:
    endpoint = Endpoint(grpc_port=free_port())
    spec = ProcessSpec(
        name=name,
        argv=[sys.executable, "-m", "bench.echo", "--port", str(endpoint.grpc_port)],
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
    env = {
        "HIVE_TICKETS_HOST": "127.0.0.1",
        "HIVE_TICKETS_GRPC_PORT": str(endpoint.grpc_port),
        "HIVE_TICKETS_HTTP_PORT": str(endpoint.http_port),
        "HIVE_TICKETS_METRICS_PORT": str(endpoint.metrics_port),
        "HIVE_TICKETS_POSTGRES_DSN": postgres_dsn,
        "HIVE_TICKETS_MONGO_URI": mongo_uri,
        "HIVE_TICKETS_MONGO_DATABASE": mongo_database,
        "HIVE_TICKETS_JWT_SECRET": JWT_SECRET,
        "HIVE_TICKETS_LOG_LEVEL": log_level,
        "HIVE_TICKETS_LOG_FORMAT": "json",
    }
    if mongo_timeout_ms is not None:
        env["HIVE_TICKETS_MONGO_TIMEOUT_MS"] = str(mongo_timeout_ms)
    spec = ProcessSpec(
        name=name,
        argv=[_script("execution-ticket-service")],
        env=env,
        ready=http_ready(f"{endpoint.http_url}/ready"),
        ready_timeout=90,
        stop_grace=10,
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
    env = {
        "HIVE_REGISTRY_HOST": "127.0.0.1",
        "HIVE_REGISTRY_GRPC_PORT": str(endpoint.grpc_port),
        "HIVE_REGISTRY_HTTP_PORT": str(endpoint.http_port),
        "HIVE_REGISTRY_POSTGRES_DSN": postgres_dsn,
        "HIVE_REGISTRY_JWT_SECRET": JWT_SECRET,
        "HIVE_REGISTRY_REGISTRATION_SECRET": REGISTRATION_SECRET,
        "HIVE_REGISTRY_LOG_LEVEL": log_level,
        "HIVE_REGISTRY_LOG_FORMAT": "json",
    }
    if heartbeat_interval_seconds is not None:
        # Registered-but-silent workers must stay HEALTHY while they are being discovered.
        env["HIVE_REGISTRY_HEARTBEAT_INTERVAL_SECONDS"] = str(heartbeat_interval_seconds)
        env["HIVE_REGISTRY_EXPIRE_AFTER_SECONDS"] = str(heartbeat_interval_seconds * 10)
    spec = ProcessSpec(
        name=name,
        argv=[_script("service-registry")],
        env=env,
        ready=http_ready(f"{endpoint.http_url}/ready"),
        ready_timeout=90,
        stop_grace=10,
    )
    return Built(spec, endpoint)


def orchestrator(
    *, name: str, postgres_dsn: str, tickets: Endpoint, registry: Endpoint, log_level: str
) -> Built:
    endpoint = _ports()
    env = {
        "HIVE_ORCHESTRATOR_HOST": "127.0.0.1",
        "HIVE_ORCHESTRATOR_GRPC_PORT": str(endpoint.grpc_port),
        "HIVE_ORCHESTRATOR_HTTP_PORT": str(endpoint.http_port),
        "HIVE_ORCHESTRATOR_POSTGRES_DSN": postgres_dsn,
        "HIVE_ORCHESTRATOR_TICKET_SERVICE_TARGET": tickets.grpc_target,
        "HIVE_ORCHESTRATOR_REGISTRY_TARGET": registry.grpc_target,
        "HIVE_ORCHESTRATOR_JWT_SECRET": JWT_SECRET,
        "HIVE_ORCHESTRATOR_LOG_LEVEL": log_level,
        "HIVE_ORCHESTRATOR_LOG_FORMAT": "json",
    }
    spec = ProcessSpec(
        name=name,
        argv=[_script("orchestrator-dynamic")],
        env=env,
        ready=http_ready(f"{endpoint.http_url}/ready"),
        ready_timeout=90,
        stop_grace=10,
        tier=1,
    )
    return Built(spec, endpoint)


def worker(
    *, name: str, tickets: Endpoint, registry: Endpoint, max_concurrent: int, log_level: str
) -> Built:
    env = {
        "HIVE_WORKER_REGISTRY_TARGET": registry.grpc_target,
        "HIVE_WORKER_TICKETS_TARGET": tickets.grpc_target,
        "HIVE_WORKER_REGISTRATION_SECRET": REGISTRATION_SECRET,
        "HIVE_WORKER_NAME": name,
        "HIVE_WORKER_CAPABILITIES": "python",
        "HIVE_WORKER_MAX_CONCURRENT": str(max_concurrent),
        "HIVE_WORKER_LOG_LEVEL": log_level,
        "HIVE_WORKER_LOG_FORMAT": "json",
        "HIVE_WORKER_DRAIN_GRACE_SECONDS": "2",
    }
    spec = ProcessSpec(
        name=name,
        argv=[_script("hive-worker")],
        env=env,
        ready=log_ready("worker registered"),
        ready_timeout=90,
        stop_grace=10,
        tier=2,
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
