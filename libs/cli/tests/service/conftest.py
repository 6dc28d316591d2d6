"""The whole system in-process for ``hive``: the real ticket service, registry and
orchestrator (HTTP on 127.0.0.1 port 0, each on its own PostgreSQL database, the ticket
audit in MongoDB) and two real reference workers. One stack per module: every test uses
its own plans, so they do not disturb each other, and the stack starts once.

The CLI runs in a thread (its HTTP client is synchronous) while the services keep
serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import SecretStr

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.config import TicketSettings
from hive_cli.cli import main
from hive_common.testing.databases import PostgresServer, temporary_postgres_database
from hive_worker.config import WorkerSettings
from hive_worker.sdk import Worker
from orchestrator_dynamic.app import OrchestratorApp
from orchestrator_dynamic.app import build_app as build_orchestrator
from orchestrator_dynamic.config import OrchestratorSettings
from service_registry.app import RegistryApp
from service_registry.app import build_app as build_registry
from service_registry.config import RegistrySettings

JWT_SECRET = "hive-cli-service-tests-jwt-secret-0123456789abcdef"
REGISTRATION_SECRET = "hive-cli-service-tests-registration-secret"
EXAMPLES = Path(__file__).resolve().parents[4] / "examples"
# Generous bound on a watched plan; never an assertion about speed.
WATCH_TIMEOUT_SECONDS = 90.0


@dataclass
class Run:
    """One finished ``hive`` invocation."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Stack:
    tickets: TicketService
    registry: RegistryApp
    orchestrator: OrchestratorApp
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What an operator would export to point ``hive`` at this stack."""
        return {
            "HIVE_ORCHESTRATOR_URL": f"http://127.0.0.1:{self.orchestrator.runtime.http_port}",
            "HIVE_TICKETS_URL": f"http://127.0.0.1:{self.tickets.runtime.http_port}",
            "HIVE_REGISTRY_URL": f"http://127.0.0.1:{self.registry.runtime.http_port}",
            "HIVE_JWT_SECRET": JWT_SECRET,
        }

    async def hive(
        self, *argv: str, env: Mapping[str, str] | None = None, stdin: bytes = b""
    ) -> Run:
        """Run ``hive argv...`` in-process, in a thread, with captured output."""
        out, err = io.StringIO(), io.StringIO()
        environment = {**self.env, **(env or {})}
        code = await asyncio.to_thread(
            main, list(argv), stdout=out, stderr=err, stdin=io.BytesIO(stdin), env=environment
        )
        return Run(code, out.getvalue(), err.getvalue())

    async def start_worker(self, name: str, capabilities: list[str], **extra: Any) -> Worker:
        worker = Worker(
            settings=WorkerSettings(
                registry_target=f"127.0.0.1:{self.registry.runtime.grpc_port}",
                tickets_target=f"127.0.0.1:{self.tickets.runtime.grpc_port}",
                registration_secret=SecretStr(REGISTRATION_SECRET),
                name=name,
                capabilities=capabilities,
                max_concurrent=4,
                heartbeat_interval_seconds=0.5,
                drain_grace_seconds=1.0,
                call_timeout_seconds=2.0,
                call_deadline_seconds=5.0,
                reconnect_max_backoff_seconds=0.5,
                **extra,
            )
        )
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        self.workers.append((worker, task))
        async with asyncio.timeout(30):
            ready = asyncio.ensure_future(worker.wait_ready())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()
                pytest.fail(f"worker {name} stopped before it was ready")
        return worker

    async def stop_workers(self) -> None:
        for worker, _ in self.workers:
            worker.drain()
        for _, task in self.workers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await task


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    postgres_server: PostgresServer, mongo_uri: str, module_mongo_database_name: str
) -> AsyncIterator[Stack]:
    with contextlib.ExitStack() as databases:
        tickets_dsn, registry_dsn, orchestrator_dsn = (
            databases.enter_context(temporary_postgres_database(postgres_server)) for _ in range(3)
        )
        tickets = await build_service(
            TicketSettings(
                host="127.0.0.1",
                grpc_port=0,
                http_port=0,
                metrics_port=0,
                postgres_dsn=tickets_dsn,
                postgres_pool_min_size=1,
                postgres_pool_max_size=10,
                mongo_uri=mongo_uri,
                mongo_database=module_mongo_database_name,
                mongo_timeout_ms=500,
                jwt_secret=SecretStr(JWT_SECRET),
                lease_sweep_interval_seconds=0.1,
                relay_idle_interval_seconds=0.1,
                watch_poll_interval_seconds=0.05,
                readiness_interval_seconds=0.5,
                shutdown_grace_seconds=1.0,
            )
        )
        await tickets.start()
        registry = await build_registry(
            RegistrySettings(
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
        )
        await registry.start()
        orchestrator = await build_orchestrator(
            OrchestratorSettings(
                host="127.0.0.1",
                http_port=0,
                postgres_dsn=SecretStr(orchestrator_dsn),
                postgres_pool_min_size=1,
                ticket_service_target=f"127.0.0.1:{tickets.runtime.grpc_port}",
                registry_target=f"127.0.0.1:{registry.runtime.grpc_port}",
                jwt_secret=SecretStr(JWT_SECRET),
                rpc_timeout_seconds=2.0,
                rpc_deadline_seconds=4.0,
                backoff_base_seconds=0.2,
                backoff_cap_seconds=0.5,
                dispatch_retry_seconds=0.5,
                resync_interval_seconds=2.0,
                error_retry_seconds=0.2,
                lease_ttl_seconds=5.0,
                lease_renew_interval_seconds=1.0,
                claim_interval_seconds=0.3,
                readiness_interval_seconds=0.5,
                shutdown_grace_seconds=1.0,
            )
        )
        await orchestrator.start()
        system = Stack(tickets=tickets, registry=registry, orchestrator=orchestrator)
        try:
            await system.start_worker(
                "cli-w1", ["python", "shell"], shell_allow_list=["echo", "sleep", "python"]
            )
            await system.start_worker("cli-w2", ["python"])
            yield system
        finally:
            await system.stop_workers()
            await orchestrator.stop(0.5)
            await registry.stop(0.5)
            await tickets.stop(0.5)
