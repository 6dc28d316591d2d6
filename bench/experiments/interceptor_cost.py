"""What does the common gRPC server chain cost per RPC? (finding for hive_common.grpc_server)

Serves the echo service (bench/echo.py: same messages as the ticket service, no database)
twice in this one process, a client calling UpdateTicketStatus from ``concurrency``
coroutines against each:

* ``bare``: ``grpc.aio.server()`` with no interceptors (the echo baseline of the report);
* ``hive chain``: :func:`hive_common.grpc_server.build_grpc_server` (canonical log line at
  INFO, metrics, error mapping) with an interceptor that verifies the bearer JWT as the
  ticket service's does (cached).

Reports this process's CPU per RPC (client + server: the client half is the same in both)
and the difference. Logs go to /dev/null. Run:
``uv run --all-packages python -m bench.experiments.interceptor_cost``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench.echo import EchoTicketService
from bench.stats import closed_loop
from hive_common.auth import TokenIssuer, TokenVerifier
from hive_common.grpc_server import GrpcService, build_grpc_server
from hive_common.logging import configure_logging
from hive_common.metrics import RpcMetrics, new_registry
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

SECRET = "interceptor-cost-experiment-secret-0123456789"


class VerifyingInterceptor(grpc.aio.ServerInterceptor):
    """Stands in for the ticket service's auth interceptor: verify (cached), then call."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        self._cache: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        token = str(metadata.get("authorization", "")).removeprefix("Bearer ")
        if token not in self._cache:
            self._cache[token] = self._verifier.verify(token)
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _measure(server: grpc.aio.Server, *, concurrency: int, total: int, token: str) -> float:
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request = pb.UpdateTicketStatusRequest(
        ticket_id="6f1f0a3e-8a47-4cf8-9a0f-3c1d1fbb7a11", status=pb.TICKET_STATUS_RUNNING, attempt=1
    )
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TicketServiceStub(channel)
            await closed_loop(
                lambda i: stub.UpdateTicketStatus(request, metadata=metadata),
                concurrency=concurrency,
                total=total // 10,
            )  # warm-up
            started = time.process_time()
            result = await closed_loop(
                lambda i: stub.UpdateTicketStatus(request, metadata=metadata),
                concurrency=concurrency,
                total=total,
            )
            cpu = time.process_time() - started
            assert result.errors == 0, result.first_error
    finally:
        await server.stop(None)
    return cpu / total * 1e6


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    issuer = TokenIssuer(secret=SECRET, issuer="bench")
    token, _ = issuer.issue_service_token(service="bench", ttl_seconds=3600)
    verifier = TokenVerifier(secret=SECRET)

    def bare() -> grpc.aio.Server:
        server = grpc.aio.server()
        pb_grpc.add_TicketServiceServicer_to_server(EchoTicketService(), server)  # type: ignore[abstract]
        return server

    def hive() -> grpc.aio.Server:
        built = build_grpc_server(
            services=[
                GrpcService(
                    name="neuralhive.ticket.v1.TicketService",
                    register=lambda s: pb_grpc.add_TicketServiceServicer_to_server(
                        EchoTicketService(),  # type: ignore[abstract]
                        s,
                    ),
                )
            ],
            metrics=RpcMetrics(new_registry()),
            interceptors=[VerifyingInterceptor(verifier)],
        )
        return built.server

    results: dict[str, list[float]] = {"bare": [], "hive chain": []}
    for _ in range(args.rounds):  # alternate, so drift of the machine hits both alike
        for name, build in (("bare", bare), ("hive chain", hive)):
            results[name].append(
                await _measure(build(), concurrency=args.concurrency, total=args.calls, token=token)
            )
    best = {name: min(values) for name, values in results.items()}
    return {
        "concurrency": args.concurrency,
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "cpu_us_per_rpc_client_and_server_best": best,
        "chain_cost_us_per_rpc": best["hive chain"] - best["bare"],
        "all_rounds": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        configure_logging(level="INFO", fmt="json", stream=devnull)
        print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
