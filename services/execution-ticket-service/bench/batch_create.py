"""Benchmark of the BatchCreateTickets fast path (storage only: one transaction per batch).

    uv run --all-packages python services/execution-ticket-service/bench/batch_create.py \
        [--dsn postgresql://...] [--batch 1000] [--batches 20] [--concurrency 2]

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

import execution_ticket_service.storage as storage_pkg
from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.storage.tickets import TicketRepository, open_pool
from hive_common.localdb import LocalPostgres
from hive_common.migrations import apply_migrations


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
    args = parser.parse_args()
    with database(args.dsn) as dsn:
        asyncio.run(run(dsn, args.batch, args.batches, args.concurrency))


if __name__ == "__main__":
    main()
