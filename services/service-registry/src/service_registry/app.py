"""The one place that builds and wires the registry's objects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from hive_common.auth import TokenIssuer
from hive_common.errors import FailedPrecondition, Internal, Unavailable
from hive_common.grpc_server import GrpcService, build_grpc_server
from hive_common.http import CheckResult, check_dependency, create_http_app
from hive_common.logging import get_logger
from hive_common.metrics import HttpMetrics, RpcMetrics, new_registry
from hive_common.migrations import migrate_on_start
from hive_common.postgres import (
    POOL_TIMEOUT_SECONDS,
    RECONNECT_TIMEOUT_SECONDS,
    SCHEMA_BEHIND_SQLSTATES,
    connect_failure,
    service_dsn,
)
from hive_common.retry import wait_for_dependency
from hive_common.runtime import ServiceRuntime
from neuralhive.registry.v1 import registry_service_pb2_grpc as pb_grpc
from service_registry.config import RegistrySettings
from service_registry.domain.clock import Clock, SystemClock
from service_registry.domain.models import DiscoveryQuery
from service_registry.domain.ranking import WorkerRanker
from service_registry.domain.service import RegistryService
from service_registry.metrics import RegistryMetrics
from service_registry.storage import WorkerRepository
from service_registry.sweeper import HealthSweeper
from service_registry.transport.authorization import Authorizer
from service_registry.transport.grpc.auth import RegistryAuthInterceptor
from service_registry.transport.grpc.servicer import RegistryServicer
from service_registry.transport.http.routes import build_router

MIGRATIONS_DIR = Path(__file__).parent / "storage" / "migrations"
SERVICE_FULL_NAME = "neuralhive.registry.v1.ServiceRegistry"


@dataclass
class RegistryApp:
    """A built registry: start() serves, stop() drains and closes."""

    runtime: ServiceRuntime
    service: RegistryService
    repository: WorkerRepository
    sweeper: HealthSweeper
    pool: AsyncConnectionPool[Any]
    run_sweeper: bool = True

    async def start(self) -> None:
        await self.runtime.start()
        if self.run_sweeper:
            self.sweeper.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.runtime.stop(grace)

    async def run_until_signal(self) -> None:
        if self.run_sweeper:
            self.sweeper.start()
        await self.runtime.run_until_signal()


async def build_app(
    settings: RegistrySettings,
    *,
    clock: Clock | None = None,
    run_sweeper: bool = True,
) -> RegistryApp:
    """Open the pool, apply migrations and build (not start) the servers.

    ``clock`` and ``run_sweeper=False`` let tests drive the health timeline themselves.
    """
    logger = get_logger("service_registry")
    clock = clock or SystemClock()
    dsn = settings.postgres_dsn.get_secret_value()
    policy = settings.health_policy()
    ranker = WorkerRanker(policy=policy, weights=settings.ranking_weights())
    limits = settings.limits()

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        service_dsn(dsn, settings.service_name),
        min_size=settings.postgres_pool_min_size,
        max_size=settings.postgres_pool_max_size,
        # A single statement is its own transaction (one round trip, not BEGIN + statement
        # + COMMIT); multi-statement work opens one explicitly (WorkerRepository._transaction).
        kwargs={"autocommit": True},
        open=False,
        name="registry",
        # As every service's pool (hive_common.postgres.open_pool): back 10-13 s after a
        # database outage without it, and requests waiting 30 s for a connection in one.
        reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
        timeout=POOL_TIMEOUT_SECONDS,
    )
    await pool.open(wait=False)
    try:
        repository = WorkerRepository(pool=pool, policy=policy, ranker=ranker)
        await wait_for_dependency(
            repository.ping, name="postgresql", deadline_seconds=settings.startup_timeout_seconds
        )
        if settings.migrate_on_start:
            applied = await migrate_on_start(
                dsn=dsn,
                directory=MIGRATIONS_DIR,
                deadline_seconds=settings.startup_timeout_seconds,
            )
            if applied:
                logger.info("migrations applied", migrations=applied)
    except BaseException:
        await pool.close()
        raise

    metrics_registry = new_registry()
    metrics = RegistryMetrics(metrics_registry)
    service = RegistryService(
        store=repository,
        clock=clock,
        ranker=ranker,
        watch_poll_interval_seconds=settings.watch_poll_interval_seconds,
    )
    secret = settings.jwt_secret.get_secret_value()
    issuer = TokenIssuer(secret=secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    authorizer = Authorizer(
        verifier=settings.token_verifier(),
        registration_secret=(
            settings.registration_secret.get_secret_value()
            if settings.registration_secret
            else None
        ),
    )
    servicer = RegistryServicer(
        service=service,
        issuer=issuer,
        metrics=metrics,
        limits=limits,
        heartbeat_interval_seconds=settings.heartbeat_interval_seconds,
        worker_token_ttl_seconds=settings.worker_token_ttl_seconds,
    )
    grpc_server = build_grpc_server(
        services=[
            GrpcService(
                name=SERVICE_FULL_NAME,
                register=lambda server: pb_grpc.add_ServiceRegistryServicer_to_server(
                    servicer, server
                ),
            )
        ],
        metrics=RpcMetrics(metrics_registry),
        interceptors=[RegistryAuthInterceptor(authorizer=authorizer)],
        logger=logger,
    )

    async def schema_is_migrated() -> None:
        # Reads the tables and columns the registry uses, as the other services' checks do:
        # with MIGRATE_ON_START=false on a database without the migrations, every call
        # failed while /ready said ok. Not a read that moves the health timeline
        # (WorkerRepository._policy_at).
        try:
            await repository.latest_event_sequence()
            await repository.discovery_candidates(
                DiscoveryQuery(
                    required_capabilities=(),
                    label_selector={},
                    namespace="",
                    max_results=1,
                    include_full=True,
                ),
                now=clock.now(),
                seed=0,
                window=1,
            )
        except (Internal, Unavailable) as exc:  # a missing table is UNAVAILABLE
            if exc.details.get("sqlstate") not in SCHEMA_BEHIND_SQLSTATES:
                raise
            raise FailedPrecondition(
                "the database lacks the registry's schema (migrations not applied): apply "
                f"them, or set {settings.env_name('migrate_on_start')}=true"
            ) from exc

    async def readiness() -> dict[str, CheckResult]:
        # Together, within the probes' time (see check_dependency).
        postgresql, migrations = await asyncio.gather(
            check_dependency(repository.ping, last_error=lambda: connect_failure(dsn)),
            check_dependency(schema_is_migrated),
        )
        report: dict[str, CheckResult] = {"postgresql": postgresql}
        if postgresql["status"] == "ok":  # else it failed for the same reason
            report["migrations"] = migrations
        return report

    http_app = create_http_app(
        title="service-registry",
        version="1",
        readiness=readiness,
        metrics=HttpMetrics(metrics_registry),
        description="Live workers of Hive Flow C: registration, health and discovery.",
        logger=logger,
        bearer_auth=True,
    )
    http_app.include_router(build_router(service=service, authorizer=authorizer, limits=limits))

    sweeper = HealthSweeper(
        repository=repository,
        clock=clock,
        metrics=metrics,
        logger=logger,
        interval_seconds=settings.sweep_interval_seconds,
        mass_transition_threshold=settings.mass_transition_threshold,
        event_retention=timedelta(seconds=settings.event_retention_seconds),
    )
    runtime = ServiceRuntime.from_settings(
        settings,
        grpc_server=grpc_server,
        http_app=http_app,
        metrics_registry=metrics_registry,
        readiness=readiness,
        logger=logger,
    )
    runtime.add_before_stop_callback(service.end_watches)
    # Callbacks run last-added first: stop sweeping, then close the pool.
    runtime.add_shutdown_callback(pool.close)
    runtime.add_shutdown_callback(sweeper.stop)
    return RegistryApp(
        runtime=runtime,
        service=service,
        repository=repository,
        sweeper=sweeper,
        pool=pool,
        run_sweeper=run_sweeper,
    )
