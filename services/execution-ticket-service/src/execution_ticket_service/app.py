"""The one place that builds and wires the service's objects."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pymongo import AsyncMongoClient

from execution_ticket_service.background import (
    EventPurger,
    LeaseSweeper,
    OutboxRelay,
    RelaySettings,
    StatsRefresher,
)
from execution_ticket_service.config import TicketSettings
from execution_ticket_service.domain.clock import Clock, utc_now
from execution_ticket_service.domain.models import TransitionCounts
from execution_ticket_service.metrics import TicketMetrics
from execution_ticket_service.signals import ChangeSignal
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from execution_ticket_service.storage.audit import AuditStore, MongoClient
from execution_ticket_service.storage.tickets import Pool, TicketRepository, open_pool
from execution_ticket_service.transport.grpc.auth import SERVICE_NAME, TicketAuthInterceptor
from execution_ticket_service.transport.grpc.servicer import TicketServicer, WatchSettings
from execution_ticket_service.transport.http.routes import build_router
from execution_ticket_service.watch import EventLogTail, TailSettings
from hive_common.auth import TokenIssuer
from hive_common.grpc_server import GrpcService, build_grpc_server
from hive_common.http import CheckResult, check_dependency, create_http_app
from hive_common.logging import get_logger
from hive_common.metrics import HttpMetrics, RpcMetrics, new_registry
from hive_common.migrations import migrate_on_start
from hive_common.postgres import connect_failure, service_dsn
from hive_common.runtime import ServiceRuntime
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

VERSION = "0.1.0"

log = get_logger(__name__)


@dataclass
class TicketService:
    """A built service: ``start()`` serves, ``stop()`` drains and releases everything."""

    runtime: ServiceRuntime
    servicer: TicketServicer
    repository: TicketRepository
    relay: OutboxRelay
    audit: AuditStore
    sweeper: LeaseSweeper
    stats: StatsRefresher
    purger: EventPurger
    tail: EventLogTail
    pool: Pool
    mongo: MongoClient
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # How long stop() waits for cancelled background loops before closing the pools anyway.
    task_stop_timeout: float = 5.0

    async def start(self) -> None:
        await self.runtime.start()
        self._start_background()

    def _start_background(self) -> None:
        for name, job in (
            ("outbox-relay", self.relay.run()),
            ("lease-sweeper", self.sweeper.run()),
            ("stats", self.stats.run()),
            ("event-purger", self.purger.run()),
            ("watch-tail", self.tail.run()),
        ):
            self.tasks.append(_background(name, job))

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: watch streams end first (a before-stop callback, see build)."""
        await self.runtime.stop(grace)

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM / SIGINT, then :meth:`stop`; raises if a server dies."""
        # The loops only need the pools, so they start first and the runtime's own
        # run_until_signal (with its "a server died" detection) owns the rest; its shutdown
        # callback cancels them whichever way the run ends.
        self._start_background()
        await self.runtime.run_until_signal()

    async def _end_watches(self) -> None:
        # WatchTickets streams never finish on their own: without this, every open stream
        # would hold the stop for the whole grace period (clients resume by cursor).
        self.servicer.drain()

    async def _shutdown(self) -> None:
        await self._stop_tasks()
        await self.repository.aclose()
        await self.audit.aclose()
        await self.mongo.close()
        await self.pool.close()

    async def _stop_tasks(self) -> None:
        """Cancel the background loops and wait for them, but never without a bound."""
        for task in self.tasks:
            task.cancel()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=self.task_stop_timeout)
        for task in pending:
            # Left behind rather than holding the stop; the pools close under it.
            log.error("background task ignored its cancellation", task=task.get_name())


def _background(name: str, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(job, name=f"tickets-{name}")
    task.add_done_callback(_report_failure)
    return task


def _report_failure(task: asyncio.Task[None]) -> None:
    # The loops survive failed rounds; one that ends anyway is logged when it ends.
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", task=task.get_name(), exc_info=task.exception())


async def build_service(settings: TicketSettings, *, clock: Clock = utc_now) -> TicketService:
    """Wait for PostgreSQL, apply migrations, then build (not start) the service."""
    dsn = settings.postgres_dsn.get_secret_value()
    pool = open_pool(
        service_dsn(dsn, settings.service_name),
        min_size=settings.postgres_pool_min_size,
        max_size=settings.postgres_pool_max_size,
    )

    applied = await migrate_on_start(
        dsn=dsn,
        directory=MIGRATIONS_DIRECTORY,
        deadline_seconds=settings.startup_timeout_seconds,
    )
    log.info("migrations applied", applied=applied)
    await pool.open(wait=True, timeout=settings.startup_timeout_seconds)

    registry = new_registry()
    metrics = TicketMetrics(registry)
    signal = ChangeSignal()

    def on_change(counts: TransitionCounts) -> None:
        signal.notify()
        metrics.record_transitions(counts)

    repository = TicketRepository(
        pool=pool, clock=clock, on_change=on_change, recent_tickets=settings.recent_tickets
    )
    # MongoDB is optional at start-up: the client connects lazily, the relay retries.
    mongo: MongoClient = AsyncMongoClient(
        settings.mongo_uri.get_secret_value(),
        serverSelectionTimeoutMS=settings.mongo_timeout_ms,
        connectTimeoutMS=settings.mongo_timeout_ms,
        socketTimeoutMS=settings.mongo_timeout_ms * 5,
        tz_aware=True,
    )
    audit = AuditStore(client=mongo, database=settings.mongo_database)
    relay = OutboxRelay(
        repository=repository,
        audit=audit,
        metrics=metrics,
        signal=signal,
        settings=RelaySettings(
            batch_size=settings.relay_batch_size,
            idle_interval=settings.relay_idle_interval_seconds,
            batch_window=settings.relay_batch_window_seconds,
            max_backoff=settings.relay_max_backoff_seconds,
        ),
    )
    sweeper = LeaseSweeper(
        repository=repository,
        interval=settings.lease_sweep_interval_seconds,
        grace=timedelta(seconds=settings.lease_grace_seconds),
        clock=clock,
    )
    stats = StatsRefresher(
        repository=repository,
        metrics=metrics,
        interval=settings.stats_interval_seconds,
        clock=clock,
    )

    purger = EventPurger(
        repository=repository,
        retention=timedelta(hours=settings.event_retention_hours),
        interval=settings.event_purge_interval_seconds,
        clock=clock,
    )

    secret = settings.jwt_secret.get_secret_value()
    issuer = TokenIssuer(secret=secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    verifier = settings.token_verifier()
    limits = settings.limits()
    tail = EventLogTail(
        repository=repository,
        signal=signal,
        settings=TailSettings(
            poll_interval=settings.watch_poll_interval_seconds,
            batch_size=settings.watch_batch_size,
            window=settings.watch_window_events,
            window_bytes=settings.watch_window_bytes,
            read_gap=settings.watch_read_gap_seconds,
        ),
    )
    auth = TicketAuthInterceptor(verifier=verifier, ticket_lookup=repository.get)
    servicer = TicketServicer(
        repository=repository,
        issuer=issuer,
        limits=limits,
        tail=tail,
        watch=WatchSettings(
            poll_interval=settings.watch_poll_interval_seconds,
            batch_size=settings.watch_batch_size,
        ),
        authorize_report=auth.authorize_report,
    )
    grpc_server = build_grpc_server(
        services=[
            GrpcService(
                name=SERVICE_NAME,
                register=lambda server: pb_grpc.add_TicketServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
        metrics=RpcMetrics(registry),
        interceptors=[auth],
    )

    async def readiness() -> dict[str, CheckResult]:
        postgresql, mongodb = await asyncio.gather(
            # Reading the tickets table also proves the schema (the migrations).
            check_dependency(repository.ping, last_error=lambda: connect_failure(dsn)),
            # The outbox keeps every event until MongoDB is back: degraded, not down.
            check_dependency(audit.ping, failed="degraded", last_error=audit.last_error),
        )
        report: dict[str, CheckResult] = {"postgresql": postgresql}
        if postgresql["status"] == "ok":
            report["migrations"] = {"status": "ok"}
        report["mongodb"] = mongodb
        return report

    http_app = create_http_app(
        title="execution-ticket-service",
        version=VERSION,
        description="Execution tickets of Hive Flow C (read API; writes go through gRPC).",
        readiness=readiness,
        metrics=HttpMetrics(registry),
        bearer_auth=settings.http_require_auth,
    )
    http_app.include_router(
        build_router(
            repository=repository,
            audit=audit,
            limits=limits,
            verifier=verifier if settings.http_require_auth else None,
        )
    )
    runtime = ServiceRuntime.from_settings(
        settings,
        grpc_server=grpc_server,
        http_app=http_app,
        metrics_registry=registry,
        readiness=readiness,
        readiness_interval_seconds=settings.readiness_interval_seconds,
    )
    service = TicketService(
        runtime=runtime,
        servicer=servicer,
        repository=repository,
        relay=relay,
        audit=audit,
        sweeper=sweeper,
        stats=stats,
        purger=purger,
        tail=tail,
        pool=pool,
        mongo=mongo,
    )
    runtime.add_before_stop_callback(service._end_watches)
    runtime.add_shutdown_callback(service._shutdown)
    return service
