"""The real ticket service and registry in-process (gRPC on 127.0.0.1), each on its own
PostgreSQL database (the ticket audit on FerretDB/MongoDB), plus real Workers.

The test itself plays the orchestrator: it creates tickets and assigns them with a
service token minted from the shared JWT secret.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from hive_common.auth import DEFAULT_ISSUER, TokenIssuer
from hive_common.clients import CallPolicy, ReconnectPolicy, RegistryClient, TicketClient
from hive_testsupport.clock import ManualClock
from hive_testsupport.databases import PostgresServer, temporary_postgres_database
from hive_testsupport.inprocess import (
    InProcessRegistry,
    InProcessTicketService,
    WorkerTasks,
    drain_workers,
    start_worker,
)
from hive_testsupport.settings import (
    FAST_TICKET_LOOPS,
    registry_settings,
    ticket_settings,
    worker_settings,
)
from hive_worker import Worker

JWT_SECRET = "hive-worker-service-tests-jwt-secret-0123456789"
REGISTRATION_SECRET = "hive-worker-service-tests-registration-secret"
WAIT_SECONDS = 30.0


@pytest.fixture
async def tickets(
    postgres_dsn: str, mongo_uri: str, mongo_database_name: str
) -> AsyncIterator[InProcessTicketService]:
    """A (re)startable ticket service; it comes back on the same port."""
    settings = ticket_settings(
        postgres_dsn=postgres_dsn,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database_name,
        jwt_secret=JWT_SECRET,
        **FAST_TICKET_LOOPS,
        postgres_pool_max_size=8,
        shutdown_grace_seconds=0.5,
        max_result_bytes=4096,
    )
    service = InProcessTicketService(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def registry_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The registry's own database, next to the ticket service's ``postgres_dsn``."""
    with temporary_postgres_database(postgres_server) as dsn:
        yield dsn


@pytest.fixture
async def registry(registry_dsn: str) -> AsyncIterator[InProcessRegistry]:
    """A (re)startable registry; it comes back on the same port. Registry time moves only
    when a test says so (to expire a worker on demand), and the sweeper stays off: no test
    here waits for heartbeat expiry."""
    settings = registry_settings(
        postgres_dsn=registry_dsn,
        jwt_secret=JWT_SECRET,
        registration_secret=REGISTRATION_SECRET,
        postgres_pool_max_size=4,
        shutdown_grace_seconds=0,
    )
    service = InProcessRegistry(
        settings, clock=ManualClock(datetime.now(UTC)), run_sweeper=False, stop_grace=0
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def service_token() -> str:
    issuer = TokenIssuer(secret=JWT_SECRET, issuer=DEFAULT_ISSUER)  # the services check it
    token, _ = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=3600)
    return token


FAST = CallPolicy(timeout_seconds=5, deadline_seconds=20)
RECONNECT = ReconnectPolicy(initial_backoff_seconds=0.05, max_backoff_seconds=0.5)


@pytest.fixture
async def orchestrator(
    tickets: InProcessTicketService, service_token: str
) -> AsyncIterator[TicketClient]:
    """What the orchestrator would hold: a TicketClient with the service token."""
    client = TicketClient.connect(
        tickets.target, token_provider=lambda: service_token, policy=FAST, reconnect=RECONNECT
    )
    async with client:
        yield client


@pytest.fixture
async def registry_admin(
    registry: InProcessRegistry, service_token: str
) -> AsyncIterator[RegistryClient]:
    client = RegistryClient.connect(
        registry.target,
        token_provider=lambda: service_token,
        policy=FAST,
    )
    async with client:
        yield client


@dataclass
class Workers:
    """Builds Workers wired to the services and runs them; drains them at the end."""

    tickets: InProcessTicketService
    registry: InProcessRegistry
    running: WorkerTasks = field(default_factory=list)

    def make(self, **overrides: Any) -> Worker:
        values: dict[str, Any] = {
            "registration_secret": REGISTRATION_SECRET,
            "name": f"worker-{uuid.uuid4().hex[:8]}",
            "capabilities": ["python"],
            "heartbeat_interval_seconds": None,  # the registry's
            "drain_grace_seconds": 10,
            "call_timeout_seconds": 5,
            "call_deadline_seconds": 10,
        }
        values.update(overrides)
        return Worker(
            settings=worker_settings(
                registry_target=self.registry.target,
                tickets_target=self.tickets.target,
                **values,
            )
        )

    async def start(self, worker: Worker) -> str:
        """Run ``worker`` in the background; returns its worker id once it watches."""
        return await start_worker(self.running, worker, limit_seconds=WAIT_SECONDS)

    async def stop_all(self) -> None:
        await drain_workers(self.running, limit_seconds=WAIT_SECONDS, raise_errors=True)


@pytest.fixture
async def workers(
    tickets: InProcessTicketService, registry: InProcessRegistry
) -> AsyncIterator[Workers]:
    pool = Workers(tickets=tickets, registry=registry)
    try:
        yield pool
    finally:
        await pool.stop_all()
