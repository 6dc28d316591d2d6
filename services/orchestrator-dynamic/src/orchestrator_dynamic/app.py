"""The one place that builds and wires the orchestrator's objects."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hive_common.auth import TokenIssuer
from hive_common.clients import CallPolicy, RegistryClient, TicketClient
from hive_common.errors import HiveError
from hive_common.grpc_server import GrpcService, build_grpc_server
from hive_common.http import CheckResult, check_dependency, create_http_app
from hive_common.logging import get_logger
from hive_common.metrics import HttpMetrics, RpcMetrics, new_registry
from hive_common.migrations import migrate_on_start
from hive_common.postgres import connect_failure, service_dsn
from hive_common.runtime import ServiceRuntime
from neuralhive.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from orchestrator_dynamic.config import OrchestratorSettings
from orchestrator_dynamic.domain.clock import Clock, utc_now
from orchestrator_dynamic.domain.validation import PlanValidator
from orchestrator_dynamic.engine.driver import DriverSettings, PlanDriver
from orchestrator_dynamic.engine.health import REGISTRY, TICKET_SERVICE, DependencyHealth
from orchestrator_dynamic.engine.metrics import OrchestratorMetrics
from orchestrator_dynamic.engine.plans import PlanService
from orchestrator_dynamic.engine.tokens import ServiceTokenProvider
from orchestrator_dynamic.storage import MIGRATIONS_DIRECTORY, PlanRepository, Pool, open_pool
from orchestrator_dynamic.transport.grpc.servicer import SERVICE_NAME, OrchestratorServicer
from orchestrator_dynamic.transport.http.routes import build_router

VERSION = "0.1.0"
# A plan id no plan has: the readiness probe's ListTickets reads an empty index range.
_PROBE_PLAN = "orchestrator-readiness-probe"

log = get_logger(__name__)


@dataclass
class OrchestratorApp:
    """A built orchestrator: ``start()`` serves and drives plans, ``stop()`` releases
    every plan lease (another replica takes over at once) and closes everything."""

    runtime: ServiceRuntime
    driver: PlanDriver
    plans: PlanService
    repository: PlanRepository
    tickets: TicketClient
    registry: RegistryClient
    pool: Pool

    async def start(self) -> None:
        await self.runtime.start()
        await self.driver.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.runtime.stop(grace)

    async def run_until_signal(self) -> None:
        await self.driver.start()
        await self.runtime.run_until_signal()

    async def _shutdown(self) -> None:
        await self.driver.stop()
        await self.tickets.close()
        await self.registry.close()
        await self.pool.close()


def default_owner_id() -> str:
    """Host name plus a random suffix: a restarted process is a new owner."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


async def build_app(
    settings: OrchestratorSettings,
    *,
    clock: Clock = utc_now,
) -> OrchestratorApp:
    """Wait for PostgreSQL, apply migrations, then build (not start) the service."""
    dsn = settings.postgres_dsn.get_secret_value()

    applied = await migrate_on_start(
        dsn=dsn, directory=MIGRATIONS_DIRECTORY, deadline_seconds=settings.startup_timeout_seconds
    )
    log.info("migrations applied", applied=applied)
    pool = open_pool(
        service_dsn(dsn, settings.service_name),
        min_size=settings.postgres_pool_min_size,
        max_size=settings.postgres_pool_max_size,
    )
    await pool.open(wait=True, timeout=settings.startup_timeout_seconds)
    repository = PlanRepository(pool=pool, clock=clock)

    secret = settings.jwt_secret.get_secret_value()
    issuer = TokenIssuer(secret=secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    token_provider = ServiceTokenProvider(
        issuer=issuer, service=settings.service_name, ttl_seconds=settings.service_token_ttl_seconds
    )
    call_policy = CallPolicy(
        timeout_seconds=settings.rpc_timeout_seconds,
        deadline_seconds=max(settings.rpc_deadline_seconds, settings.rpc_timeout_seconds),
    )
    tickets = TicketClient.connect(
        settings.ticket_service_target, token_provider=token_provider, policy=call_policy
    )
    registry = RegistryClient.connect(
        settings.registry_target, token_provider=token_provider, policy=call_policy
    )
    health = DependencyHealth()
    metrics_registry = new_registry()
    metrics = OrchestratorMetrics(metrics_registry)
    policy = settings.scheduling_policy()
    driver = PlanDriver(
        repository=repository,
        tickets=tickets,
        registry=registry,
        policy=policy,
        health=health,
        metrics=metrics,
        clock=clock,
        settings=DriverSettings(
            owner_id=settings.owner_id or default_owner_id(),
            lease_ttl=settings.lease_ttl,
            lease_renew_interval=settings.lease_renew_interval_seconds,
            claim_interval=settings.claim_interval_seconds,
            resync_interval=settings.resync_interval_seconds,
            dispatch_retry=settings.dispatch_retry_seconds,
            discovery_cache=settings.discovery_cache_seconds,
            error_retry=settings.error_retry_seconds,
            ticket_batch_size=settings.ticket_batch_size,
            assign_lease_seconds=settings.assign_lease_seconds,
            namespace=settings.worker_namespace,
        ),
    )
    plans = PlanService(
        repository=repository,
        validator=PlanValidator(limits=settings.plan_limits()),
        driver=driver,
        registry=registry,
        policy=policy,
        health=health,
        metrics=metrics,
        namespace=settings.worker_namespace,
        submit_wait_seconds=settings.submit_wait_seconds,
        registry_deadline_seconds=settings.rpc_timeout_seconds,
        clock=clock,
    )

    async def probe(name: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
            health.succeeded(name)
        except HiveError as exc:
            health.failed(name, f"{type(exc).__name__}: {exc.message}")

    async def readiness() -> dict[str, CheckResult]:
        # Together, so that /ready stays within the probes' timeouts. The remote services
        # only delay work: degraded, never down. A cheap call to each (with the service
        # token) refreshes what the driver last saw.
        postgresql, _, _ = await asyncio.gather(
            check_dependency(
                lambda: repository.list_plans(page_size=1), last_error=lambda: connect_failure(dsn)
            ),
            probe(
                TICKET_SERVICE,
                lambda: tickets.list_tickets(plan_id=_PROBE_PLAN, page_size=1, deadline=1.0),
            ),
            probe(REGISTRY, lambda: registry.list_workers(page_size=1, deadline=1.0)),
        )
        return {"postgresql": postgresql, **health.report()}

    http_app = create_http_app(
        title="orchestrator-dynamic",
        version=VERSION,
        description="Hive Flow C plan orchestrator: submit DAGs of tasks and follow them.",
        readiness=readiness,
        metrics=HttpMetrics(metrics_registry),
        bearer_auth=settings.api_token is not None,
    )
    http_app.include_router(
        build_router(
            plans=plans,
            max_request_bytes=settings.max_request_bytes,
            api_token=settings.api_token.get_secret_value() if settings.api_token else None,
        )
    )
    grpc_server = None
    servicer: OrchestratorServicer | None = None
    if settings.grpc_enabled:
        servicer = OrchestratorServicer(
            plans=plans,
            api_token=settings.api_token.get_secret_value() if settings.api_token else None,
            watch_interval_seconds=settings.watch_plan_interval_seconds,
            max_watch_streams=settings.watch_plan_max_streams,
        )
        grpc_server = build_grpc_server(
            services=[
                GrpcService(
                    name=SERVICE_NAME,
                    register=lambda server: pb_grpc.add_OrchestratorServiceServicer_to_server(
                        servicer, server
                    ),
                )
            ],
            metrics=RpcMetrics(metrics_registry),
            # A plan HTTP accepts (MAX_REQUEST_BYTES) is accepted over gRPC too.
            max_receive_message_bytes=settings.max_request_bytes,
        )
    runtime = ServiceRuntime.from_settings(
        settings,
        grpc_server=grpc_server,
        http_app=http_app,
        metrics_registry=metrics_registry,
        readiness=readiness,
        readiness_interval_seconds=settings.readiness_interval_seconds,
    )
    app = OrchestratorApp(
        runtime=runtime,
        driver=driver,
        plans=plans,
        repository=repository,
        tickets=tickets,
        registry=registry,
        pool=pool,
    )
    if servicer is not None:
        # WatchPlan streams of unsettled plans never end on their own.
        runtime.add_before_stop_callback(servicer.end_watches)
    runtime.add_shutdown_callback(app._shutdown)
    return app
