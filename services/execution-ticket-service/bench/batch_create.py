"""Benchmark of the BatchCreateTickets fast path (one transaction per batch).

By default it measures the repository alone; ``--grpc`` sends the same load through the
real gRPC server (protobuf mapping, validation and auth included).

    uv run --all-packages python services/execution-ticket-service/bench/batch_create.py \
        [--dsn postgresql://...] [--batch 1000] [--batches 20] [--concurrency 2] [--grpc]

Without ``--dsn`` it starts a throwaway local PostgreSQL (``durable=False``: fsync off, so
the figure is an upper bound for the code path, not for a durable server). Prints a report;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from pydantic import SecretStr

import execution_ticket_service.storage as storage_pkg
from execution_ticket_service.app import build_service
from execution_ticket_service.config import TicketSettings
from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.storage.tickets import TicketRepository, open_pool
from hive_common.auth import TokenIssuer
from hive_common.localdb import LocalPostgres
from hive_common.migrations import apply_migrations
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

BENCH_SECRET = "benchmark-only-secret-0123456789abcdef"


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    server = LocalPostgres(durable=False)
    server.start()
    try:
        yield server.ensure_database("bench_tickets")
    finally:
        server.close()


async def run_grpc(dsn: str, batch: int, batches: int, concurrency: int) -> None:
    """The same load through the real gRPC server (protobuf, validation, auth included)."""
    settings = TicketSettings(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        postgres_dsn=dsn,
        mongo_uri="mongodb://127.0.0.1:9",  # no audit store: the relay just backs off
        mongo_timeout_ms=200,
        jwt_secret=SecretStr(BENCH_SECRET),
    )
    service = await build_service(settings)
    await service.start()
    token, _ = TokenIssuer(secret=BENCH_SECRET, issuer="bench").issue_service_token(
        service="bench", ttl_seconds=3600
    )
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{service.runtime.grpc_port}",
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        ) as channel:
            stub = pb_grpc.TicketServiceStub(channel)
            requests = []
            for n in range(batches):
                tickets = []
                for i in range(batch):
                    spec = pb.TicketSpec(
                        plan_id=f"grpc-plan-{n}",
                        task_id=f"task-{i}",
                        task_type="echo",
                        required_capabilities=["python"],
                        depends_on=[f"task-{i - 1}"] if i else [],
                    )
                    spec.parameters.update({"message": "hello", "index": i})
                    tickets.append(spec)
                requests.append(pb.BatchCreateTicketsRequest(tickets=tickets))
            queue: asyncio.Queue[pb.BatchCreateTicketsRequest] = asyncio.Queue()
            for request in requests:
                queue.put_nowait(request)

            async def worker() -> None:
                while not queue.empty():
                    await stub.BatchCreateTickets(queue.get_nowait(), metadata=metadata)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
            total = batch * batches
            print(
                f"gRPC: created {total} tickets in {batches} batches of {batch} "
                f"(concurrency {concurrency}) in {elapsed:.2f}s: {total / elapsed:,.0f} tickets/s"
            )
    finally:
        await service.stop(1)


async def run(dsn: str, batch: int, batches: int, concurrency: int) -> None:
    apply_migrations(dsn=dsn, directory=Path(storage_pkg.__file__).parent / "migrations")
    pool = open_pool(dsn, min_size=concurrency, max_size=concurrency)
    await pool.open(wait=True)
    repo = TicketRepository(pool=pool)
    try:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(batches):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                specs = [
                    TicketSpec(
                        plan_id=f"plan-{n}",
                        task_id=f"task-{i}",
                        task_type="echo",
                        parameters={"message": "hello", "index": i},
                        required_capabilities=("python",),
                        depends_on=(f"task-{i - 1}",) if i else (),
                    )
                    for i in range(batch)
                ]
                await repo.create_many(specs, actor="service:bench")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        total = batch * batches
        print(
            f"created {total} tickets in {batches} batches of {batch} "
            f"(concurrency {concurrency}) in {elapsed:.2f}s: {total / elapsed:,.0f} tickets/s"
        )
        start = time.perf_counter()
        await repo.create_many(specs_for_retry(batch), actor="service:bench")
        print(f"idempotent retry of one batch of {batch}: {time.perf_counter() - start:.3f}s")
    finally:
        await pool.close()


def specs_for_retry(batch: int) -> list[TicketSpec]:
    return [
        TicketSpec(
            plan_id="plan-0",
            task_id=f"task-{i}",
            task_type="echo",
            parameters={"message": "hello", "index": i},
            required_capabilities=("python",),
            depends_on=(f"task-{i - 1}",) if i else (),
        )
        for i in range(batch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--grpc", action="store_true", help="go through the gRPC server")
    args = parser.parse_args()
    with database(args.dsn) as dsn:
        bench = run_grpc if args.grpc else run
        asyncio.run(bench(dsn, args.batch, args.batches, args.concurrency))


if __name__ == "__main__":
    main()
