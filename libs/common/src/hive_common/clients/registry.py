"""Typed client of ``neuralhive.registry.v1.ServiceRegistry``.

Every ServiceRegistry RPC is idempotent (Register on ``(namespace, name)``; heartbeats
carry absolute values; Deregister of a gone worker succeeds; the rest are reads), so
unary calls retry UNAVAILABLE / DEADLINE_EXCEEDED within the overall deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from hive_common.clients._calls import (
    CallPolicy,
    GrpcClient,
    Metadata,
    ReconnectingStream,
    ReconnectPolicy,
    Sleep,
    bearer_metadata,
)
from neuralhive.registry.v1 import registry_service_pb2 as pb
from neuralhive.registry.v1 import registry_service_pb2_grpc as pb_grpc

OnConnected = Callable[[], Awaitable[None]]


class WorkerWatch(ReconnectingStream[pb.WatchWorkersResponse, pb.WorkerEvent]):
    """``WatchWorkers`` as an async iterator of :class:`WorkerEvent` that reconnects.

    The contract has no resume cursor: a reconnected stream starts at "now", so events
    during the gap are not replayed. Pass ``on_connected`` to re-read the state you
    need (DiscoverWorkers / ListWorkers): it runs each time a stream is live (the
    registry sends initial metadata once its position is fixed), so state read then plus
    the events that follow miss nothing.
    """

    def __init__(
        self,
        *,
        stub: pb_grpc.ServiceRegistryAsyncStub,
        namespace: str,
        metadata: Metadata | None,
        reconnect: ReconnectPolicy | None,
        on_connected: OnConnected | None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            method=stub.WatchWorkers, metadata=metadata, reconnect=reconnect, sleep=sleep
        )
        self._namespace = namespace
        self._on_connected = on_connected

    def _request(self) -> pb.WatchWorkersRequest:
        return pb.WatchWorkersRequest(namespace=self._namespace)

    def _accept(self, response: pb.WatchWorkersResponse) -> tuple[pb.WorkerEvent]:
        return (response.event,)

    async def _connected(
        self, call: grpc.aio.UnaryStreamCall[Any, pb.WatchWorkersResponse]
    ) -> None:
        if self._on_connected is None:
            return
        try:
            await call.initial_metadata()
        except grpc.aio.AioRpcError:
            return  # the next read reports the failure (translated) and reconnects
        if call.done():
            return  # failed before going live: nothing to resynchronise against
        await self._on_connected()


class RegistryClient(GrpcClient):
    """One method per ServiceRegistry RPC, keyword arguments in, protobuf messages out.

    The channel's token provider supplies the bearer token; every method takes
    ``token=`` to use another one for that call (a worker registers with the
    registration secret, then heartbeats with its worker token).
    """

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        policy: CallPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        owns_channel: bool = False,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            channel=channel,
            policy=policy,
            reconnect=reconnect,
            owns_channel=owns_channel,
            sleep=sleep,
        )
        self._stub: pb_grpc.ServiceRegistryAsyncStub = pb_grpc.ServiceRegistryStub(channel)

    async def register(
        self,
        *,
        name: str,
        capabilities: Iterable[str],
        max_concurrent: int,
        namespace: str = "",
        labels: Mapping[str, str] | None = None,
        version: str = "",
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
        instance_id: str = "",
    ) -> pb.RegisterResponse:
        """Register (or re-register) the worker ``(namespace, name)``; returns its worker
        token and the heartbeat interval to use. ``instance_id`` (one per worker process)
        lets the registry refuse a second live process under the same name."""
        return await self._invoke(
            self._stub.Register,
            pb.RegisterRequest(
                name=name,
                namespace=namespace,
                capabilities=list(capabilities),
                labels=dict(labels or {}),
                max_concurrent=max_concurrent,
                version=version,
                instance_id=instance_id,
            ),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def heartbeat(
        self,
        *,
        worker_id: str,
        in_flight: int,
        succeeded_total: int | None = None,
        failed_total: int | None = None,
        draining: bool = False,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.HeartbeatResponse:
        """Report liveness and load; ``NotFound`` means the worker must register again."""
        request = pb.HeartbeatRequest(worker_id=worker_id, in_flight=in_flight, draining=draining)
        if succeeded_total is not None:
            request.succeeded_total = succeeded_total
        if failed_total is not None:
            request.failed_total = failed_total
        return await self._invoke(
            self._stub.Heartbeat,
            request,
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def deregister(
        self,
        *,
        worker_id: str,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Remove the worker (a worker already gone is not an error)."""
        await self._invoke(
            self._stub.Deregister,
            pb.DeregisterRequest(worker_id=worker_id),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def discover_workers(
        self,
        *,
        required_capabilities: Iterable[str] = (),
        label_selector: Mapping[str, str] | None = None,
        namespace: str = "",
        max_results: int = 0,
        include_full: bool = False,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> list[pb.RankedWorker]:
        """Healthy workers with spare capacity and every capability, best first
        (``include_full``: also those with no spare slot at their last heartbeat)."""
        response = await self._invoke(
            self._stub.DiscoverWorkers,
            pb.DiscoverWorkersRequest(
                required_capabilities=list(required_capabilities),
                label_selector=dict(label_selector or {}),
                namespace=namespace,
                max_results=max_results,
                include_full=include_full,
            ),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return list(response.workers)

    async def get_worker(
        self,
        *,
        worker_id: str,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.Worker:
        """The worker ``worker_id`` (``NotFound`` if unknown or expired)."""
        response = await self._invoke(
            self._stub.GetWorker,
            pb.GetWorkerRequest(worker_id=worker_id),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return response.worker

    async def list_workers(
        self,
        *,
        namespace: str = "",
        statuses: Iterable[pb.WorkerStatus.ValueType] = (),
        capability: str = "",
        page_size: int = 0,
        page_token: str = "",
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.ListWorkersResponse:
        """One page of workers; pass ``next_page_token`` back for the next one."""
        return await self._invoke(
            self._stub.ListWorkers,
            pb.ListWorkersRequest(
                namespace=namespace,
                statuses=list(statuses),
                capability=capability,
                page_size=page_size,
                page_token=page_token,
            ),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    def watch_workers(
        self,
        *,
        namespace: str = "",
        on_connected: OnConnected | None = None,
        reconnect: bool = True,
        token: str | None = None,
    ) -> WorkerWatch:
        """Follow worker changes (see :class:`WorkerWatch`)."""
        return WorkerWatch(
            stub=self._stub,
            namespace=namespace,
            metadata=bearer_metadata(token),
            reconnect=self._reconnect if reconnect else None,
            on_connected=on_connected,
            sleep=self._sleep,
        )


__all__ = ["OnConnected", "RegistryClient", "WorkerWatch"]
