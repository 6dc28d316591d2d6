"""Readiness means "database reachable, migrations applied" (as in the other services).

With ``MIGRATE_ON_START=false`` on a database without the registry's schema, every call
failed with INTERNAL (a missing table) while ``/ready`` said ok and gRPC health SERVING.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hive_common.migrations import apply_migrations
from hive_common.postgres import POOL_TIMEOUT_SECONDS, RECONNECT_TIMEOUT_SECONDS
from hive_testsupport.migrations import migrations_until
from service_registry.app import MIGRATIONS_DIR, SERVICE_FULL_NAME

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry, StartRegistry

pytestmark = pytest.mark.service


async def health_status(registry: Registry, service: str = SERVICE_FULL_NAME) -> int:
    health = health_pb2_grpc.HealthStub(registry.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    status: int = response.status
    return status


async def assert_not_ready_for_the_schema(registry: Registry) -> None:
    ready = await registry.http.get("/ready")
    assert ready.status_code == 503, ready.text
    checks = ready.json()["checks"]
    assert checks["postgresql"] == {"status": "ok"}
    assert checks["migrations"]["status"] == "down"
    assert "HIVE_REGISTRY_MIGRATE_ON_START" in checks["migrations"]["detail"]
    # Calls meanwhile are UNAVAILABLE (retry later), not INTERNAL / 500: a worker started
    # before the operator applied the migrations gave up for good (on a schema behind the
    # code too: a missing column was INTERNAL).
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.register("early")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "migrations not applied" in (info.value.details() or "")
    listing = await registry.http.get("/api/v1/workers", headers=dict(registry.service_md))
    assert listing.status_code == 503, listing.text
    # gRPC health follows readiness (evaluated at start).
    for service in ("", SERVICE_FULL_NAME):
        assert await health_status(registry, service) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_not_ready_until_the_migrations_are_applied(
    start_registry: StartRegistry, postgres_dsn: str
) -> None:
    registry: Registry = await start_registry(migrate_on_start=False)

    await assert_not_ready_for_the_schema(registry)
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIR)
    ready = await registry.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {
        "postgresql": {"status": "ok"},
        "migrations": {"status": "ok"},
    }


async def test_not_ready_on_a_schema_behind_the_code(
    start_registry: StartRegistry, postgres_dsn: str, tmp_path: Path
) -> None:
    # Every migration but the last (0004 adds workers.instance_id, which every read selects).
    before = migrations_until(
        MIGRATIONS_DIR, "0003_workers_gin_without_pending_list", into=tmp_path / "m"
    )
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=before)
    registry: Registry = await start_registry(migrate_on_start=False)

    await assert_not_ready_for_the_schema(registry)


async def test_ready_with_the_migrations_applied_at_start(registry: Registry) -> None:
    ready = await registry.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {
        "postgresql": {"status": "ok"},
        "migrations": {"status": "ok"},
    }
    assert await health_status(registry) == health_pb2.HealthCheckResponse.SERVING


async def test_the_pool_finds_the_database_again_and_waits_as_every_services(
    registry: Registry,
) -> None:
    # The registry built its own pool with psycopg's defaults: back 10-13 s after a
    # database outage (the other services in 0.3-3 s), and requests waiting 30 s for a
    # connection during one (past the clients' per-attempt timeouts).
    assert registry.app.pool.reconnect_timeout == RECONNECT_TIMEOUT_SECONDS
    assert registry.app.pool.timeout == POOL_TIMEOUT_SECONDS


async def test_its_connections_are_named_in_pg_stat_activity(
    registry: Registry, postgres_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'service-registry'"
        )
        row = await cur.fetchone()
    assert row is not None
    assert row[0] >= 1
