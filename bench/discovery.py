"""DiscoverWorkers latency with 100 and 10,000 registered workers, then every worker's
heartbeat, beside the echo floor."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import psycopg

from bench.cpu import CpuMeter
from bench.report import Figure, Report
from bench.stack import REGISTRATION_SECRET, bearer
from bench.stats import LoadResult, closed_loop
from neuralhive.registry.v1 import registry_service_pb2 as rpb
from neuralhive.registry.v1 import registry_service_pb2_grpc as rpb_grpc

SECTION = "DiscoverWorkers"
HEARTBEATS = "Heartbeat"
HEARTBEAT_CONCURRENCY = 16
# One worker in this many also has the "gpu" capability and label zone=b (a selective query).
RARE_EVERY = 100


@dataclass(frozen=True, slots=True)
class DiscoverySizes:
    populations: tuple[int, ...]
    calls: int
    register_concurrency: int


def _register_request(i: int) -> rpb.RegisterRequest:
    rare = i % RARE_EVERY == 0
    return rpb.RegisterRequest(
        name=f"bench-worker-{i}",
        capabilities=["python", "bench", *(["gpu"] if rare else [])],
        labels={"zone": "b" if rare else "a"},
        max_concurrent=4,
        version="0.1.0",
    )


COMMON = rpb.DiscoverWorkersRequest(required_capabilities=["python"], max_results=10)
SELECTIVE = rpb.DiscoverWorkersRequest(
    required_capabilities=["python", "gpu"], label_selector={"zone": "b"}, max_results=10
)


async def run_discovery(
    report: Report,
    *,
    registry_target: str,
    registry_dsn: str,
    echo_target: str,
    sizes: DiscoverySizes,
    meter: CpuMeter,
) -> None:
    register_metadata = (("authorization", f"Bearer {REGISTRATION_SECRET}"),)
    metadata = bearer()
    async with (
        grpc.aio.insecure_channel(registry_target) as channel,
        grpc.aio.insecure_channel(echo_target) as echo_channel,
    ):
        stub: rpb_grpc.ServiceRegistryAsyncStub = rpb_grpc.ServiceRegistryStub(channel)
        echo: rpb_grpc.ServiceRegistryAsyncStub = rpb_grpc.ServiceRegistryStub(echo_channel)
        registered = 0
        workers: list[tuple[str, str]] = []  # (worker_id, worker token) of each registration
        report.raw["discovery"] = {}

        async def discover(request: rpb.DiscoverWorkersRequest, expect: int) -> LoadResult:
            async def call(_: int) -> None:
                response = await stub.DiscoverWorkers(request, metadata=metadata, timeout=30)
                if len(response.workers) != expect:
                    raise RuntimeError(
                        f"DiscoverWorkers returned {len(response.workers)} workers, "
                        f"expected {expect}"
                    )

            await closed_loop(call, concurrency=1, total=20)  # warm-up
            result = await closed_loop(call, concurrency=1, total=sizes.calls)
            if result.errors:
                raise RuntimeError(f"DiscoverWorkers failed: {result.first_error}")
            return result

        async def discover_echo(_: int) -> None:
            await echo.DiscoverWorkers(COMMON, metadata=metadata, timeout=30)

        await closed_loop(discover_echo, concurrency=1, total=20)
        for population in sizes.populations:

            async def register(i: int, base: int = registered) -> None:
                response = await stub.Register(
                    _register_request(base + i), metadata=register_metadata, timeout=60
                )
                workers.append((response.worker.worker_id, response.token))

            with meter.measure(
                f"Register up to {population:,} workers", operations=population - registered
            ):
                reg = await closed_loop(
                    register, concurrency=sizes.register_concurrency, total=population - registered
                )
            if reg.errors:
                raise RuntimeError(f"Register failed: {reg.first_error}")
            registered = population
            await asyncio.sleep(1.0)  # let the registration burst's follow-up work settle
            rare_count = len(range(0, population, RARE_EVERY))
            with meter.measure(
                f"DiscoverWorkers echo ({population:,} phase)", operations=sizes.calls
            ):
                floor = await closed_loop(discover_echo, concurrency=1, total=sizes.calls)
            raw: dict[str, object] = {"register": reg.to_json(), "echo": floor.to_json()}
            report.raw["discovery"][str(population)] = raw
            # Twice: right after the burst (the planner's statistics still describe the
            # table before it, as autovacuum has not analysed it yet), then after VACUUM
            # ANALYZE (what autovacuum does within its naptime, 1 minute by default, after
            # 10,000 inserts): steady state, with no autovacuum of the burst left to run
            # at some moment of the measurement.
            for stage in ("right after registering", "after VACUUM ANALYZE"):
                if stage == "after VACUUM ANALYZE":
                    async with await psycopg.AsyncConnection.connect(
                        registry_dsn, autocommit=True
                    ) as conn:
                        await conn.execute("VACUUM ANALYZE workers, worker_events")
                with meter.measure(
                    f"DiscoverWorkers, {population:,} workers, {stage}",
                    operations=2 * (20 + sizes.calls),
                ):
                    common = await discover(COMMON, min(10, population))
                    selective = await discover(SELECTIVE, min(10, rare_count))
                raw[f"common, {stage}"] = common.to_json()
                raw[f"selective, {stage}"] = selective.to_json()
                targeted = population >= 10_000 and stage == "after VACUUM ANALYZE"
                for label, result in (
                    ("capability every worker has", common),
                    (f"rare capability + label (1 in {RARE_EVERY} workers)", selective),
                ):
                    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
                        is_target = targeted and name == "p99"
                        report.add(
                            Figure(
                                SECTION,
                                f"{name}, {population:,} workers, {label}, {stage}",
                                result.p(fraction),
                                "ms",
                                "bare grpc.aio echo (10 ranked workers)",
                                floor.p(fraction),
                                target="p99 < 5 ms with 10,000 workers" if is_target else "",
                                met=result.p(fraction) < 5.0 if is_target else None,
                                note=f"{result.calls} sequential calls, max_results 10",
                            )
                        )
            report.notes.append(
                f"DiscoverWorkers population {population:,}: registered through concurrent "
                f"Register RPCs ({sizes.register_concurrency} at a time) at "
                f"{reg.rate:,.0f} registrations/s (p99 {reg.p(0.99):.1f} ms); the registry ran "
                "with a long heartbeat interval so the silent workers stayed HEALTHY."
            )
        await _heartbeats(report, registry=stub, echo=echo, workers=workers, meter=meter)


async def _heartbeats(
    report: Report,
    *,
    registry: rpb_grpc.ServiceRegistryAsyncStub,
    echo: rpb_grpc.ServiceRegistryAsyncStub,
    workers: list[tuple[str, str]],
    meter: CpuMeter,
) -> None:
    """Every registered worker heartbeats twice, 16 at a time, each with its own worker
    token (the first round unmeasured: it also verifies each token once, which later
    heartbeats find cached); the echo answers the same requests."""

    def beating(target: rpb_grpc.ServiceRegistryAsyncStub) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            worker_id, token = workers[i]
            await target.Heartbeat(
                rpb.HeartbeatRequest(worker_id=worker_id, in_flight=i % 3),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=30,
            )

        return call

    total = len(workers)
    await closed_loop(beating(registry), concurrency=HEARTBEAT_CONCURRENCY, total=total)
    await closed_loop(beating(echo), concurrency=HEARTBEAT_CONCURRENCY, total=min(total, 500))
    with meter.measure("Heartbeat: echo", operations=total):
        floor = await closed_loop(beating(echo), concurrency=HEARTBEAT_CONCURRENCY, total=total)
    with meter.measure(f"Heartbeat: {total:,} workers", operations=total):
        result = await closed_loop(
            beating(registry), concurrency=HEARTBEAT_CONCURRENCY, total=total
        )
    if result.errors:
        raise RuntimeError(f"Heartbeat failed: {result.first_error}")
    report.raw["heartbeats"] = {"service": result.to_json(), "echo": floor.to_json()}
    label = f"{total:,} workers' second heartbeat each, {HEARTBEAT_CONCURRENCY} concurrent clients"
    baseline = "bare grpc.aio echo"
    report.add(
        Figure(
            HEARTBEATS, f"heartbeats/s, {label}", result.rate, "heartbeats/s", baseline, floor.rate
        )
    )
    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
        report.add(
            Figure(
                HEARTBEATS,
                f"{name}, {label}",
                result.p(fraction),
                "ms",
                baseline,
                floor.p(fraction),
            )
        )
