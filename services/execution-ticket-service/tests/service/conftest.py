"""Shared fixtures: a migrated database, a repository with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.config import TicketSettings
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from execution_ticket_service.storage.tickets import Pool, TicketRepository, open_pool
from hive_common.auth import TokenIssuer
from hive_common.migrations import apply_migrations
from hive_testsupport.settings import FAST_TICKET_LOOPS, ticket_settings
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc


@dataclass
class FakeClock:
    """Real time plus an offset a test can push forward (to expire leases)."""

    offset: timedelta = field(default_factory=timedelta)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
async def migrated_dsn(postgres_dsn: str) -> str:
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY)
    return postgres_dsn


@pytest.fixture
async def pool(migrated_dsn: str) -> AsyncIterator[Pool]:
    p = open_pool(migrated_dsn, min_size=1, max_size=8)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repo(pool: Pool, clock: FakeClock) -> TicketRepository:
    return TicketRepository(pool=pool, clock=clock)


@pytest.fixture
def advance_clock(clock: FakeClock) -> Callable[[float], None]:
    """Move the service's clock forward by some seconds."""
    return clock.advance


@dataclass
class LoopTurns:
    """How many turns the event loop has made since the ``loop_turns`` fixture started."""

    count: int = 0


@pytest.fixture
async def loop_turns() -> AsyncIterator[LoopTurns]:
    """Counts the event loop's turns (to see whether work lets other tasks in)."""
    turns = LoopTurns()

    async def tick() -> None:
        while True:
            turns.count += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(tick())
    try:
        yield turns
    finally:
        task.cancel()


TEST_JWT_SECRET = "execution-ticket-service-tests-secret-0123456789"


@pytest.fixture
def settings(postgres_dsn: str, mongo_uri: str, mongo_database_name: str) -> TicketSettings:
    """Settings for an in-process service on free ports with fast background loops."""
    return ticket_settings(
        postgres_dsn=postgres_dsn,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database_name,
        jwt_secret=TEST_JWT_SECRET,
        **FAST_TICKET_LOOPS,
        max_parameters_bytes=1024,
    )


@pytest.fixture
async def service(settings: TicketSettings, clock: FakeClock) -> AsyncIterator[TicketService]:
    built = await build_service(settings, clock=clock)
    await built.start()
    try:
        yield built
    finally:
        await built.stop(0.5)


@pytest.fixture
async def channel(service: TicketService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.runtime.grpc_port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.TicketServiceAsyncStub:
    # The stubs' type hints return the async variant for an aio channel.
    return pb_grpc.TicketServiceStub(channel)


@pytest.fixture
def issuer(settings: TicketSettings) -> TokenIssuer:
    return TokenIssuer(
        secret=TEST_JWT_SECRET, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )


@pytest.fixture
def service_token(issuer: TokenIssuer) -> str:
    token, _ = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=600)
    return token
