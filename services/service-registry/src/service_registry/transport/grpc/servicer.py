"""gRPC ServiceRegistry: maps requests to RegistryService calls and results back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from hive_common.auth import TokenIssuer
from hive_common.errors import HiveError, NotFound
from hive_common.logging import get_logger
from hive_common.timestamps import datetime_to_timestamp
from neuralhive.registry.v1 import registry_service_pb2 as pb
from neuralhive.registry.v1 import registry_service_pb2_grpc as pb_grpc
from service_registry.domain.lifecycle import WorkerExpired, WorkerNameInUse
from service_registry.domain.models import Worker, WorkerEventType
from service_registry.domain.service import RegistryService
from service_registry.domain.validation import (
    Limits,
    encode_cursor,
    parse_worker_id,
    validate_discovery,
    validate_heartbeat,
    validate_list,
    validate_registration,
    validate_watch,
)
from service_registry.metrics import RegistryMetrics
from service_registry.transport.grpc.auth import require_worker
from service_registry.transport.grpc.mapping import (
    event_to_pb,
    ranked_to_pb,
    statuses_from_pb,
    worker_to_pb,
)

_log = get_logger("service_registry.heartbeat")


def _warn_if_over_capacity(worker: Worker, previous: Worker | None) -> None:
    """Log the first heartbeat of an episode over ``max_concurrent``. Such a heartbeat is
    accepted, not refused: a worker may hold more for a while (attempts the ticket service
    has moved on, a re-registration with a lower capacity), and refusing its heartbeats
    would make it UNHEALTHY. Discovery counts it as full (spare capacity 0)."""
    if worker.in_flight <= worker.max_concurrent:
        return
    if previous is not None and previous.in_flight > previous.max_concurrent:
        return
    _log.warning(
        "worker reports more tasks in flight than its max_concurrent",
        worker_id=str(worker.worker_id),
        name=worker.name,
        namespace=worker.namespace,
        in_flight=worker.in_flight,
        max_concurrent=worker.max_concurrent,
    )


class RegistryServicer(pb_grpc.ServiceRegistryServicer):
    def __init__(
        self,
        *,
        service: RegistryService,
        issuer: TokenIssuer,
        metrics: RegistryMetrics,
        limits: Limits,
        heartbeat_interval_seconds: int,
        worker_token_ttl_seconds: int,
    ) -> None:
        self._service = service
        self._issuer = issuer
        self._metrics = metrics
        self._limits = limits
        self._interval = heartbeat_interval_seconds
        self._token_ttl = worker_token_ttl_seconds

    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        spec = validate_registration(
            name=request.name,
            namespace=request.namespace,
            capabilities=list(request.capabilities),
            labels=dict(request.labels),
            max_concurrent=request.max_concurrent,
            version=request.version,
            instance_id=request.instance_id,
        )
        try:
            transition = await self._service.register(spec)
        except WorkerNameInUse:
            self._metrics.registrations.labels("name_in_use").inc()
            raise
        self._metrics.registrations.labels("again" if transition.previous else "new").inc()
        self._metrics.count_events([e.type for e in transition.events])
        worker = transition.worker
        token, claims = self._issuer.issue_worker_token(
            worker_id=str(worker.worker_id), ttl_seconds=self._token_ttl
        )
        return pb.RegisterResponse(
            worker=worker_to_pb(worker),
            token=token,
            token_expires_at=datetime_to_timestamp(claims.expires_at),
            heartbeat_interval_seconds=self._interval,
        )

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        try:
            update = validate_heartbeat(
                worker_id=request.worker_id,
                in_flight=request.in_flight,
                succeeded_total=(
                    request.succeeded_total if request.HasField("succeeded_total") else None
                ),
                failed_total=request.failed_total if request.HasField("failed_total") else None,
                draining=request.draining,
            )
            require_worker(str(update.worker_id))
        except HiveError:
            self._metrics.heartbeats.labels("refused").inc()
            raise
        try:
            transition = await self._service.heartbeat(update)
        except NotFound as exc:
            self._metrics.heartbeats.labels("not_found").inc()
            if isinstance(exc, WorkerExpired):  # this heartbeat published the EXPIRED event
                self._metrics.count_events([WorkerEventType.EXPIRED])
            raise
        self._metrics.heartbeats.labels("ok").inc()
        self._metrics.count_events([e.type for e in transition.events])
        _warn_if_over_capacity(transition.worker, transition.previous)
        return pb.HeartbeatResponse(
            worker=worker_to_pb(transition.worker), heartbeat_interval_seconds=self._interval
        )

    async def Deregister(
        self, request: pb.DeregisterRequest, context: Any
    ) -> pb.DeregisterResponse:
        worker_id = parse_worker_id(request.worker_id)
        require_worker(str(worker_id))
        event = await self._service.deregister(worker_id)
        if event is not None:  # DEREGISTERED, or EXPIRED for a worker past its TTL
            self._metrics.count_events([event.type])
        return pb.DeregisterResponse()

    async def DiscoverWorkers(
        self, request: pb.DiscoverWorkersRequest, context: Any
    ) -> pb.DiscoverWorkersResponse:
        started = time.perf_counter()
        query = validate_discovery(
            required_capabilities=list(request.required_capabilities),
            label_selector=dict(request.label_selector),
            namespace=request.namespace,
            max_results=request.max_results,
            limits=self._limits,
            include_full=request.include_full,
        )
        ranked = await self._service.discover(query)
        self._metrics.discovery_seconds.observe(time.perf_counter() - started)
        self._metrics.discovery_results.observe(len(ranked))
        return pb.DiscoverWorkersResponse(workers=[ranked_to_pb(r) for r in ranked])

    async def GetWorker(self, request: pb.GetWorkerRequest, context: Any) -> pb.GetWorkerResponse:
        worker = await self._service.get(parse_worker_id(request.worker_id))
        return pb.GetWorkerResponse(worker=worker_to_pb(worker))

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Any
    ) -> pb.ListWorkersResponse:
        statuses, violations = statuses_from_pb(list(request.statuses))
        query = validate_list(
            namespace=request.namespace,
            statuses=statuses,
            capability=request.capability,
            page_size=request.page_size,
            page_token=request.page_token,
            limits=self._limits,
            status_violations=violations,
        )
        page = await self._service.list_workers(query)
        return pb.ListWorkersResponse(
            workers=[worker_to_pb(w) for w in page.workers],
            next_page_token=encode_cursor(page.next_cursor) if page.next_cursor else "",
        )

    async def WatchWorkers(
        self, request: pb.WatchWorkersRequest, context: Any
    ) -> AsyncIterator[pb.WatchWorkersResponse]:
        # Same rules as elsewhere; an invalid namespace could never match anything.
        namespace = validate_watch(namespace=request.namespace)
        position = await self._service.watch_position()
        # Initial metadata tells the client the watch is live: nothing after it is missed.
        await context.send_initial_metadata(())
        async for event in self._service.watch(namespace=namespace, after=position):
            yield pb.WatchWorkersResponse(event=event_to_pb(event))
