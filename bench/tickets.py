"""Ticket service benchmarks: ingest (batch and single) and UpdateTicketStatus, each beside
its baseline (raw psycopg executemany, a bare grpc.aio echo service) measured in this run."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
from psycopg.types.json import Jsonb

from bench.cpu import CpuMeter
from bench.report import Figure, Report
from bench.stack import bearer
from bench.stats import LoadResult, closed_loop
from execution_ticket_service.domain.models import TicketSpec
from execution_ticket_service.storage.tickets import TicketRepository, open_pool
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

SECTION_INGEST = "Ticket ingest"
SECTION_UPDATES = "UpdateTicketStatus"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class TicketSizes:
    plans: int  # 1,000-ticket plans per side (service, raw baseline)
    plan_size: int
    ingest_concurrency: int
    single_calls: int
    single_concurrency: int
    update_calls: dict[int, int]  # concurrency -> number of updates


@contextlib.asynccontextmanager
async def _ticket_stubs(
    *targets: str,
) -> AsyncIterator[list[pb_grpc.TicketServiceAsyncStub]]:
    """A TicketService stub per target (the service or an echo), each on its own channel."""
    async with contextlib.AsyncExitStack() as channels:
        stubs: list[pb_grpc.TicketServiceAsyncStub] = []
        for target in targets:
            channel = await channels.enter_async_context(
                grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
            stubs.append(pb_grpc.TicketServiceStub(channel))
        yield stubs


async def outbox_backlog(dsn: str) -> int:
    """Events the ticket service's audit relay has not delivered yet."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM ticket_outbox")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def audit_settled(dsn: str | None, *, give_up_after: float = 180.0) -> int:
    """Wait until the audit relay has delivered every event so far (empty outbox), so a
    measurement never pays for the audit copies of the ones before it; returns the events
    still undelivered (0 unless it gave up). ``dsn`` None: nothing to wait for
    (a run whose relay is kept idle on purpose)."""
    if dsn is None:
        return 0
    deadline = time.monotonic() + give_up_after
    pending = await outbox_backlog(dsn)
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        pending = await outbox_backlog(dsn)
    if pending:
        print(f"bench: audit relay still {pending:,} events behind after {give_up_after:.0f} s")
    return pending


def _spec_values(plan_id: str, i: int) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "task_id": f"task-{i}",
        "task_type": "echo",
        "parameters": {"message": "hello", "index": i},
        "required_capabilities": ["python"],
        "depends_on": [f"task-{i - 1}"] if i else [],
    }


def _spec(values: dict[str, Any]) -> pb.TicketSpec:
    spec = pb.TicketSpec(
        plan_id=values["plan_id"],
        task_id=values["task_id"],
        task_type=values["task_type"],
        required_capabilities=values["required_capabilities"],
        depends_on=values["depends_on"],
    )
    spec.parameters.update(values["parameters"])
    return spec


_RAW_INSERT = """
INSERT INTO tickets (ticket_id, plan_id, task_id, intent_id, task_type, description, parameters,
                     required_capabilities, depends_on, priority, status, attempt, max_retries,
                     timeout_seconds, version, created_at, updated_at)
VALUES (%s, %s, %s, '', %s, '', %s, %s, %s, 'NORMAL', 'PENDING', 1, 0, 3600, 1, %s, %s)
"""


def _raw_rows(plan_id: str, size: int) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    rows = []
    for i in range(size):
        v = _spec_values(plan_id, i)
        rows.append(
            (
                uuid.uuid4(),
                v["plan_id"],
                v["task_id"],
                v["task_type"],
                Jsonb(v["parameters"]),
                Jsonb(v["required_capabilities"]),
                Jsonb(v["depends_on"]),
                now,
                now,
            )
        )
    return rows


async def _raw_executemany(
    dsn: str, batches: list[list[tuple[Any, ...]]], concurrency: int
) -> float:
    """Seconds to insert every batch (one transaction each) from ``concurrency`` connections."""
    conns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(concurrency)]
    queue = list(batches)
    try:

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            while queue:
                rows = queue.pop()
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(_RAW_INSERT, rows)

        start = time.perf_counter()
        await asyncio.gather(*(run(c) for c in conns))
        return time.perf_counter() - start
    finally:
        for conn in conns:
            await conn.close()
        await asyncio.sleep(0.2)  # let the postmaster reap the backends (CPU accounting)


async def _repository_batches(dsn: str, batches: list[list[TicketSpec]], concurrency: int) -> float:
    """The service's own TicketRepository.create_many in this process (no gRPC, no
    protobuf, no auth): how much of BatchCreateTickets is storage."""
    pool = open_pool(dsn, min_size=concurrency, max_size=concurrency)
    await pool.open(wait=True)
    repository = TicketRepository(pool=pool)
    queue = list(batches)
    try:

        async def run() -> None:
            while queue:
                await repository.create_many(queue.pop(), actor="service:bench")

        start = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(concurrency)))
        return time.perf_counter() - start
    finally:
        await pool.close()
        await asyncio.sleep(0.2)  # let the postmaster reap the backends (CPU accounting)


def _domain_specs(plan_id: str, size: int) -> list[TicketSpec]:
    specs = []
    for i in range(size):
        v = _spec_values(plan_id, i)
        specs.append(
            TicketSpec(
                plan_id=v["plan_id"],
                task_id=v["task_id"],
                task_type=v["task_type"],
                parameters=v["parameters"],
                required_capabilities=tuple(v["required_capabilities"]),
                depends_on=tuple(v["depends_on"]),
            )
        )
    return specs


async def _grpc_batches(
    stub: pb_grpc.TicketServiceAsyncStub,
    requests: list[pb.BatchCreateTicketsRequest],
    concurrency: int,
) -> float:
    metadata = bearer()
    queue = list(requests)

    async def run() -> None:
        while queue:
            request = queue.pop()
            response = await stub.BatchCreateTickets(request, metadata=metadata, timeout=120)
            if response.created_count != len(request.tickets):
                raise RuntimeError("BatchCreateTickets created fewer tickets than sent")

    start = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    return time.perf_counter() - start


def _raw_key(name: str, variant: str) -> str:
    """Where a measurement's raw data goes in the JSON report (a variant under its own key)."""
    return f"{name} {variant}" if variant else name


async def run_ingest(
    report: Report,
    *,
    tickets_target: str,
    echo_target: str,
    dsn: str,
    sizes: TicketSizes,
    meter: CpuMeter,
    outbox_dsn: str | None,
    variant: str = "",
) -> None:
    """BatchCreateTickets vs raw executemany (into the ticket database ``dsn``); single
    CreateTicket vs the echo service. Each measurement starts once the audit relay caught
    up (``outbox_dsn``, None when the relay is idle on purpose).

    ``variant`` names a diagnostic re-run: its figures carry no target, its raw data goes
    under its own key, and the in-process repository run (which has no relay) is skipped.
    """
    run_id = uuid.uuid4().hex[:8]
    suffix = f" ({variant})" if variant else ""
    async with _ticket_stubs(tickets_target, echo_target) as (stub, echo):
        metadata = bearer()

        # Warm-up: connections, pools, JIT-free but cache-warm code paths.
        await _grpc_batches(
            stub,
            [
                pb.BatchCreateTicketsRequest(
                    tickets=[_spec(_spec_values(f"warm-{run_id}", i)) for i in range(100)]
                )
            ],
            1,
        )
        await _raw_executemany(dsn, [_raw_rows(f"raw-warm-{run_id}", 100)], 1)

        # Two interleaved rounds so that drift in background load hits both sides alike.
        per_round = max(1, sizes.plans // 2)
        round_tickets = per_round * sizes.plan_size
        grpc_time = raw_time = repo_time = 0.0
        grpc_count = raw_count = repo_count = 0
        for round_no in range(2):
            requests = [
                pb.BatchCreateTicketsRequest(
                    tickets=[
                        _spec(_spec_values(f"ingest-{run_id}-{round_no}-{n}", i))
                        for i in range(sizes.plan_size)
                    ]
                )
                for n in range(per_round)
            ]
            raw_batches = [
                _raw_rows(f"raw-{run_id}-{round_no}-{n}", sizes.plan_size) for n in range(per_round)
            ]
            await audit_settled(outbox_dsn)
            with meter.measure(f"ingest: raw executemany{suffix}", operations=round_tickets):
                raw_time += await _raw_executemany(dsn, raw_batches, sizes.ingest_concurrency)
            raw_count += round_tickets
            with meter.measure(f"ingest: BatchCreateTickets{suffix}", operations=round_tickets):
                grpc_time += await _grpc_batches(stub, requests, sizes.ingest_concurrency)
            grpc_count += round_tickets
            await audit_settled(outbox_dsn)
            if variant:
                continue
            repo_batches = [
                _domain_specs(f"repo-{run_id}-{round_no}-{n}", sizes.plan_size)
                for n in range(per_round)
            ]
            with meter.measure(
                "ingest: TicketRepository.create_many in the bench process",
                operations=round_tickets,
            ):
                repo_time += await _repository_batches(dsn, repo_batches, sizes.ingest_concurrency)
            repo_count += round_tickets
        grpc_rate = grpc_count / grpc_time
        raw_rate = raw_count / raw_time
        report.raw[_raw_key("ingest_batch", variant)] = {
            "grpc_tickets": grpc_count,
            "grpc_seconds": grpc_time,
            "raw_rows": raw_count,
            "raw_seconds": raw_time,
            "repository_tickets": repo_count,
            "repository_seconds": repo_time,
            "concurrency": sizes.ingest_concurrency,
            "plan_size": sizes.plan_size,
        }
        note = (
            f"{grpc_count:,} tickets as {grpc_count // sizes.plan_size} plans of "
            f"{sizes.plan_size:,}, {sizes.ingest_concurrency} concurrent calls; the service "
            "also writes one outbox/event row per ticket"
        )
        report.add(
            Figure(
                SECTION_INGEST,
                f"BatchCreateTickets ({sizes.plan_size:,}-ticket plans){suffix}",
                grpc_rate,
                "tickets/s",
                "raw psycopg executemany, same rows, same table",
                raw_rate,
                target="" if variant else "≥ 40% of raw executemany",
                met=None if variant else grpc_rate >= 0.4 * raw_rate,
                note=note,
            )
        )
        if not variant:
            report.add(
                Figure(
                    SECTION_INGEST,
                    "BatchCreateTickets absolute rate",
                    grpc_rate,
                    "tickets/s",
                    "raw psycopg executemany",
                    raw_rate,
                    target="≥ 20,000 tickets/s",
                    met=grpc_rate >= 20_000,
                )
            )
            report.add(
                Figure(
                    SECTION_INGEST,
                    "TicketRepository.create_many alone (in-process: no gRPC, protobuf, auth)",
                    repo_count / repo_time,
                    "tickets/s",
                    "raw psycopg executemany",
                    raw_rate,
                    note="the service's storage layer run by the bench process (formerly "
                    "services/execution-ticket-service/bench/batch_create.py)",
                )
            )

        # Single CreateTicket RPCs vs the echo service at the same client concurrency.
        single_specs = [
            _spec(_spec_values(f"single-{run_id}-{i // 100}", i % 100))
            for i in range(sizes.single_calls + 50)
        ]

        async def create(i: int) -> None:
            await stub.CreateTicket(
                pb.CreateTicketRequest(ticket=single_specs[i]), metadata=metadata, timeout=30
            )

        async def create_echo(i: int) -> None:
            await echo.CreateTicket(
                pb.CreateTicketRequest(ticket=single_specs[i]), metadata=metadata, timeout=30
            )

        await closed_loop(lambda i: create_echo(sizes.single_calls + i), concurrency=4, total=50)
        await closed_loop(lambda i: create(sizes.single_calls + i), concurrency=4, total=50)
        await audit_settled(outbox_dsn)
        with meter.measure(f"single CreateTicket: echo{suffix}", operations=sizes.single_calls):
            echo_result = await closed_loop(
                create_echo, concurrency=sizes.single_concurrency, total=sizes.single_calls
            )
        await audit_settled(outbox_dsn)
        with meter.measure(f"single CreateTicket: service{suffix}", operations=sizes.single_calls):
            real = await closed_loop(
                create, concurrency=sizes.single_concurrency, total=sizes.single_calls
            )
        report.raw[_raw_key("ingest_single", variant)] = {
            "service": real.to_json(),
            "echo": echo_result.to_json(),
        }
        _check(real, "CreateTicket")
        report.add(
            Figure(
                SECTION_INGEST,
                f"single CreateTicket RPCs, {sizes.single_concurrency} concurrent clients{suffix}",
                real.rate,
                "RPCs/s",
                "bare grpc.aio echo",
                echo_result.rate,
                target="" if variant else "≥ 50% of echo",
                met=None if variant else real.rate >= 0.5 * echo_result.rate,
                note=f"p50 {real.p(0.5):.1f} ms / p99 {real.p(0.99):.1f} ms "
                f"(echo {echo_result.p(0.5):.1f} / {echo_result.p(0.99):.1f} ms)",
            )
        )


def _check(result: LoadResult, what: str) -> None:
    if result.errors:
        raise RuntimeError(
            f"{what}: {result.errors} of {result.calls} calls failed: {result.first_error}"
        )


async def _assigned_tickets(
    stub: pb_grpc.TicketServiceAsyncStub, *, count: int, run_id: str, plan_size: int
) -> tuple[list[str], LoadResult]:
    """Create ``count`` tickets and assign each to a (fictitious) worker; returns their ids."""
    metadata = bearer()
    ids: list[str] = []
    for start in range(0, count, plan_size):
        n = min(plan_size, count - start)
        request = pb.BatchCreateTicketsRequest(
            tickets=[_spec(_spec_values(f"upd-{run_id}-{start}", i)) for i in range(n)]
        )
        response = await stub.BatchCreateTickets(request, metadata=metadata, timeout=120)
        ids.extend(t.ticket_id for t in response.tickets)

    async def assign(i: int) -> None:
        await stub.AssignTicket(
            pb.AssignTicketRequest(
                ticket_id=ids[i], worker_id="bench-worker", lease_seconds=3600, attempt=1
            ),
            metadata=metadata,
            timeout=30,
        )

    result = await closed_loop(assign, concurrency=16, total=len(ids))
    _check(result, "AssignTicket")
    return ids, result


def _update_request(
    ticket_id: str, status: pb.TicketStatus.ValueType
) -> pb.UpdateTicketStatusRequest:
    request = pb.UpdateTicketStatusRequest(ticket_id=ticket_id, status=status, attempt=1)
    if status == pb.TICKET_STATUS_COMPLETED:
        request.result.update({"message": "hello"})
    return request


async def _updates(
    target: pb_grpc.TicketServiceAsyncStub, ticket_ids: list[str], concurrency: int
) -> LoadResult:
    """Every ticket ASSIGNED→RUNNING, then every one RUNNING→COMPLETED, closed loop."""
    metadata = bearer()
    results = []
    for status in (pb.TICKET_STATUS_RUNNING, pb.TICKET_STATUS_COMPLETED):

        async def call(i: int, status: pb.TicketStatus.ValueType = status) -> None:
            await target.UpdateTicketStatus(
                _update_request(ticket_ids[i], status), metadata=metadata, timeout=30
            )

        results.append(await closed_loop(call, concurrency=concurrency, total=len(ticket_ids)))
    return LoadResult(
        calls=sum(r.calls for r in results),
        elapsed=sum(r.elapsed for r in results),
        latencies=[x for r in results for x in r.latencies],
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )


async def run_updates(
    report: Report,
    *,
    tickets_target: str,
    echo_target: str,
    sizes: TicketSizes,
    meter: CpuMeter,
    outbox_dsn: str | None,
    variant: str = "",
) -> None:
    """UpdateTicketStatus (ASSIGNED→RUNNING, then RUNNING→COMPLETED) at 1/16/64 clients,
    each measurement started once the audit relay caught up (``outbox_dsn``: the ticket
    database; None when the relay is idle on purpose).

    ``variant`` names a diagnostic re-run (its figures carry no target and the raw data
    goes under its own key).
    """
    run_id = uuid.uuid4().hex[:8]
    async with _ticket_stubs(tickets_target, echo_target) as (stub, echo):
        per_level = {c: max(2, n // 2) for c, n in sizes.update_calls.items()}
        ids, assign = await _assigned_tickets(
            stub, count=sum(per_level.values()) + 20, run_id=run_id, plan_size=sizes.plan_size
        )
        if not variant:
            report.raw["assign_setup"] = assign.to_json()
        offset = 0

        # Warm-up on a few tickets.
        await _updates(stub, ids[-20:], 4)
        await _updates(echo, ids[-20:], 4)
        raw_key = _raw_key("updates", variant)
        report.raw[raw_key] = {}
        suffix = f" ({variant})" if variant else ""
        for concurrency, count in per_level.items():
            batch = ids[offset : offset + count]
            offset += count
            await audit_settled(outbox_dsn)
            with meter.measure(
                f"UpdateTicketStatus x{concurrency}: echo{suffix}", operations=2 * count
            ):
                echo_result = await _updates(echo, batch, concurrency)
            await audit_settled(outbox_dsn)
            with meter.measure(
                f"UpdateTicketStatus x{concurrency}: service{suffix}", operations=2 * count
            ):
                real = await _updates(stub, batch, concurrency)
            _check(real, "UpdateTicketStatus")
            report.raw[raw_key][str(concurrency)] = {
                "service": real.to_json(),
                "echo": echo_result.to_json(),
            }
            label = f"{concurrency} concurrent client{'s' if concurrency > 1 else ''}{suffix}"
            targeted = concurrency == 16 and not variant
            report.add(
                Figure(
                    SECTION_UPDATES,
                    f"updates/s, {label}",
                    real.rate,
                    "updates/s",
                    "bare grpc.aio echo",
                    echo_result.rate,
                    note=f"{real.calls:,} updates (half RUNNING, half COMPLETED)",
                )
            )
            report.add(
                Figure(
                    SECTION_UPDATES,
                    f"p50 latency, {label}",
                    real.p(0.5),
                    "ms",
                    "bare grpc.aio echo",
                    echo_result.p(0.5),
                )
            )
            report.add(
                Figure(
                    SECTION_UPDATES,
                    f"p99 latency, {label}",
                    real.p(0.99),
                    "ms",
                    "bare grpc.aio echo",
                    echo_result.p(0.99),
                    target="p99 < 20 ms" if targeted else "",
                    met=real.p(0.99) < 20.0 if targeted else None,
                )
            )


FLOOR_LABEL = "durable floor: the echo committing one PostgreSQL row per call first"


async def run_durable_floor(
    report: Report, *, echo_target: str, floor_target: str, sizes: TicketSizes, meter: CpuMeter
) -> None:
    """Single CreateTicket and UpdateTicketStatus at 16 clients against the durable floor
    (``bench.echo --postgres-dsn``) beside the bare echo: what storing each change before
    answering costs a service that does nothing else (no audit copy, no auth, no state
    machine)."""
    run_id = uuid.uuid4().hex[:8]
    concurrency = sizes.single_concurrency
    specs = [_spec(_spec_values(f"floor-{run_id}", i)) for i in range(sizes.single_calls + 50)]
    update_ids = [str(uuid.uuid4()) for _ in range(max(2, sizes.update_calls[16] // 2) + 20)]
    async with _ticket_stubs(echo_target, floor_target) as (echo, floor):
        metadata = bearer()

        def creating(
            stub: pb_grpc.TicketServiceAsyncStub, first: int = 0
        ) -> Callable[[int], Awaitable[object]]:
            async def create(i: int) -> None:
                await stub.CreateTicket(
                    pb.CreateTicketRequest(ticket=specs[first + i]), metadata=metadata, timeout=30
                )

            return create

        results: dict[str, dict[str, LoadResult]] = {"create": {}, "update": {}}
        for stub in (echo, floor):  # warm-up
            await closed_loop(creating(stub, sizes.single_calls), concurrency=4, total=50)
            await _updates(stub, update_ids[-20:], 4)
        for name, stub in (("echo", echo), ("floor", floor)):
            with meter.measure(
                f"single CreateTicket: {name} (durable floor run)", operations=sizes.single_calls
            ):
                results["create"][name] = await closed_loop(
                    creating(stub), concurrency=concurrency, total=sizes.single_calls
                )
            with meter.measure(
                f"UpdateTicketStatus x16: {name} (durable floor run)",
                operations=2 * (len(update_ids) - 20),
            ):
                results["update"][name] = await _updates(stub, update_ids[:-20], 16)
    for kind in results.values():
        _check(kind["floor"], "durable floor")
    report.raw["durable_floor"] = {
        kind: {name: r.to_json() for name, r in by_name.items()}
        for kind, by_name in results.items()
    }
    create, update = results["create"], results["update"]
    report.add(
        Figure(
            SECTION_INGEST,
            f"single CreateTicket RPCs, {concurrency} concurrent clients, {FLOOR_LABEL}",
            create["floor"].rate,
            "RPCs/s",
            "bare grpc.aio echo",
            create["echo"].rate,
            note=f"p50 {create['floor'].p(0.5):.1f} ms / p99 {create['floor'].p(0.99):.1f} ms "
            f"(echo {create['echo'].p(0.5):.1f} / {create['echo'].p(0.99):.1f} ms)",
        )
    )
    for measure, unit, value, baseline in (
        ("updates/s", "updates/s", update["floor"].rate, update["echo"].rate),
        ("p50 latency", "ms", update["floor"].p(0.5), update["echo"].p(0.5)),
        ("p99 latency", "ms", update["floor"].p(0.99), update["echo"].p(0.99)),
    ):
        report.add(
            Figure(
                SECTION_UPDATES,
                f"{measure}, 16 concurrent clients, {FLOOR_LABEL}",
                value,
                unit,
                "bare grpc.aio echo",
                baseline,
            )
        )
