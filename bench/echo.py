"""A bare grpc.aio echo service: the transport floor the real services are compared with.

It serves the same RPC names and message types as the ticket service and the registry
(so the client code, protobuf (de)serialisation and HTTP/2 framing are identical) but has
no interceptors, auth, validation or database: each handler builds a response of the same
shape from the request. Run as its own process: ``python -m bench.echo --port N``.

With ``--postgres-dsn`` it is the *durable floor* instead: CreateTicket and
UpdateTicketStatus each first insert one row into a one-table database and commit it (one
autocommit statement on a pooled connection, as durable as the server's settings), the
least any service that stores a change before answering pays on top of the transport.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from hive_common.grpc_server import EXCLUSIVE_PORT
from neuralhive.registry.v1 import registry_service_pb2 as rpb
from neuralhive.registry.v1 import registry_service_pb2_grpc as rpb_grpc
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

READY_LINE = "bench echo server listening on port"


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _ticket_from_spec(spec: pb.TicketSpec) -> pb.ExecutionTicket:
    now = _now()
    return pb.ExecutionTicket(
        ticket_id=str(uuid.uuid4()),
        plan_id=spec.plan_id,
        intent_id=spec.intent_id,
        task_id=spec.task_id,
        task_type=spec.task_type,
        description=spec.description,
        parameters=spec.parameters,
        required_capabilities=spec.required_capabilities,
        depends_on=spec.depends_on,
        priority=spec.priority or pb.PRIORITY_NORMAL,
        status=pb.TICKET_STATUS_PENDING,
        attempt=1,
        max_retries=spec.max_retries,
        timeout_seconds=spec.timeout_seconds or 3600,
        version=1,
        created_at=now,
        updated_at=now,
    )


class EchoTicketService(pb_grpc.TicketServiceServicer):
    async def CreateTicket(self, request: pb.CreateTicketRequest, context: Any) -> Any:
        return pb.CreateTicketResponse(ticket=_ticket_from_spec(request.ticket), created=True)

    async def BatchCreateTickets(self, request: pb.BatchCreateTicketsRequest, context: Any) -> Any:
        tickets = [_ticket_from_spec(spec) for spec in request.tickets]
        return pb.BatchCreateTicketsResponse(tickets=tickets, created_count=len(tickets))

    async def UpdateTicketStatus(self, request: pb.UpdateTicketStatusRequest, context: Any) -> Any:
        now = _now()
        ticket = pb.ExecutionTicket(
            ticket_id=request.ticket_id,
            plan_id="bench-plan",
            task_id="task",
            task_type="echo",
            status=request.status,
            attempt=request.attempt,
            worker_id="bench-worker",
            result=request.result,
            error_message=request.error_message,
            version=request.expected_version + 1 if request.HasField("expected_version") else 2,
            created_at=now,
            updated_at=now,
            started_at=now,
        )
        return pb.UpdateTicketStatusResponse(ticket=ticket)


_FLOOR_TABLE = """
CREATE TABLE IF NOT EXISTS echo_writes (
    seq bigserial PRIMARY KEY,
    ticket_id text NOT NULL,
    status integer NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
)
"""
_FLOOR_INSERT = "INSERT INTO echo_writes (ticket_id, status) VALUES (%s, %s)"


class DurableEchoTicketService(EchoTicketService):
    """The echo, after committing one row per CreateTicket / UpdateTicketStatus."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _write(self, ticket_id: str, status: int) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(_FLOOR_INSERT, (ticket_id, status))

    async def CreateTicket(self, request: pb.CreateTicketRequest, context: Any) -> Any:
        await self._write(f"{request.ticket.plan_id}/{request.ticket.task_id}", 0)
        return await super().CreateTicket(request, context)

    async def UpdateTicketStatus(self, request: pb.UpdateTicketStatusRequest, context: Any) -> Any:
        await self._write(request.ticket_id, request.status)
        return await super().UpdateTicketStatus(request, context)


class EchoRegistry(rpb_grpc.ServiceRegistryServicer):
    def __init__(self) -> None:
        now = _now()
        self._workers = [
            rpb.RankedWorker(
                worker=rpb.Worker(
                    worker_id=str(uuid.uuid4()),
                    name=f"worker-{i}",
                    namespace="default",
                    capabilities=["python", "bench"],
                    labels={"zone": "a"},
                    max_concurrent=4,
                    version="0.1.0",
                    status=rpb.WORKER_STATUS_HEALTHY,
                    registered_at=now,
                    last_heartbeat_at=now,
                ),
                score=0.9,
                spare_capacity=4,
            )
            for i in range(100)
        ]

    async def DiscoverWorkers(self, request: rpb.DiscoverWorkersRequest, context: Any) -> Any:
        count = request.max_results or 10
        return rpb.DiscoverWorkersResponse(workers=self._workers[:count])

    async def Heartbeat(self, request: rpb.HeartbeatRequest, context: Any) -> Any:
        worker = rpb.Worker()
        worker.CopyFrom(self._workers[0].worker)
        worker.worker_id = request.worker_id
        worker.in_flight = request.in_flight
        worker.last_heartbeat_at.CopyFrom(_now())
        return rpb.HeartbeatResponse(worker=worker, heartbeat_interval_seconds=5)


async def serve(port: int, postgres_dsn: str | None = None) -> None:
    # The generated base classes answer UNIMPLEMENTED for the RPCs not overridden here.
    tickets = EchoTicketService()  # type: ignore[abstract]
    pool = None
    if postgres_dsn:
        # The ticket service's pool sizes (HIVE_TICKETS_POSTGRES_POOL_MIN_SIZE, _MAX_SIZE).
        pool = AsyncConnectionPool(
            postgres_dsn, min_size=2, max_size=20, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute(_FLOOR_TABLE)
        tickets = DurableEchoTicketService(pool)  # type: ignore[abstract]
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    pb_grpc.add_TicketServiceServicer_to_server(tickets, server)
    rpb_grpc.add_ServiceRegistryServicer_to_server(EchoRegistry(), server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"{READY_LINE} {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)
    if pool is not None:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="bare grpc.aio echo service (benchmark floor)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--postgres-dsn", help="commit one row per CreateTicket / UpdateTicketStatus first"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.postgres_dsn))


if __name__ == "__main__":
    main()
