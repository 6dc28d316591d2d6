"""Run the whole of Hive Flow C on this machine without Docker (``make dev``).

Starts PostgreSQL and a MongoDB-compatible server from local binaries (``python -m
hive_common.localdb``, data kept under ``.hive/db``) unless ``HIVE_DEV_POSTGRES_DSN`` /
``HIVE_DEV_MONGO_URI`` name servers to use; creates the databases ``tickets``, ``registry``
and ``orchestrator``; then runs the service registry, the ticket service, the orchestrator
and two reference workers as processes (``hive_common.procstack``) on distinct ports, with a
JWT secret and a registration secret generated for the session (or ``HIVE_DEV_JWT_SECRET`` /
``HIVE_DEV_REGISTRATION_SECRET``). Waits until everything is ready, prints where it all is,
and on Ctrl-C (or SIGTERM) stops the workers, then the orchestrator, then the services
(each drains on SIGTERM), then the databases.

    uv run --all-packages python scripts/dev-stack.py [--port-offset N] [--state-dir .hive]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psycopg
from psycopg import sql

from hive_common.auth import DEFAULT_ISSUER, TokenIssuer
from hive_common.flowc_processes import Launch, StackPorts, WorkerOptions, flow_specs
from hive_common.migrations import postgres_url
from hive_common.procstack import ProcessSpec, ProcessStack, ProcessStackError, log_ready

REPO = Path(__file__).resolve().parent.parent
DATABASES = ("tickets", "registry", "orchestrator")
MONGO_DATABASE = "hive_tickets"
DB_PROCESS = "databases"
SERVICES = ("service-registry", "execution-ticket-service", "orchestrator-dynamic")
# The allow-list of docker-compose.yml; a shorter drain for Ctrl-C.
WORKER_SETTINGS = {"SHELL_ALLOW_LIST": "echo,true,false,sleep", "DRAIN_GRACE_SECONDS": 10}
WORKERS = (
    WorkerOptions(
        name="worker-1",
        capabilities=("python", "shell"),
        labels={"stack": "dev", "worker": "1"},
        settings=WORKER_SETTINGS,
    ),
    WorkerOptions(
        name="worker-2",
        capabilities=("python", "http"),
        labels={"stack": "dev", "worker": "2"},
        settings=WORKER_SETTINGS,
    ),
)


@dataclass(frozen=True)
class Ports:
    """Where everything listens: the services' local defaults moved by ``--port-offset``,
    and the local databases' ports."""

    services: StackPorts
    postgres_port: int
    mongo_port: int

    @classmethod
    def with_offset(cls, offset: int, *, postgres_port: int, mongo_port: int) -> Ports:
        return cls(
            services=StackPorts.defaults(offset),
            postgres_port=postgres_port,
            mongo_port=mongo_port,
        )


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def ensure_databases(admin_dsn: str) -> dict[str, str]:
    """Create the services' databases unless they exist; return their conninfo URLs."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        for name in DATABASES:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return {name: postgres_url(admin_dsn, dbname=name) for name in DATABASES}


def database_spec(*, state_dir: Path, ports: Ports) -> ProcessSpec:
    command = [
        sys.executable,
        "-m",
        "hive_common.localdb",
        "--data-dir",
        str(state_dir / "db"),
        "--postgres-port",
        str(ports.postgres_port),
        "--mongo-port",
        str(ports.mongo_port),
    ]
    return ProcessSpec(
        name=DB_PROCESS,
        argv=command,
        # localdb prints one JSON line with the URLs once both servers accept connections.
        ready=log_ready(r'"HIVE_DEV_MONGO_URI"'),
        ready_timeout=120,
        stop_grace=30,
        tier=-1,
    )


def service_specs(
    *,
    ports: Ports,
    dsns: dict[str, str],
    mongo_uri: str,
    jwt_secret: str,
    registration_secret: str,
    log_format: str,
) -> list[ProcessSpec]:
    return flow_specs(
        ports=ports.services,
        tickets_dsn=dsns["tickets"],
        registry_dsn=dsns["registry"],
        orchestrator_dsn=dsns["orchestrator"],
        mongo_uri=mongo_uri,
        mongo_database=MONGO_DATABASE,
        jwt_secret=jwt_secret,
        registration_secret=registration_secret,
        workers=WORKERS,
        launch=Launch(log_format=log_format, stop_grace=20),
    )


def summary(
    *,
    ports: Ports,
    dsns: dict[str, str],
    mongo_uri: str,
    log_dir: Path,
    env_file: Path,
) -> str:
    orchestrator = ports.services.orchestrator.http_url
    tickets = ports.services.tickets.http_url
    registry = ports.services.registry.http_url
    try:
        logs = log_dir.relative_to(Path.cwd())
    except ValueError:
        logs = log_dir
    workers = ", ".join(f"{w.name} ({','.join(w.capabilities)})" for w in WORKERS)
    services = ports.services
    return f"""
Hive Flow C dev stack is ready. Ctrl-C stops everything.

  orchestrator      {orchestrator}   (POST /api/v1/plans, docs {orchestrator}/docs)
                    gRPC {services.orchestrator.grpc_target} (OrchestratorService, health)
  ticket service    {tickets}   gRPC {services.tickets.grpc_target}   metrics http://127.0.0.1:{services.tickets.metrics_port}/metrics
  service registry  {registry}   gRPC {services.registry.grpc_target}
  workers           {workers}
  PostgreSQL        {", ".join(dsns.values())}
  MongoDB           {mongo_uri}  (database {MONGO_DATABASE}: audit_trail, status_change_events)
  logs              {logs}/<name>.log     tail -f {logs}/*.log
  environment       {env_file}  (URLs, gRPC targets, the JWT secret, a service token: `source` it)

Submit a plan and watch it run (the `hive` CLI reads the variables `source` sets):

  source {env_file}
  uv run hive plan submit examples/diamond.json --watch
  uv run hive tickets list --plan <plan_id>; uv run hive workers list
  uv run hive tickets show <ticket_id> --events   # a task's result and history

or with curl:

  curl -s -X POST {orchestrator}/api/v1/plans -H 'Content-Type: application/json' \\
       -d @examples/diamond.json
  watch -n1 curl -s {orchestrator}/api/v1/plans/<plan_id>           # status, counts, tickets
  curl -s {orchestrator}/api/v1/plans/<plan_id>/explain             # why a task is waiting

The ticket and registry APIs want a token (in the environment file):

  source {env_file}
  curl -s -H "Authorization: Bearer $HIVE_SERVICE_TOKEN" \\
       "{tickets}/api/v1/tickets?plan_id=<plan_id>"
  curl -s -H "Authorization: Bearer $HIVE_SERVICE_TOKEN" {registry}/api/v1/workers
"""


def how_it_ended(returncode: int | None) -> str:
    """``exited with code 1``, ``was killed by SIGKILL`` (a negative return code)."""
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exited with code {returncode}"


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())
    path.write_text(text)
    path.chmod(0o600)  # holds a service token and the secrets


def lock_state_dir(state_dir: Path) -> int | None:
    """Hold ``state_dir`` for this run (released when the process ends, even by kill -9):
    the descriptor of the lock, or ``None`` when another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "dev-stack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=REPO / ".hive", help="default .hive")
    parser.add_argument(
        "--port-offset",
        type=int,
        default=None,
        help="added to every service port (default: HIVE_DEV_PORT_OFFSET, else 0)",
    )
    parser.add_argument("--postgres-port", type=int, default=55432)
    parser.add_argument("--mongo-port", type=int, default=57017)
    parser.add_argument("--log-format", choices=("pretty", "json"), default="pretty")
    args = parser.parse_args(argv)
    if args.port_offset is None:
        given = os.environ.get("HIVE_DEV_PORT_OFFSET", "").strip() or "0"
        try:
            args.port_offset = int(given)
        except ValueError:
            parser.error(f"HIVE_DEV_PORT_OFFSET must be an integer, not {given!r}")

    state_dir: Path = args.state_dir.resolve()
    log_dir = state_dir / "logs"
    env_file = state_dir / "dev.env"
    ports = Ports.with_offset(
        args.port_offset, postgres_port=args.postgres_port, mongo_port=args.mongo_port
    )
    outside = {
        name: port
        for name, port in {
            **ports.services.named(),
            "postgres": ports.postgres_port,
            "mongo": ports.mongo_port,
        }.items()
        if not 0 < port < 65536
    }
    if outside:
        listing = ", ".join(f"{name} {port}" for name, port in outside.items())
        parser.error(
            f"ports outside 1-65535: {listing} (check --port-offset / HIVE_DEV_PORT_OFFSET, "
            "--postgres-port, --mongo-port)"
        )
    given_postgres = os.environ.get("HIVE_DEV_POSTGRES_DSN", "").strip()
    given_mongo = os.environ.get("HIVE_DEV_MONGO_URI", "").strip()
    run_databases = not (given_postgres and given_mongo)

    if lock_state_dir(state_dir) is None:
        holder = (state_dir / "dev-stack.lock").read_text().strip() or "?"
        print(
            f"error: {state_dir} is in use by another `make dev` (pid {holder}). Stop it "
            "(Ctrl-C), or give this one its own --state-dir (and --port-offset).",
            file=sys.stderr,
        )
        return 2

    wanted = ports.services.named()
    if run_databases:
        wanted |= {"postgres": ports.postgres_port, "mongo": ports.mongo_port}
    busy = {name: port for name, port in wanted.items() if port_in_use(port)}
    if busy:
        listing = ", ".join(f"{name} {port}" for name, port in busy.items())
        print(
            f"error: ports in use: {listing}. Is a stack already running (`make up` or "
            "another `make dev`)? Use --port-offset N (HIVE_DEV_PORT_OFFSET) to move the "
            "services, --postgres-port/--mongo-port for the databases.",
            file=sys.stderr,
        )
        return 2

    jwt_secret = os.environ.get("HIVE_DEV_JWT_SECRET") or secrets.token_urlsafe(32)
    registration_secret = os.environ.get("HIVE_DEV_REGISTRATION_SECRET") or secrets.token_urlsafe(
        24
    )

    # The handler only records the signal: no locks (a threading.Event.set() interrupted
    # by a second signal deadlocked on its own lock) and no buffered print.
    first_signal_at: list[float] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Ctrl-C reaches us twice at once (from the terminal and forwarded by `uv run`).
        if first_signal_at and time.monotonic() - first_signal_at[0] > 1.0:
            os.write(2, b"\nalready stopping; please wait (processes get their grace period)\n")
        elif not first_signal_at:
            first_signal_at.append(time.monotonic())

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    specs: list[ProcessSpec] = []
    if run_databases:
        specs.append(database_spec(state_dir=state_dir, ports=ports))
    postgres_admin = (
        given_postgres or f"postgresql://postgres@127.0.0.1:{ports.postgres_port}/postgres"
    )
    mongo_uri = given_mongo or f"mongodb://127.0.0.1:{ports.mongo_port}/?directConnection=true"
    # The services' DSNs follow from the admin DSN (same server, one database each).
    dsns = {name: postgres_url(postgres_admin, dbname=name) for name in DATABASES}
    specs += service_specs(
        ports=ports,
        dsns=dsns,
        mongo_uri=mongo_uri,
        jwt_secret=jwt_secret,
        registration_secret=registration_secret,
        log_format=args.log_format,
    )
    stack = ProcessStack(specs, log_dir=log_dir)
    status = 0
    try:
        if run_databases:
            print(f"starting PostgreSQL and MongoDB (data in {state_dir / 'db'}) ...", flush=True)
            stack.start(DB_PROCESS)
            stack.wait_ready([DB_PROCESS])
        ensure_databases(postgres_admin)
        others = [name for name in stack.names if name != DB_PROCESS]
        print(f"starting {', '.join(others)} (logs in {log_dir}) ...", flush=True)
        stack.start(*others)
        stack.wait_ready(others, timeout=120)

        issuer = TokenIssuer(secret=jwt_secret, issuer=DEFAULT_ISSUER)
        token, _ = issuer.issue_service_token(service="dev-stack", ttl_seconds=12 * 3600)
        write_env_file(
            env_file,
            {
                "HIVE_ORCHESTRATOR_URL": ports.services.orchestrator.http_url,
                "HIVE_TICKETS_URL": ports.services.tickets.http_url,
                "HIVE_REGISTRY_URL": ports.services.registry.http_url,
                # The `hive` CLI signs its own short-lived tokens with the secret (a token
                # written here would expire while the stack runs on).
                "HIVE_JWT_SECRET": jwt_secret,
                "HIVE_SERVICE_TOKEN": token,  # for curl: 12 hours
                # An extra `uv run hive-worker ...` joins this stack.
                "HIVE_WORKER_TICKETS_TARGET": ports.services.tickets.grpc_target,
                "HIVE_WORKER_REGISTRY_TARGET": ports.services.registry.grpc_target,
                "HIVE_WORKER_REGISTRATION_SECRET": registration_secret,
                # Nothing that `make dev` reads (HIVE_DEV_*): sourced in the shell that runs
                # it next, the database URLs made it use the stopped servers of this run.
            },
        )
        print(
            summary(
                ports=ports,
                dsns=dsns,
                mongo_uri=mongo_uri,
                log_dir=log_dir,
                env_file=env_file,
            ),
            flush=True,
        )
        print(json.dumps({"event": "dev stack ready"}), flush=True)
        while not first_signal_at:
            time.sleep(0.5)
            dead = stack.exited()
            if dead:
                for process in dead:
                    print(
                        f"\n{process.name} {how_it_ended(process.returncode)}; last lines of "
                        f"{process.log_path}:\n{process.log_tail(30)}",
                        file=sys.stderr,
                    )
                print("stopping the stack", file=sys.stderr)
                status = 1
                break
    except (ProcessStackError, psycopg.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        print("stopping: workers, then the orchestrator, then the services ...", flush=True)
        stack.stop_all()
        unclean = {
            p.name: p.returncode for p in stack if p.starts and p.returncode not in (0, None)
        }
        if unclean:
            print(f"processes that did not exit cleanly: {unclean}", file=sys.stderr)
            status = status or 1
        print("stopped", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
