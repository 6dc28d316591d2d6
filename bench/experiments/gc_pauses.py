"""How long do the garbage collector's pauses get in a busy ticket service? (finding for
``hive_common.runtime.freeze_heap``)

Runs the ticket service in this process (``build_service`` on a throwaway PostgreSQL and
MongoDB-compatible server), drives ``updates`` UpdateTicketStatus calls from 16 clients
and records every collection's duration (``gc.callbacks``) and the event loop's lag (a
5 ms ticker), twice: as started, and with the start-up heap frozen (``freeze_heap()``
right after the service started, as the services' entry points do). Client and service
share this process, so the pauses are the whole process's. Run:
``uv run --all-packages python -m bench.experiments.gc_pauses``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from typing import Any

import grpc

from bench.environment import databases
from bench.stats import percentile
from execution_ticket_service.app import build_service
from hive_common.auth import TokenIssuer
from hive_common.heap import freeze_heap
from hive_common.logging import configure_logging
from hive_testsupport.settings import ticket_settings
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

SECRET = "gc-pauses-experiment-secret-0123456789-0123456789"


async def one_run(dsn: str, mongo_uri: str, *, updates: int, freeze: bool) -> dict[str, Any]:
    settings = ticket_settings(
        postgres_dsn=dsn,
        mongo_uri=mongo_uri,
        mongo_database="gc_pauses",
        jwt_secret=SECRET,
        relay_idle_interval_seconds=0.5,
        watch_poll_interval_seconds=0.5,
        lease_sweep_interval_seconds=5.0,
        stats_interval_seconds=5.0,
    )
    service = await build_service(settings)
    await service.start()
    if freeze:
        freeze_heap()
    frozen = gc.get_freeze_count()
    issuer = TokenIssuer(secret=SECRET, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    token, _ = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=3600)
    metadata = (("authorization", f"Bearer {token}"),)
    pauses: list[tuple[int, float]] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((info["generation"], (time.perf_counter() - started.pop()) * 1000))

    lags: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            lags.append((loop.time() - before - 0.005) * 1000)

    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.runtime.grpc_port}") as channel:
            stub = pb_grpc.TicketServiceStub(channel)
            ids: list[str] = []
            for start in range(0, updates, 1000):
                specs = [
                    pb.TicketSpec(plan_id=f"p{start}", task_id=f"t{i}", task_type="echo")
                    for i in range(min(1000, updates - start))
                ]
                created = await stub.BatchCreateTickets(
                    pb.BatchCreateTicketsRequest(tickets=specs), metadata=metadata
                )
                ids += [t.ticket_id for t in created.tickets]
            for start in range(0, len(ids), 100):
                assignments = [
                    pb.AssignTicketRequest(
                        ticket_id=i, worker_id="w1", attempt=1, lease_seconds=600
                    )
                    for i in ids[start : start + 100]
                ]
                await stub.AssignTickets(
                    pb.AssignTicketsRequest(assignments=assignments), metadata=metadata
                )
            gc.callbacks.append(on_gc)
            probe = asyncio.create_task(ticker())
            slots = asyncio.Semaphore(16)

            async def update(ticket_id: str) -> None:
                async with slots:
                    began = time.perf_counter()
                    await stub.UpdateTicketStatus(
                        pb.UpdateTicketStatusRequest(
                            ticket_id=ticket_id, status=pb.TICKET_STATUS_RUNNING, attempt=1
                        ),
                        metadata=metadata,
                    )
                    latencies.append((time.perf_counter() - began) * 1000)

            await asyncio.gather(*(update(i) for i in ids))
            probe.cancel()
            gc.callbacks.remove(on_gc)
    finally:
        await service.stop(0.5)
        gc.unfreeze()
    full = [ms for generation, ms in pauses if generation == 2]
    return {
        "frozen_objects": frozen,
        "update_p50_ms": round(percentile(latencies, 0.5), 1),
        "update_p99_ms": round(percentile(latencies, 0.99), 1),
        "loop_lag_p99_ms": round(percentile(lags, 0.99), 1),
        "loop_lag_max_ms": round(max(lags), 1),
        "full_collections": len(full),
        "full_collection_max_ms": round(max(full), 1) if full else 0.0,
        "all_collections_total_ms": round(sum(ms for _, ms in pauses)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--updates", type=int, default=8000)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with open(os.devnull, "w") as devnull:
        configure_logging(level="INFO", fmt="json", stream=devnull)
        with databases(durable=True) as dbs:
            for name, freeze in (("as started", False), ("start-up heap frozen", True)):
                dsn = dbs.fresh_database(f"gc_pauses_{len(results)}")
                results[name] = asyncio.run(
                    one_run(dsn, dbs.mongo_uri, updates=args.updates, freeze=freeze)
                )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
