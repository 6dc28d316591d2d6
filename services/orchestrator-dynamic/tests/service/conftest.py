"""The whole of Flow C in one process: the real ticket service, registry and orchestrator
(each on port 0 over its own PostgreSQL database; the ticket audit in MongoDB) and real
reference workers from ``hive_worker``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from execution_ticket_service.config import TicketSettings
from hive_common.auth import TokenIssuer
from hive_common.clients import TicketClient
from hive_testsupport import settings as testsettings
from hive_testsupport.databases import PostgresServer, temporary_postgres_database
from hive_testsupport.inprocess import InProcessFlow
from orchestrator_dynamic.app import OrchestratorApp
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
    return testsettings.ticket_settings(
        postgres_dsn=tickets_dsn,
        mongo_uri=mongo_uri,
        mongo_database=mongo_database_name,
        jwt_secret=JWT_SECRET,
    )


@pytest.fixture
def registry_settings(registry_dsn: str) -> RegistrySettings:
    return testsettings.registry_settings(
        postgres_dsn=registry_dsn,
        jwt_secret=JWT_SECRET,
        registration_secret=REGISTRATION_SECRET,
    )


class Flow(InProcessFlow):
    """The running system plus helpers to drive it over the HTTP API of the latest
    orchestrator."""

    def __init__(
        self,
        *,
        ticket_settings: TicketSettings,
        registry_settings: RegistrySettings,
        orchestrator_dsn: str,
    ) -> None:
        super().__init__(
            ticket_settings=ticket_settings,
            registry_settings=registry_settings,
            orchestrator_dsn=orchestrator_dsn,
            jwt_secret=JWT_SECRET,
            registration_secret=REGISTRATION_SECRET,
            orchestrator_overrides={"max_request_bytes": 64 * 1024},
            worker_ready_seconds=WAIT_SECONDS,
        )
        self.http: httpx.AsyncClient | None = None

    async def start_orchestrator(self, **overrides: Any) -> OrchestratorApp:
        app = await super().start_orchestrator(**overrides)
        if self.http is not None:
            await self.http.aclose()
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.runtime.http_port}", timeout=30.0
        )
        return app

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

    async def kill_worker(self, worker: Any) -> None:
        """The worker process dies without a word: no report, no deregistration."""
        _, task = next((w, t) for w, t in self.workers if w is worker)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.workers = [(w, t) for w, t in self.workers if w is not worker]

    def ticket_client(self) -> TicketClient:
        issuer = TokenIssuer(secret=JWT_SECRET, issuer="hive-flow-c", audience="neuralhive")
        token, _ = issuer.issue_service_token(service="tests", ttl_seconds=600)
        return TicketClient.connect(self.tickets_target, token_provider=lambda: token)

    async def close(self) -> None:
        await super().close()
        if self.http is not None:
            await self.http.aclose()


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
