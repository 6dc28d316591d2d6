"""Shared fixtures: a migrated database, a repository with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import execution_ticket_service.storage as storage_pkg
from execution_ticket_service.storage.tickets import Pool, TicketRepository, open_pool
from hive_common.migrations import apply_migrations

MIGRATIONS = Path(storage_pkg.__file__).parent / "migrations"


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
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS)
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
