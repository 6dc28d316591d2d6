"""The whole of Flow C in one process: the real ticket service, registry and orchestrator
(each on port 0 over its own PostgreSQL database; the ticket audit in MongoDB) and real
reference workers from ``hive_worker``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.config import TicketSettings
from hive_common.auth import TokenIssuer
from hive_common.clients import TicketClient
from hive_common.testing.databases import PostgresServer, temporary_postgres_database
from hive_worker.config import WorkerSettings
from hive_worker.sdk import Worker
from orchestrator_dynamic.app import OrchestratorApp, build_app
from orchestrator_dynamic.config import OrchestratorSettings
from service_registry.app import RegistryApp
from service_registry.app import build_app as build_registry
from service_registry.config import RegistrySettings

JWT_SECRET = "orchestrator-service-tests-secret-0123456789abcdef"
REGISTRATION_SECRET = "orchestrator-tests-registration-secret"
# Generous bound for waiting on the system; never an assertion about speed.
WAIT_SECONDS = 60.0


async def wait_for(
    probe: Callable[[], Awaitable[Any]], *, what: str, limit_seconds: float = WAIT_SECONDS
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail the test after
    ``limit_seconds`` (a bound against hanging, not an assertion about speed)."""
    last: Any = None
    try:
        async with asyncio.timeout(limit_seconds):
            while True:
                last = await probe()
                if last:
                    return last
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}; last value: {last!r}")


@pytest.fixture
def tickets_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    with temporary_postgres_database(postgres_server) as dsn:
        yield dsn


@pytest.fixture
def registry_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    with temporary_postgres_database(postgres_server) as dsn:
        yield dsn


@pytest.fixture
def ticket_settings(tickets_dsn: str, mongo_uri: str, mongo_database_name: str) -> TicketSettings:
    return TicketSettings(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        postgres_dsn=tickets_dsn,
        postgres_pool_min_size=1,
        postgres_pool_max_size=10,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database_name,
        mongo_timeout_ms=500,
        jwt_secret=SecretStr(JWT_SECRET),
        lease_sweep_interval_seconds=0.1,
        relay_idle_interval_seconds=0.1,
        watch_poll_interval_seconds=0.05,
        readiness_interval_seconds=0.5,
        stats_interval_seconds=1.0,
        shutdown_grace_seconds=1.0,
    )


@pytest.fixture
def registry_settings(registry_dsn: str) -> RegistrySettings:
    return RegistrySettings(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        postgres_dsn=SecretStr(registry_dsn),
        postgres_pool_min_size=1,
        jwt_secret=SecretStr(JWT_SECRET),
        registration_secret=SecretStr(REGISTRATION_SECRET),
        heartbeat_interval_seconds=1,
        watch_poll_interval_seconds=0.05,
        shutdown_grace_seconds=1.0,
    )


@dataclass
class Flow:
    """The running system plus helpers to drive it."""

    ticket_settings: TicketSettings
    registry_settings: RegistrySettings
    orchestrator_dsn: str
    ticket_service: TicketService | None = None
    registry: RegistryApp | None = None
    # Ports kept across restarts of a dependency (the orchestrator's targets stay valid).
    tickets_port: int = 0
    registry_port: int = 0
    orchestrators: list[OrchestratorApp] = field(default_factory=list)
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)
    http: httpx.AsyncClient | None = None
    settings_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tickets_target(self) -> str:
        return f"127.0.0.1:{self.tickets_port}"

    @property
    def registry_target(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    async def start_ticket_service(self) -> None:
        settings = self.ticket_settings.model_copy(update={"grpc_port": self.tickets_port})
        self.ticket_service = await build_service(settings)
        await self.ticket_service.start()
        assert self.ticket_service.runtime.grpc_port is not None
        self.tickets_port = self.ticket_service.runtime.grpc_port

    async def stop_ticket_service(self) -> None:
        assert self.ticket_service is not None
        await self.ticket_service.stop(0.5)
        self.ticket_service = None

    async def start_registry(self) -> None:
        settings = self.registry_settings.model_copy(update={"grpc_port": self.registry_port})
        self.registry = await build_registry(settings)
        await self.registry.start()
        assert self.registry.runtime.grpc_port is not None
        self.registry_port = self.registry.runtime.grpc_port

    async def stop_registry(self) -> None:
        assert self.registry is not None
        await self.registry.stop(0.5)
        self.registry = None

    def orchestrator_settings(self, **overrides: Any) -> OrchestratorSettings:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "http_port": 0,
            "grpc_port": 0,
            "watch_plan_interval_seconds": 0.1,
            "postgres_dsn": SecretStr(self.orchestrator_dsn),
            "postgres_pool_min_size": 1,
            "ticket_service_target": self.tickets_target,
            "registry_target": self.registry_target,
            "jwt_secret": SecretStr(JWT_SECRET),
            "rpc_timeout_seconds": 2.0,
            "rpc_deadline_seconds": 4.0,
            "max_request_bytes": 64 * 1024,
            "backoff_base_seconds": 0.2,
            "backoff_cap_seconds": 0.5,
            "dispatch_retry_seconds": 0.5,
            "resync_interval_seconds": 2.0,
            "error_retry_seconds": 0.2,
            "lease_ttl_seconds": 5.0,
            "lease_renew_interval_seconds": 1.0,
            "claim_interval_seconds": 0.3,
            "readiness_interval_seconds": 0.5,
            "shutdown_grace_seconds": 1.0,
        }
        values.update(self.settings_overrides)
        values.update(overrides)
        return OrchestratorSettings(**values)

    async def start_orchestrator(self, **overrides: Any) -> OrchestratorApp:
        app = await build_app(self.orchestrator_settings(**overrides))
        await app.start()
        self.orchestrators.append(app)
        if self.http is not None:
            await self.http.aclose()
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.runtime.http_port}", timeout=30.0
        )
        return app

    async def stop_orchestrator(self, app: OrchestratorApp) -> None:
        await app.stop(0.5)
        self.orchestrators.remove(app)

    async def start_worker(
        self, name: str, capabilities: list[str], *, max_concurrent: int = 4
    ) -> Worker:
        worker = Worker(
            settings=WorkerSettings(
                registry_target=self.registry_target,
                tickets_target=self.tickets_target,
                registration_secret=SecretStr(REGISTRATION_SECRET),
                name=name,
                capabilities=capabilities,
                max_concurrent=max_concurrent,
                heartbeat_interval_seconds=0.5,
                drain_grace_seconds=1.0,
                call_timeout_seconds=2.0,
                call_deadline_seconds=5.0,
                reconnect_max_backoff_seconds=0.5,
            )
        )
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        self.workers.append((worker, task))
        async with asyncio.timeout(WAIT_SECONDS):
            ready = asyncio.ensure_future(worker.wait_ready())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises the registration failure
                pytest.fail(f"worker {name} stopped before it was ready")
        return worker

    def client(self) -> httpx.AsyncClient:
        assert self.http is not None, "start an orchestrator first"
        return self.http

    async def submit(self, plan: dict[str, Any], **params: Any) -> httpx.Response:
        return await self.client().post("/api/v1/plans", json=plan, params=params)

    async def plan(self, plan_id: str) -> dict[str, Any]:
        response = await self.client().get(f"/api/v1/plans/{plan_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_plan(
        self, plan_id: str, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            body = await self.plan(plan_id)
            return body if predicate(body) else None

        result: dict[str, Any] = await wait_for(probe, what=f"plan {plan_id}: {what}")
        return result

    async def wait_settled(self, plan_id: str) -> dict[str, Any]:
        return await self.wait_plan(
            plan_id, lambda b: b["settled_at"] is not None, "every ticket terminal"
        )

    wait_for = staticmethod(wait_for)

    @staticmethod
    def tasks(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A plan body's tickets keyed by task id."""
        return {t["task_id"]: t for t in body["tickets"]}

    def ticket_client(self) -> TicketClient:
        issuer = TokenIssuer(secret=JWT_SECRET, issuer="hive-flow-c", audience="neuralhive")
        token, _ = issuer.issue_service_token(service="tests", ttl_seconds=600)
        return TicketClient.connect(self.tickets_target, token_provider=lambda: token)

    async def close(self) -> None:
        for worker, _ in self.workers:
            worker.drain()
        for _, task in self.workers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await task
        for app in list(self.orchestrators):
            await app.stop(0.5)
        if self.http is not None:
            await self.http.aclose()
        if self.ticket_service is not None:
            await self.stop_ticket_service()
        if self.registry is not None:
            await self.stop_registry()


@pytest.fixture
async def flow(
    ticket_settings: TicketSettings, registry_settings: RegistrySettings, postgres_dsn: str
) -> AsyncIterator[Flow]:
    system = Flow(
        ticket_settings=ticket_settings,
        registry_settings=registry_settings,
        orchestrator_dsn=postgres_dsn,
    )
    try:
        await system.start_ticket_service()
        await system.start_registry()
        yield system
    finally:
        await system.close()
