"""A bare grpc.aio echo service: the transport floor the real services are compared with.

It serves the same RPC names and message types as the ticket service and the registry
(so the client code, protobuf (de)serialisation and HTTP/2 framing are identical) but has
no interceptors, auth, validation or database: each handler builds a response of the same
shape from the request. Run as its own process: ``python -m bench.echo --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

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


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # The generated base classes answer UNIMPLEMENTED for the RPCs not overridden here.
    pb_grpc.add_TicketServiceServicer_to_server(EchoTicketService(), server)  # type: ignore[abstract]
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


def main() -> None:
    parser = argparse.ArgumentParser(description="bare grpc.aio echo service (benchmark floor)")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
