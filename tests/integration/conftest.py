"""The whole of Flow C as separate OS processes: the service registry, the ticket service, the
orchestrator and two reference workers (``hive_common.procstack``), on PostgreSQL and a
MongoDB-compatible server from the ``hive_testsupport.databases`` plugin.

Each test module gets its own stack and its own databases (three PostgreSQL databases and
one MongoDB database). Intervals are shortened through the services' environment variables
so that failures are noticed within seconds. Waiting is always polling with a generous
deadline; no test asserts on elapsed time.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pymongo import ASCENDING, MongoClient

from hive_common.auth import DEFAULT_ISSUER, TokenIssuer
from hive_common.flowc_processes import Launch, StackPorts, WorkerOptions, flow_specs
from hive_common.localdb import quiet_port
from hive_common.procstack import ProcessSpec, ProcessStack, logged_errors
from hive_testsupport.databases import (
    MongoServer,
    PostgresServer,
    temporary_mongo_database,
    temporary_postgres_database,
)

# Bound for waiting on the system; never an assertion about speed.
WAIT_SECONDS = 60.0
TERMINAL_PLAN_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
WORKER_NAMES = ("worker-1", "worker-2")

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, what: str, timeout: float = WAIT_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


@dataclass
class FlowStack:
    """The running processes plus clients to drive and inspect them."""

    processes: ProcessStack
    ports: StackPorts
    jwt_secret: str
    mongo_uri: str
    mongo_database: str
    http: httpx.Client = field(init=False)
    service_token: str = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(timeout=10.0, trust_env=False)
        issuer = TokenIssuer(secret=self.jwt_secret, issuer=DEFAULT_ISSUER)
        self.service_token, _ = issuer.issue_service_token(
            service="integration-tests", ttl_seconds=3600
        )

    def close(self) -> None:
        self.http.close()

    # -- addresses ----------------------------------------------------------------------

    @property
    def orchestrator_url(self) -> str:
        return self.ports.orchestrator.http_url

    @property
    def tickets_url(self) -> str:
        return self.ports.tickets.http_url

    @property
    def registry_url(self) -> str:
        return self.ports.registry.http_url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.service_token}"}

    # -- orchestrator -------------------------------------------------------------------

    def submit(self, plan: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"{self.orchestrator_url}/api/v1/plans", json=plan)

    def plan(self, plan_id: str) -> dict[str, Any]:
        response = self.http.get(f"{self.orchestrator_url}/api/v1/plans/{plan_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait_plan_settled(self, plan_id: str, *, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """The plan once it is terminal (whatever the status: the caller asserts it)."""

        def settled() -> dict[str, Any] | None:
            try:
                body = self.plan(plan_id)
            except httpx.HTTPError:
                return None  # the orchestrator may be briefly unavailable in fault tests
            return body if body["status"] in TERMINAL_PLAN_STATUSES else None

        return wait_for(settled, what=f"plan {plan_id} to settle", timeout=timeout)

    # -- ticket service -----------------------------------------------------------------

    def tickets(self, plan_id: str) -> list[dict[str, Any]]:
        """Every ticket of the plan according to the ticket service (all pages)."""
        found: list[dict[str, Any]] = []
        token = ""
        while True:
            response = self.http.get(
                f"{self.tickets_url}/api/v1/tickets",
                params={"plan_id": plan_id, "page_size": 1000, "page_token": token},
                headers=self.auth,
            )
            response.raise_for_status()
            body = response.json()
            found.extend(body["tickets"])
            token = body["next_page_token"]
            if not token:
                return found

    def ticket(self, ticket_id: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.tickets_url}/api/v1/tickets/{ticket_id}", headers=self.auth
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    # -- registry -----------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        response = self.http.get(f"{self.registry_url}/api/v1/workers", headers=self.auth)
        response.raise_for_status()
        workers: list[dict[str, Any]] = response.json()["workers"]
        return workers

    def worker_id(self, name: str) -> str:
        (worker,) = [w for w in self.workers() if w["name"] == name]
        worker_id: str = worker["worker_id"]
        return worker_id

    # -- audit (MongoDB) ----------------------------------------------------------------

    def audit(self, collection: str, plan_id: str) -> dict[str, list[dict[str, Any]]]:
        """The plan's documents in ``collection``, per ticket id, ordered by sequence."""
        client: MongoClient[dict[str, Any]] = MongoClient(
            self.mongo_uri, serverSelectionTimeoutMS=5000
        )
        try:
            cursor = (
                client[self.mongo_database][collection]
                .find({"plan_id": plan_id}, {"_id": False})
                .sort("sequence", ASCENDING)
            )
            per_ticket: dict[str, list[dict[str, Any]]] = {}
            for document in cursor:
                per_ticket.setdefault(document["ticket_id"], []).append(document)
            return per_ticket
        finally:
            client.close()


def audit_problems(
    stack: FlowStack, plan_id: str, tickets: list[dict[str, Any]]
) -> list[str] | None:
    """None when the audit trail of every ticket is complete and in order, else what is
    wrong (a list of messages).

    Complete and in order means, per ticket, sorted by the outbox sequence: the status
    changes chain (each ``previous_status`` is the status before it, starting from PENDING,
    the last is the ticket's current status), and ``audit_trail`` holds an event for every
    version of the ticket from 1 (its creation) to its current version.
    """
    problems: list[str] = []
    changes = stack.audit("status_change_events", plan_id)
    trail = stack.audit("audit_trail", plan_id)
    for ticket in tickets:
        ticket_id = ticket["ticket_id"]
        events = changes.get(ticket_id, [])
        statuses = [(e["previous_status"], e["status"]) for e in events]
        # Creation is an event (audit_trail), not a status change: the chain starts at PENDING.
        expected_previous = "PENDING"
        for previous, status in statuses:
            if previous != expected_previous:
                problems.append(f"{ticket['task_id']}: broken status chain {statuses}")
                break
            expected_previous = status
        if expected_previous != ticket["status"]:
            problems.append(
                f"{ticket['task_id']}: status changes end at {expected_previous}, "
                f"the ticket is {ticket['status']}: {statuses}"
            )
        sequences = [e["sequence"] for e in events]
        if sequences != sorted(set(sequences)):
            problems.append(f"{ticket['task_id']}: sequences not strictly increasing {sequences}")
        versions = {e["ticket"]["version"] for e in trail.get(ticket_id, [])}
        missing = set(range(1, ticket["version"] + 1)) - versions
        if missing:
            problems.append(f"{ticket['task_id']}: audit_trail lacks versions {sorted(missing)}")
    return problems or None


def wait_audit_complete(stack: FlowStack, plan_id: str) -> list[dict[str, Any]]:
    """Poll until :func:`audit_problems` finds nothing; returns the plan's tickets."""
    tickets = stack.tickets(plan_id)
    last: list[str] | None = None

    def complete() -> bool:
        nonlocal last
        last = audit_problems(stack, plan_id, tickets)
        return last is None

    deadline = time.monotonic() + WAIT_SECONDS
    while not complete():
        if time.monotonic() > deadline:
            pytest.fail(f"audit trail of plan {plan_id} incomplete: {last}")
        time.sleep(0.2)
    return tickets


def new_plan_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def task(
    task_id: str,
    task_type: str = "echo",
    *,
    depends_on: tuple[str, ...] = (),
    parameters: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_type": task_type,
        "required_capabilities": ["python"],
        "depends_on": list(depends_on),
        "parameters": parameters if parameters is not None else {"task": task_id},
        **extra,
    }


def diamond_plan(plan_id: str) -> dict[str, Any]:
    """a -> (b, c) -> d, tasks of well under a second."""
    return {
        "plan_id": plan_id,
        "name": "diamond",
        "tasks": [
            task("a"),
            task("b", "sleep", depends_on=("a",), parameters={"seconds": 0.2}),
            task("c", "sleep", depends_on=("a",), parameters={"seconds": 0.2}),
            task("d", depends_on=("b", "c")),
        ],
    }


# --------------------------------------------------------------------------------------------
# The stack


# Intervals shortened so that the faults the tests inject are noticed within seconds.
REGISTRY_SETTINGS = {
    "POSTGRES_POOL_MIN_SIZE": 1,
    "HEARTBEAT_INTERVAL_SECONDS": 1,
    "UNHEALTHY_AFTER_MISSED_HEARTBEATS": 2,
    "EXPIRE_AFTER_SECONDS": 6,
    "SWEEP_INTERVAL_SECONDS": 0.5,
    "WATCH_POLL_INTERVAL_SECONDS": 0.1,
    "SHUTDOWN_GRACE_SECONDS": 2,
}
TICKETS_SETTINGS = {
    "POSTGRES_POOL_MIN_SIZE": 1,
    "MONGO_TIMEOUT_MS": 500,
    # An assignment not started within 2 s goes back to PENDING.
    "DEFAULT_LEASE_SECONDS": 2,
    "LEASE_SWEEP_INTERVAL_SECONDS": 0.2,
    # As short as the leases: reports held back by a restart get in first all the same.
    "LEASE_GRACE_SECONDS": 2,
    "RELAY_IDLE_INTERVAL_SECONDS": 0.1,
    "RELAY_MAX_BACKOFF_SECONDS": 1,
    "WATCH_POLL_INTERVAL_SECONDS": 0.05,
    "READINESS_INTERVAL_SECONDS": 0.5,
    "SHUTDOWN_GRACE_SECONDS": 2,
}
ORCHESTRATOR_SETTINGS = {
    "POSTGRES_POOL_MIN_SIZE": 1,
    "RPC_TIMEOUT_SECONDS": 2,
    "RPC_DEADLINE_SECONDS": 4,
    "BACKOFF_BASE_SECONDS": 0.2,
    "BACKOFF_CAP_SECONDS": 0.5,
    "DISPATCH_RETRY_SECONDS": 0.5,
    "RESYNC_INTERVAL_SECONDS": 2,
    "ERROR_RETRY_SECONDS": 0.2,
    "LEASE_TTL_SECONDS": 5,
    "LEASE_RENEW_INTERVAL_SECONDS": 1,
    "CLAIM_INTERVAL_SECONDS": 0.3,
    "READINESS_INTERVAL_SECONDS": 0.5,
    "SHUTDOWN_GRACE_SECONDS": 2,
}
WORKER_SETTINGS = {
    "DRAIN_GRACE_SECONDS": 2,
    "CALL_TIMEOUT_SECONDS": 2,
    "CALL_DEADLINE_SECONDS": 5,
    "RECONNECT_MAX_BACKOFF_SECONDS": 0.5,
}


def stack_specs(
    *,
    ports: StackPorts,
    dsns: dict[str, str],
    mongo_uri: str,
    mongo_database: str,
    jwt_secret: str,
    registration_secret: str,
) -> list[ProcessSpec]:
    """The five processes with short intervals suited to tests."""
    return flow_specs(
        ports=ports,
        tickets_dsn=dsns["tickets"],
        registry_dsn=dsns["registry"],
        orchestrator_dsn=dsns["orchestrator"],
        mongo_uri=mongo_uri,
        mongo_database=mongo_database,
        jwt_secret=jwt_secret,
        registration_secret=registration_secret,
        workers=[
            WorkerOptions(name=name, max_concurrent=4, settings=WORKER_SETTINGS)
            for name in WORKER_NAMES
        ],
        launch=Launch(log_level="INFO", log_format="json", stop_grace=10),
        tickets_settings=TICKETS_SETTINGS,
        registry_settings=REGISTRY_SETTINGS,
        orchestrator_settings=ORCHESTRATOR_SETTINGS,
    )


@pytest.fixture(scope="module")
def module_stack(
    postgres_server: PostgresServer,
    mongo_server_info: MongoServer,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[FlowStack]:
    """A fresh stack with its own databases for the test module."""
    jwt_secret = secrets.token_urlsafe(32)
    registration_secret = secrets.token_urlsafe(16)
    module = request.module.__name__.rsplit(".", 1)[-1]
    # HIVE_INTEGRATION_LOG_DIR keeps the process logs somewhere stable (e.g. a CI artifact).
    kept = os.environ.get("HIVE_INTEGRATION_LOG_DIR")
    log_dir = Path(kept) / module if kept else tmp_path_factory.mktemp(f"stack-{module}")
    with (
        temporary_postgres_database(postgres_server) as tickets_dsn,
        temporary_postgres_database(postgres_server) as registry_dsn,
        temporary_postgres_database(postgres_server) as orchestrator_dsn,
        temporary_mongo_database(mongo_server_info) as mongo_database,
    ):
        ports = StackPorts.allocate(quiet_port)
        specs = stack_specs(
            ports=ports,
            dsns={
                "tickets": tickets_dsn,
                "registry": registry_dsn,
                "orchestrator": orchestrator_dsn,
            },
            mongo_uri=mongo_server_info.uri,
            mongo_database=mongo_database,
            jwt_secret=jwt_secret,
            registration_secret=registration_secret,
        )
        processes = ProcessStack(specs, log_dir=log_dir)
        stack = FlowStack(
            processes=processes,
            ports=ports,
            jwt_secret=jwt_secret,
            mongo_uri=mongo_server_info.uri,
            mongo_database=mongo_database,
        )
        try:
            processes.start_all(timeout=90)
            yield stack
        finally:
            stack.close()
            processes.stop_all()
        if errors := asyncio_errors(processes):
            pytest.fail("asyncio reported exceptions nobody handled:\n" + "\n\n".join(errors))


def asyncio_errors(processes: ProcessStack) -> list[str]:
    """The errors asyncio logged in the processes' logs: exceptions nobody handled in a
    background task, a response stream or a callback (no test result shows those)."""
    return [
        f"{process.name}: {entry.get('event')}\n{entry.get('exception', '')}"
        for process in processes
        for entry in logged_errors(process.log_path)
        if entry.get("logger") == "asyncio"
    ]


@pytest.fixture
def stack(module_stack: FlowStack) -> Iterator[FlowStack]:
    """The module's stack; a test that killed or stopped a process gets it back afterwards."""
    yield module_stack
    processes = module_stack.processes
    for process in processes.exited():
        process.start()
    processes.wait_ready(timeout=60)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with the tail of every process log."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.when == "call" and report.failed and isinstance(stack, FlowStack):
        for process in stack.processes:
            report.sections.append(
                (f"log of {process.name} ({process.log_path})", process.log_tail(40))
            )
    return report
