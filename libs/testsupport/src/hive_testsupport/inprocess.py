"""The services and reference workers running on the test's own event loop.

:class:`InProcessTicketService` and :class:`InProcessRegistry` start and stop one service
and keep its gRPC port across restarts (the first start may use port 0), so clients and
the other services keep a valid target. :func:`start_worker` / :func:`drain_workers` run
:class:`~hive_worker.Worker` s as tasks. :class:`InProcessFlow` is the whole system: both
services, orchestrators and workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import pytest

from execution_ticket_service.app import TicketService, build_service
from execution_ticket_service.config import TicketSettings
from hive_testsupport.settings import orchestrator_settings, worker_settings
from hive_worker.sdk import Worker
from orchestrator_dynamic.app import OrchestratorApp
from orchestrator_dynamic.app import build_app as build_orchestrator
from orchestrator_dynamic.config import OrchestratorSettings
from service_registry.app import RegistryApp
from service_registry.app import build_app as build_registry
from service_registry.config import RegistrySettings
from service_registry.domain.clock import Clock as RegistryClock

__all__ = [
    "InProcessFlow",
    "InProcessRegistry",
    "InProcessTicketService",
    "WorkerTasks",
    "drain_workers",
    "start_worker",
]

LOOPBACK = "127.0.0.1"

WorkerTasks = list[tuple[Worker, "asyncio.Task[None]"]]
"""Running workers, each with the task that runs it."""


class InProcessTicketService:
    """A (re)startable ticket service; ``settings`` may be replaced between runs."""

    def __init__(
        self,
        settings: TicketSettings,
        *,
        clock: Callable[[], datetime] | None = None,
        stop_grace: float = 0.5,
    ) -> None:
        self.settings = settings
        self.service: TicketService | None = None
        self.port = settings.grpc_port
        self._clock = clock
        self._stop_grace = stop_grace

    @property
    def target(self) -> str:
        """The gRPC target (known before the first start only for a fixed port)."""
        return f"{LOOPBACK}:{self.port}"

    async def start(self) -> TicketService:
        """Build and start the service on the kept port; returns it."""
        settings = self.settings.model_copy(update={"grpc_port": self.port})
        if self._clock is None:
            service = await build_service(settings)
        else:
            service = await build_service(settings, clock=self._clock)
        await service.start()
        assert service.runtime.grpc_port is not None
        self.port = service.runtime.grpc_port
        self.service = service
        return service

    async def stop(self) -> None:
        """Stop the service if it runs."""
        if self.service is not None:
            await self.service.stop(self._stop_grace)
            self.service = None


class InProcessRegistry:
    """A (re)startable service registry; ``clock`` and ``run_sweeper=False`` let a test
    drive the health timeline itself."""

    def __init__(
        self,
        settings: RegistrySettings,
        *,
        clock: RegistryClock | None = None,
        run_sweeper: bool = True,
        stop_grace: float = 0.5,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.app: RegistryApp | None = None
        self.port = settings.grpc_port
        self._run_sweeper = run_sweeper
        self._stop_grace = stop_grace

    @property
    def target(self) -> str:
        """The gRPC target (known before the first start only for a fixed port)."""
        return f"{LOOPBACK}:{self.port}"

    async def start(self) -> RegistryApp:
        """Build and start the registry on the kept port; returns it."""
        settings = self.settings.model_copy(update={"grpc_port": self.port})
        app = await build_registry(settings, clock=self.clock, run_sweeper=self._run_sweeper)
        await app.start()
        assert app.runtime.grpc_port is not None
        self.port = app.runtime.grpc_port
        self.app = app
        return app

    async def stop(self) -> None:
        """Stop the registry if it runs."""
        if self.app is not None:
            await self.app.stop(self._stop_grace)
            self.app = None


async def start_worker(running: WorkerTasks, worker: Worker, *, limit_seconds: float) -> str:
    """Run ``worker`` as a task (added to ``running``); return its worker id once it is
    registered and watching. Fails the test if it stops or is not ready within
    ``limit_seconds`` (a bound against hanging, not an assertion about speed)."""
    name = worker.settings.name
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    running.append((worker, task))
    ready = asyncio.ensure_future(worker.wait_ready())
    done, _ = await asyncio.wait(
        {ready, task}, timeout=limit_seconds, return_when=asyncio.FIRST_COMPLETED
    )
    if ready in done:
        return ready.result()
    ready.cancel()
    if task.done():
        task.result()  # raises what stopped it
        pytest.fail(f"worker {name} stopped before it was ready")
    pytest.fail(f"worker {name} was not ready within {limit_seconds:.0f} s")


async def drain_workers(running: WorkerTasks, *, limit_seconds: float, raise_errors: bool) -> None:
    """Drain every worker, then wait for each task (cancelled after ``limit_seconds``).

    With ``raise_errors``, the first failure is raised and tasks that already ended (the
    test stopped them itself) are left alone; without, failures are ignored.
    """
    for worker, _ in running:
        worker.drain()
    for _, task in running:
        if raise_errors and task.done():
            continue
        try:
            await asyncio.wait_for(task, limit_seconds)
        except Exception:
            if raise_errors:
                raise


class InProcessFlow:
    """The whole of Flow C in-process: ticket service, registry, orchestrators (any number,
    e.g. replicas) and reference workers, with one JWT secret and one registration secret.

    The services are started by the caller (:meth:`start_ticket_service`,
    :meth:`start_registry`); :meth:`close` stops whatever runs.
    """

    def __init__(
        self,
        *,
        ticket_settings: TicketSettings,
        registry_settings: RegistrySettings,
        orchestrator_dsn: str,
        jwt_secret: str,
        registration_secret: str,
        orchestrator_overrides: Mapping[str, Any] | None = None,
        worker_ready_seconds: float = 60.0,
        worker_stop_seconds: float = 10.0,
    ) -> None:
        self.tickets = InProcessTicketService(ticket_settings)
        self.registry = InProcessRegistry(registry_settings)
        self.orchestrator_dsn = orchestrator_dsn
        self.jwt_secret = jwt_secret
        self.registration_secret = registration_secret
        self.settings_overrides: dict[str, Any] = dict(orchestrator_overrides or {})
        self.orchestrators: list[OrchestratorApp] = []
        self.workers: WorkerTasks = []
        self.worker_ready_seconds = worker_ready_seconds
        self.worker_stop_seconds = worker_stop_seconds

    @property
    def ticket_settings(self) -> TicketSettings:
        """The ticket service's settings (replace them, then restart the service)."""
        return self.tickets.settings

    @ticket_settings.setter
    def ticket_settings(self, settings: TicketSettings) -> None:
        self.tickets.settings = settings

    @property
    def tickets_target(self) -> str:
        """The ticket service's gRPC target."""
        return self.tickets.target

    @property
    def registry_target(self) -> str:
        """The registry's gRPC target."""
        return self.registry.target

    async def start_ticket_service(self) -> None:
        """Start the ticket service (again on the same port after a stop)."""
        await self.tickets.start()

    async def stop_ticket_service(self) -> None:
        """Stop the ticket service."""
        assert self.tickets.service is not None, "the ticket service is not running"
        await self.tickets.stop()

    async def start_registry(self) -> None:
        """Start the registry (again on the same port after a stop)."""
        await self.registry.start()

    async def stop_registry(self) -> None:
        """Stop the registry."""
        assert self.registry.app is not None, "the registry is not running"
        await self.registry.stop()

    def orchestrator_settings(self, **overrides: Any) -> OrchestratorSettings:
        """Orchestrator settings wired to the services; ``settings_overrides``, then
        ``overrides`` win."""
        return orchestrator_settings(
            postgres_dsn=self.orchestrator_dsn,
            tickets_target=self.tickets_target,
            registry_target=self.registry_target,
            jwt_secret=self.jwt_secret,
            **(self.settings_overrides | overrides),
        )

    async def start_orchestrator(self, **overrides: Any) -> OrchestratorApp:
        """Build and start one more orchestrator (on the shared database)."""
        app = await build_orchestrator(self.orchestrator_settings(**overrides))
        await app.start()
        self.orchestrators.append(app)
        return app

    async def stop_orchestrator(self, app: OrchestratorApp) -> None:
        """Stop one orchestrator."""
        await app.stop(0.5)
        self.orchestrators.remove(app)

    async def start_worker(
        self, name: str, capabilities: list[str], *, max_concurrent: int = 4, **extra: Any
    ) -> Worker:
        """Run a reference worker; returns it once it is registered and watching."""
        worker = Worker(
            settings=worker_settings(
                registry_target=self.registry_target,
                tickets_target=self.tickets_target,
                registration_secret=self.registration_secret,
                name=name,
                capabilities=capabilities,
                max_concurrent=max_concurrent,
                **extra,
            )
        )
        await start_worker(self.workers, worker, limit_seconds=self.worker_ready_seconds)
        return worker

    async def stop_workers(self) -> None:
        """Drain every worker and wait for it (errors ignored: this is teardown)."""
        await drain_workers(
            self.workers, limit_seconds=self.worker_stop_seconds, raise_errors=False
        )

    async def close(self) -> None:
        """Stop the workers, the orchestrators, then the services."""
        await self.stop_workers()
        for app in list(self.orchestrators):
            await app.stop(0.5)
        await self.tickets.stop()
        await self.registry.stop()
