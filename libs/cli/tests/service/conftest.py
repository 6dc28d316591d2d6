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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio

from hive_cli.cli import main
from hive_testsupport.databases import PostgresServer, temporary_postgres_database
from hive_testsupport.inprocess import InProcessFlow
from hive_testsupport.settings import registry_settings, ticket_settings

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


class Stack(InProcessFlow):
    """The running system (one orchestrator) and ``hive`` pointed at it."""

    @property
    def env(self) -> dict[str, str]:
        """What an operator would export to point ``hive`` at this stack."""
        assert self.tickets.service is not None
        assert self.registry.app is not None
        (orchestrator,) = self.orchestrators
        return {
            "HIVE_ORCHESTRATOR_URL": f"http://127.0.0.1:{orchestrator.runtime.http_port}",
            "HIVE_TICKETS_URL": f"http://127.0.0.1:{self.tickets.service.runtime.http_port}",
            "HIVE_REGISTRY_URL": f"http://127.0.0.1:{self.registry.app.runtime.http_port}",
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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    postgres_server: PostgresServer, mongo_uri: str, module_mongo_database_name: str
) -> AsyncIterator[Stack]:
    with contextlib.ExitStack() as databases:
        tickets_dsn, registry_dsn, orchestrator_dsn = (
            databases.enter_context(temporary_postgres_database(postgres_server)) for _ in range(3)
        )
        system = Stack(
            ticket_settings=ticket_settings(
                postgres_dsn=tickets_dsn,
                mongo_uri=mongo_uri,
                mongo_database=module_mongo_database_name,
                jwt_secret=JWT_SECRET,
            ),
            registry_settings=registry_settings(
                postgres_dsn=registry_dsn,
                jwt_secret=JWT_SECRET,
                registration_secret=REGISTRATION_SECRET,
            ),
            orchestrator_dsn=orchestrator_dsn,
            jwt_secret=JWT_SECRET,
            registration_secret=REGISTRATION_SECRET,
            worker_ready_seconds=30,
        )
        try:
            await system.start_ticket_service()
            await system.start_registry()
            await system.start_orchestrator()
            await system.start_worker(
                "cli-w1", ["python", "shell"], shell_allow_list=["echo", "sleep"]
            )
            await system.start_worker("cli-w2", ["python"])
            yield system
        finally:
            await system.close()
