"""The real ticket service and registry in-process (gRPC on 127.0.0.1), each on its own
PostgreSQL database (the ticket audit on FerretDB/MongoDB), plus real Workers.

The test itself plays the orchestrator: it creates tickets and assigns them with a
service token minted from the shared JWT secret.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.config import TicketSettings
from hive_common.auth import TokenIssuer
from hive_common.clients import CallPolicy, ReconnectPolicy, RegistryClient, TicketClient
from hive_common.testing.databases import PostgresServer, temporary_postgres_database
from hive_worker import Worker, WorkerSettings
from service_registry.app import RegistryApp, build_app
from service_registry.config import RegistrySettings
from service_registry.domain.clock import ManualClock

JWT_SECRET = "hive-worker-service-tests-jwt-secret-0123456789"
REGISTRATION_SECRET = "hive-worker-service-tests-registration-secret"
WAIT_SECONDS = 30.0


def free_port() -> int:
    """A port free right now (used where a service must come back on the same port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tickets:
    """A (re)startable ticket service on a fixed port."""

    settings: TicketSettings
    service: TicketService | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    async def start(self) -> None:
        self.service = await build_service(self.settings)
        await self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop(0.5)
            self.service = None


@pytest.fixture
async def tickets(
    postgres_dsn: str, mongo_uri: str, mongo_database_name: str
) -> AsyncIterator[Tickets]:
    settings = TicketSettings(
        host="127.0.0.1",
        grpc_port=free_port(),
        http_port=0,
        metrics_port=0,
        postgres_dsn=postgres_dsn,
        postgres_pool_min_size=1,
        postgres_pool_max_size=8,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database_name,
        mongo_timeout_ms=500,
        jwt_secret=SecretStr(JWT_SECRET),
        lease_sweep_interval_seconds=0.05,
        relay_idle_interval_seconds=0.05,
        relay_max_backoff_seconds=0.5,
        watch_poll_interval_seconds=0.05,
        readiness_interval_seconds=0.1,
        stats_interval_seconds=0.2,
        shutdown_grace_seconds=0.5,
        max_result_bytes=4096,
    )
    service = Tickets(settings=settings)
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


@dataclass
class Registry:
    """A (re)startable registry on a fixed port."""

    settings: RegistrySettings
    # Registry time moves only when a test says so (to expire a worker on demand).
    clock: ManualClock = field(default_factory=lambda: ManualClock(datetime.now(UTC)))
    app: RegistryApp | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    async def start(self) -> None:
        # The sweeper stays off: no test here waits for heartbeat expiry.
        self.app = await build_app(self.settings, clock=self.clock, run_sweeper=False)
        await self.app.start()

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop(0)
            self.app = None


@pytest.fixture
async def registry(registry_dsn: str) -> AsyncIterator[Registry]:
    settings = RegistrySettings(
        postgres_dsn=SecretStr(registry_dsn),
        host="127.0.0.1",
        grpc_port=free_port(),
        http_port=0,
        jwt_secret=SecretStr(JWT_SECRET),
        registration_secret=SecretStr(REGISTRATION_SECRET),
        heartbeat_interval_seconds=1,
        watch_poll_interval_seconds=0.05,
        postgres_pool_min_size=1,
        postgres_pool_max_size=4,
        shutdown_grace_seconds=0,
    )
    service = Registry(settings=settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def service_token() -> str:
    issuer = TokenIssuer(secret=JWT_SECRET, issuer="hive-worker-tests")
    token, _ = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=3600)
    return token


FAST = CallPolicy(timeout_seconds=5, deadline_seconds=20)
RECONNECT = ReconnectPolicy(initial_backoff_seconds=0.05, max_backoff_seconds=0.5)


@pytest.fixture
async def orchestrator(tickets: Tickets, service_token: str) -> AsyncIterator[TicketClient]:
    """What the orchestrator would hold: a TicketClient with the service token."""
    client = TicketClient.connect(
        tickets.target, token_provider=lambda: service_token, policy=FAST, reconnect=RECONNECT
    )
    async with client:
        yield client


@pytest.fixture
async def registry_admin(registry: Registry, service_token: str) -> AsyncIterator[RegistryClient]:
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

    tickets: Tickets
    registry: Registry
    running: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)

    def make(self, **overrides: Any) -> Worker:
        values: dict[str, Any] = {
            "registry_target": self.registry.target,
            "tickets_target": self.tickets.target,
            "registration_secret": REGISTRATION_SECRET,
            "name": f"worker-{uuid.uuid4().hex[:8]}",
            "capabilities": ["python"],
            "max_concurrent": 4,
            "drain_grace_seconds": 10,
            "call_timeout_seconds": 5,
            "call_deadline_seconds": 10,
            "reconnect_max_backoff_seconds": 0.5,
        }
        values.update(overrides)
        return Worker(settings=WorkerSettings(**values))

    async def start(self, worker: Worker) -> str:
        """Run ``worker`` in the background; returns its worker id once it watches."""
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        self.running.append((worker, task))
        ready = asyncio.ensure_future(worker.wait_ready())
        done, _ = await asyncio.wait(
            {ready, task}, timeout=WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()  # raise what stopped it
            raise AssertionError("worker did not become ready")
        return ready.result()

    async def stop_all(self) -> None:
        for worker, _ in self.running:
            worker.drain()
        for _, task in self.running:
            if task.done():
                continue  # stopped by the test itself
            try:
                await asyncio.wait_for(task, WAIT_SECONDS)
            except BaseException:
                task.cancel()
                raise


@pytest.fixture
async def workers(tickets: Tickets, registry: Registry) -> AsyncIterator[Workers]:
    pool = Workers(tickets=tickets, registry=registry)
    try:
        yield pool
    finally:
        await pool.stop_all()
