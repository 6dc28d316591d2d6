"""A real registry (gRPC + HTTP on port 0) over a fresh PostgreSQL database per test.

The registry runs on a ManualClock with its sweeper stopped, so tests move time and
sweep explicitly: the health timeline is exact and never waits on wall-clock time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import pytest

from hive_common.auth import TokenIssuer
from hive_testsupport.clock import ManualClock
from neuralhive.registry.v1 import registry_service_pb2 as pb
from neuralhive.registry.v1 import registry_service_pb2_grpc as pb_grpc
from service_registry.app import RegistryApp, build_app
from service_registry.config import RegistrySettings

JWT_SECRET = "registry-service-tests-secret-0123456789abcdef"
REGISTRATION_SECRET = "join-the-hive-registration-secret"
AUDIENCE = "neuralhive"

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Registry:
    """A running registry plus what tests need to drive it."""

    app: RegistryApp
    stub: Any  # ServiceRegistryAsyncStub
    channel: grpc.aio.Channel
    http: httpx.AsyncClient
    clock: ManualClock
    issuer: TokenIssuer

    @property
    def service_md(self) -> Metadata:
        token, _ = self.issuer.issue_service_token(service="orchestrator", ttl_seconds=600)
        return bearer(token)

    @property
    def secret_md(self) -> Metadata:
        return bearer(REGISTRATION_SECRET)

    def worker_md(self, worker_id: str) -> Metadata:
        token, _ = self.issuer.issue_worker_token(worker_id=worker_id, ttl_seconds=600)
        return bearer(token)

    async def register(self, name: str, **fields: Any) -> pb.RegisterResponse:
        fields.setdefault("capabilities", ["python"])
        fields.setdefault("max_concurrent", 4)
        response: pb.RegisterResponse = await self.stub.Register(
            pb.RegisterRequest(name=name, **fields), metadata=self.secret_md
        )
        return response

    async def heartbeat(self, worker_id: str, **fields: Any) -> pb.HeartbeatResponse:
        response: pb.HeartbeatResponse = await self.stub.Heartbeat(
            pb.HeartbeatRequest(worker_id=worker_id, **fields),
            metadata=self.worker_md(worker_id),
        )
        return response

    async def sweep(self) -> Any:
        return await self.app.sweeper.sweep_once()

    async def open_watch(self, namespace: str = "") -> Any:
        """A live WatchWorkers call: its initial metadata means nothing later is missed."""
        call = self.stub.WatchWorkers(
            pb.WatchWorkersRequest(namespace=namespace), metadata=self.service_md
        )
        await asyncio.wait_for(call.initial_metadata(), timeout=10)
        return call

    @staticmethod
    async def next_events(call: Any, count: int) -> list[tuple[str, str]]:
        """The next ``count`` events as (type name, worker name); bounded, never hangs."""
        events = []
        for _ in range(count):
            response = await asyncio.wait_for(call.read(), timeout=10)
            events.append(
                (pb.WorkerEventType.Name(response.event.type), response.event.worker.name)
            )
        return events


def make_settings(dsn: str, **overrides: Any) -> RegistrySettings:
    values: dict[str, Any] = {
        "postgres_dsn": dsn,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "jwt_secret": JWT_SECRET,
        "registration_secret": REGISTRATION_SECRET,
        "heartbeat_interval_seconds": 5,
        "unhealthy_after_missed_heartbeats": 3,
        "expire_after_seconds": 60,
        "watch_poll_interval_seconds": 0.02,
        "mass_transition_threshold": 3,
        "postgres_pool_min_size": 1,
        "postgres_pool_max_size": 4,
        "shutdown_grace_seconds": 0,
    }
    values.update(overrides)
    return RegistrySettings(**values)


StartRegistry = Callable[..., Any]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
async def start_registry(postgres_dsn: str, clock: ManualClock) -> AsyncIterator[StartRegistry]:
    """Start a registry on the test database (callable again, e.g. after a restart)."""
    started: list[Registry] = []

    async def start(**overrides: Any) -> Registry:
        settings = make_settings(postgres_dsn, **overrides)
        app = await build_app(settings, clock=clock, run_sweeper=False)
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.runtime.grpc_port}")
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.runtime.http_port}")
        registry = Registry(
            app=app,
            stub=pb_grpc.ServiceRegistryStub(channel),
            channel=channel,
            http=http,
            clock=clock,
            issuer=TokenIssuer(secret=JWT_SECRET, issuer=settings.jwt_issuer, audience=AUDIENCE),
        )
        started.append(registry)
        return registry

    yield start
    for registry in started:
        await stop(registry)


async def stop(registry: Registry) -> None:
    await registry.channel.close()
    await registry.http.aclose()
    await registry.app.stop(0)


@pytest.fixture
async def registry(start_registry: StartRegistry) -> Registry:
    result: Registry = await start_registry()
    return result
