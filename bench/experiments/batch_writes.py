"""A batch of ticket changes: one statement for all, or one statement each? (finding for
the ticket service's ``_BATCH_STATEMENT_MIN``)

Runs ``TicketRepository.update_status_many`` over batches of ``k`` status reports
(RUNNING, then COMPLETED, for fresh tickets of a growing table), two ways, alternating:

* ``batch statement``: every change of the batch and its event in one statement (the
  changes as one JSON parameter), whatever the batch size;
* ``single statements``: one statement per change, in the same transaction.

Reports this process's CPU (the service pays the same client cost), PostgreSQL's CPU and
the wall time, per change. Run:
``uv run --all-packages python -m bench.experiments.batch_writes``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench import cpu
from bench.environment import databases
from execution_ticket_service.domain.models import (
    Assignment,
    StatusUpdate,
    TicketSpec,
    TicketStatus,
)
from execution_ticket_service.storage import MIGRATIONS_DIRECTORY
from execution_ticket_service.storage import tickets as storage
from hive_common.migrations import apply_migrations
from hive_common.postgres import open_pool

VARIANTS = {"batch statement": 1, "single statements": 1_000_000}


def postgres_seconds() -> float:
    return sum(cpu.process_seconds(pid) for pid in cpu.pids_with_argument("postgres"))


async def measure(
    repo: storage.TicketRepository, name: str, k: int, tickets: int, round_: int
) -> str:
    plan_id = f"{name}-{k}-{round_}"  # fresh tickets every time
    specs = [TicketSpec(plan_id=plan_id, task_id=f"t{i}", task_type="echo") for i in range(tickets)]
    created = await repo.create_many(specs, actor="service:bench")
    assert all(new for _, new in created)
    ids = [ticket.ticket_id for ticket, _ in created]
    await repo.assign_many(
        [Assignment(ticket_id=i, worker_id="w1", lease_seconds=600, attempt=1) for i in ids],
        actor="service:bench",
    )
    storage._BATCH_STATEMENT_MIN = VARIANTS[name]  # the one thing the variants change
    client, server, wall = time.process_time(), postgres_seconds(), time.perf_counter()
    for status in (TicketStatus.RUNNING, TicketStatus.COMPLETED):
        for start in range(0, len(ids), k):
            await repo.update_status_many(
                [
                    (StatusUpdate(ticket_id=i, status=status, attempt=1), "worker:w1")
                    for i in ids[start : start + k]
                ]
            )
    changes = 2 * len(ids)
    return (
        f"k={k:<3} {name:18} client {1000 * (time.process_time() - client) / changes:.3f}"
        f"  postgresql {1000 * (postgres_seconds() - server) / changes:.3f}"
        f"  wall {1000 * (time.perf_counter() - wall) / changes:.3f} ms/change"
    )


async def run(dsn: str, sizes: list[int], tickets: int, rounds: int) -> None:
    apply_migrations(dsn=dsn, directory=MIGRATIONS_DIRECTORY)
    pool = open_pool(dsn, min_size=1, max_size=2)
    await pool.open()
    try:
        repo = storage.TicketRepository(pool=pool)
        for k in sizes:
            for round_ in range(rounds):
                for name in VARIANTS:
                    print(await measure(repo, name, k, tickets, round_), flush=True)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 8, 16])
    parser.add_argument("--tickets", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--durable", action="store_true", help="fsync and synchronous_commit on")
    args = parser.parse_args()
    with databases(durable=args.durable) as dbs:
        dsn = dbs.fresh_database("bench_batch_writes")
        asyncio.run(run(dsn, args.sizes, args.tickets, args.rounds))


if __name__ == "__main__":
    main()
