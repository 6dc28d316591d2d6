"""Whole plans through the three services and 8 reference workers (separate processes).

Times come from the services' own records, not from polling granularity: ``t0`` is the
bench's clock just before the plan is POSTed; "all tickets exist" is the latest ticket
``created_at``, "all assigned" the latest first ASSIGNED event of a ticket (both in the
ticket service's PostgreSQL), "COMPLETED" the plan's ``completed_at`` from the
orchestrator. The relay lag is ``relayed_at - occurred_at`` of every audit document (the
relay stamps ``relayed_at`` when it sends the batch to MongoDB).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
from pymongo import AsyncMongoClient, MongoClient

from bench import cpu, profiling, stack
from bench.cpu import CpuMeter
from bench.environment import Databases
from bench.report import Figure, Report
from bench.stats import percentile
from bench.tickets import audit_settled
from hive_common.localdb import free_port
from hive_common.procstack import ProcessSpec, ProcessStack
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

SECTION = "Whole plans (3 services + 8 reference workers, no-op echo tasks)"
SECTION_RELAY = "Audit relay lag"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


@dataclass(frozen=True, slots=True)
class PlanSizes:
    wide_tasks: int
    dag_levels: int
    dag_width: int
    many_plans: int
    many_plan_tasks: int
    workers: int
    worker_slots: int
    timeout_s: float
    # The wide plan again with this many slots per worker (0: skip), to separate the
    # services' own throughput from the workers' default concurrency.
    wide_again_slots: int = 32
    # A wide plan of this many tasks (0: skip): the orchestrator's default plan size
    # limit, where per-round work that grows with the plan shows.
    large_tasks: int = 0
    # Runs of the targeted wide plan (and of its relay-idle twin); the median one counts.
    wide_repeats: int = 1


FULL_PLANS = PlanSizes(
    wide_tasks=1000,
    dag_levels=10,
    dag_width=100,
    many_plans=100,
    many_plan_tasks=10,
    workers=8,
    worker_slots=4,
    timeout_s=90.0,
    large_tasks=10_000,
    wide_repeats=3,
)
QUICK_PLANS = PlanSizes(
    wide_tasks=200,
    dag_levels=10,
    dag_width=10,
    many_plans=20,
    many_plan_tasks=10,
    workers=8,
    worker_slots=4,
    timeout_s=60.0,
)


def _task(task_id: str, deps: list[str]) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_type": "echo",
        "required_capabilities": ["python"],
        "depends_on": deps,
        "parameters": {"task": task_id},
    }


def wide_plan(plan_id: str, tasks: int) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "name": f"wide {tasks}",
        "tasks": [_task(f"t{i}", []) for i in range(tasks)],
    }


def dag_plan(plan_id: str, levels: int, width: int) -> dict[str, Any]:
    """``levels`` levels of ``width`` tasks; each task needs two tasks of the level above."""
    tasks = []
    for level in range(levels):
        for i in range(width):
            deps = (
                []
                if level == 0
                else sorted({f"l{level - 1}-{i}", f"l{level - 1}-{(i + 1) % width}"})
            )
            tasks.append(_task(f"l{level}-{i}", deps))
    return {"plan_id": plan_id, "name": f"dag {levels}x{width}", "tasks": tasks}


_STAGES = """
WITH t AS (
    SELECT ticket_id,
           min(occurred_at) FILTER (WHERE event_type = 'CREATED') AS created,
           min(occurred_at) FILTER (WHERE event_type = 'ASSIGNED') AS assigned,
           min(occurred_at) FILTER (WHERE event_type = 'STATUS_CHANGED' AND status = 'RUNNING')
               AS running,
           min(occurred_at) FILTER (WHERE event_type = 'STATUS_CHANGED' AND status = 'COMPLETED')
               AS completed
    FROM ticket_events WHERE plan_id = ANY(%(plans)s) GROUP BY ticket_id
)
SELECT extract(epoch FROM assigned - created), extract(epoch FROM running - assigned),
       extract(epoch FROM completed - running)
FROM t
"""

# For every completion on a worker: how long until the next ticket was assigned to it (a
# window over each worker's events: one pass, where a subquery per completion took half a
# minute for a 10,000-task plan).
_REFILL = """
SELECT extract(epoch FROM next_assigned - occurred_at)
FROM (
    SELECT event_type, occurred_at,
           min(occurred_at) FILTER (WHERE event_type = 'ASSIGNED') OVER (
               PARTITION BY worker_id ORDER BY occurred_at
               RANGE BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING
           ) AS next_assigned
    FROM ticket_events
    WHERE plan_id = ANY(%(plans)s)
      AND (event_type = 'ASSIGNED' OR (event_type = 'STATUS_CHANGED' AND status = 'COMPLETED'))
) e
WHERE event_type = 'STATUS_CHANGED'
"""


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": percentile(values, 0.5),
        "p99_s": percentile(values, 0.99),
        "max_s": max(values) if values else math.nan,
    }


def _stage_note(name: str, stages: dict[str, Any]) -> str:
    parts = [
        f"{stage}: p50 {v['p50_s'] * 1000:.0f} ms, p99 {v['p99_s'] * 1000:.0f} ms (n={v['n']})"
        for stage, v in stages.items()
    ]
    return f"Stage breakdown, {name}: " + "; ".join(parts)


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else math.nan


@dataclass(slots=True)
class PlanTiming:
    plan_id: str
    tasks: int
    status: str
    submit_s: float
    all_created_s: float
    all_assigned_s: float
    assigned_count: int
    all_tickets_completed_s: float
    plan_completed_s: float

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class PlanRunner:
    """Submits plans over HTTP and reads their timings from the services' records."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        tickets_dsn: str,
        timeout_s: float,
        relay_idle: bool = False,
    ) -> None:
        self.http = http
        self.tickets_dsn = tickets_dsn
        # Where to wait for the audit relay to catch up before a measurement (None: an
        # idle relay's outbox only grows).
        self.outbox_dsn = None if relay_idle else tickets_dsn
        self.timeout_s = timeout_s

    async def submit(self, plan: dict[str, Any]) -> tuple[float, float]:
        """POST the plan; returns (t0 wall clock, seconds the POST took)."""
        t0 = time.time()
        start = time.perf_counter()
        response = await self.http.post("/api/v1/plans", json=plan, timeout=120)
        if response.status_code not in (200, 202):
            raise RuntimeError(
                f"plan {plan['plan_id']}: HTTP {response.status_code} {response.text[:500]}"
            )
        return t0, time.perf_counter() - start

    async def wait_settled(self, plan_ids: set[str]) -> dict[str, str]:
        """Poll the plan list until every plan is terminal (or the timeout); id -> status."""
        deadline = time.monotonic() + self.timeout_s
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            statuses = {}
            token = ""
            while True:
                params: dict[str, Any] = {"page_size": 500}
                if token:
                    params["page_token"] = token
                response = await self.http.get("/api/v1/plans", params=params, timeout=30)
                response.raise_for_status()
                body = response.json()
                for plan in body["plans"]:
                    if plan["plan_id"] in plan_ids:
                        statuses[plan["plan_id"]] = plan["status"]
                token = body.get("next_page_token") or ""
                if not token:
                    break
            if len(statuses) == len(plan_ids) and all(s in TERMINAL for s in statuses.values()):
                return statuses
            await asyncio.sleep(0.2)
        return statuses

    async def timing(self, plan_id: str, tasks: int, t0: float, submit_s: float) -> PlanTiming:
        response = await self.http.get(f"/api/v1/plans/{plan_id}", timeout=30)
        response.raise_for_status()
        plan = response.json()
        async with await psycopg.AsyncConnection.connect(self.tickets_dsn) as conn:
            cur = await conn.execute(
                "SELECT extract(epoch FROM max(created_at)), "
                "extract(epoch FROM max(completed_at)), "
                "count(*) FILTER (WHERE status = 'COMPLETED') "
                "FROM tickets WHERE plan_id = %s",
                (plan_id,),
            )
            created, completed, _ = await cur.fetchone() or (None, None, 0)
            cur = await conn.execute(
                "SELECT extract(epoch FROM max(first)), count(*) FROM ("
                " SELECT min(occurred_at) AS first FROM ticket_events"
                " WHERE plan_id = %s AND event_type = 'ASSIGNED' GROUP BY ticket_id) a",
                (plan_id,),
            )
            assigned, assigned_count = await cur.fetchone() or (None, 0)

        def since(value: Any) -> float:
            return float(value) - t0 if value is not None else math.nan

        return PlanTiming(
            plan_id=plan_id,
            tasks=tasks,
            status=plan["status"],
            submit_s=submit_s,
            all_created_s=since(created),
            all_assigned_s=since(assigned) if assigned_count >= tasks else math.nan,
            assigned_count=int(assigned_count),
            all_tickets_completed_s=since(completed) if plan["status"] == "COMPLETED" else math.nan,
            plan_completed_s=_ts(plan.get("completed_at")) - t0
            if plan["status"] == "COMPLETED"
            else math.nan,
        )

    async def stages(self, plan_ids: list[str]) -> dict[str, Any]:
        """Per-ticket stage durations from the ticket event log (seconds: p50, p99, max)."""
        async with await psycopg.AsyncConnection.connect(self.tickets_dsn) as conn:
            cur = await conn.execute(_STAGES, {"plans": plan_ids})
            rows = await cur.fetchall()
            cur = await conn.execute(_REFILL, {"plans": plan_ids})
            refill = [float(r[0]) for r in await cur.fetchall() if r[0] is not None]
        columns = (
            "created -> first ASSIGNED (waiting for a worker slot)",
            "ASSIGNED -> RUNNING (worker pickup: watch delivery, token, update)",
            "RUNNING -> COMPLETED (no-op task + report)",
            "COMPLETED -> orchestrator's next ASSIGN to that worker (slot refill)",
        )
        stages: dict[str, Any] = {}
        for index, name in enumerate(columns[:3]):
            values = [float(r[index]) for r in rows if r[index] is not None]
            stages[name] = _spread(values)
        stages[columns[3]] = _spread(refill)
        return stages

    async def explain(self, plan_id: str) -> str:
        try:
            response = await self.http.get(f"/api/v1/plans/{plan_id}", timeout=30)
            body = response.json()
            counts = body.get("counts")
            why = await self.http.get(f"/api/v1/plans/{plan_id}/explain", timeout=30)
            return f"status {body.get('status')}, counts {counts}, explain: {why.text[:400]}"
        except (httpx.HTTPError, ValueError) as exc:
            return f"could not read plan: {exc!r}"


@dataclass(frozen=True)
class AuditTrail:
    """Where the ticket service's audit trail is (the relay stamps each document with the
    time it sent it, ``relayed_at``)."""

    mongo_uri: str
    database: str

    def client(self) -> AsyncMongoClient[dict[str, Any]]:
        return AsyncMongoClient(self.mongo_uri, serverSelectionTimeoutMS=5000)


async def _idle_relay_lag(tickets_target: str, audit: AuditTrail, samples: int) -> list[float]:
    """Relay lag of single events on the idle stack (the relay's own floor)."""
    lags = []
    mongo = audit.client()
    try:
        trail = mongo[audit.database]["audit_trail"]
        async with grpc.aio.insecure_channel(tickets_target) as channel:
            stub: pb_grpc.TicketServiceAsyncStub = pb_grpc.TicketServiceStub(channel)
            for i in range(samples):
                spec = pb.TicketSpec(
                    plan_id=f"idle-relay-{uuid.uuid4().hex[:8]}", task_id=f"t{i}", task_type="echo"
                )
                response = await stub.CreateTicket(
                    pb.CreateTicketRequest(ticket=spec), metadata=stack.bearer(), timeout=30
                )
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    doc = await trail.find_one({"ticket_id": response.ticket.ticket_id})
                    if doc is not None:
                        lags.append((doc["relayed_at"] - doc["occurred_at"]).total_seconds())
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.37)  # land at different points of the relay's poll cycle
    finally:
        await mongo.close()
    return lags


async def _relay_lag_since(
    dsn: str, audit: AuditTrail, since: float, drain_timeout: float
) -> dict[str, Any]:
    """Per-event lag of every event since ``since`` (waits for the outbox to drain); an
    event still undelivered at the end counts with its age."""
    pending = await audit_settled(dsn, give_up_after=drain_timeout)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM now() - e.occurred_at) "
            "FROM ticket_outbox JOIN ticket_events e USING (seq) "
            "WHERE e.occurred_at >= to_timestamp(%s)",
            (since,),
        )
        lags = [float(r[0]) for r in await cur.fetchall()]
    mongo = audit.client()
    try:
        cursor = mongo[audit.database]["audit_trail"].find(
            {"occurred_at": {"$gte": datetime.fromtimestamp(since, UTC)}},
            {"occurred_at": True, "relayed_at": True},
        )
        lags += [(d["relayed_at"] - d["occurred_at"]).total_seconds() async for d in cursor]
    finally:
        await mongo.close()
    return {
        "events": len(lags),
        "unrelayed_at_end": pending,
        "p50_s": percentile(lags, 0.5),
        "p99_s": percentile(lags, 0.99),
        "max_s": max(lags) if lags else math.nan,
    }


def _floor(report: Report, tasks: int) -> dict[str, float]:
    """Seconds the ticket-service work of ``tasks`` tasks takes at this run's micro rates."""
    try:
        ingest = report.raw["ingest_batch"]
        ingest_rate = ingest["grpc_tickets"] / ingest["grpc_seconds"]
        assign_rate = report.raw["assign_setup"]["rate_per_s"]
        update_rate = report.raw["updates"]["64"]["service"]["rate_per_s"]
    except KeyError:
        return {"created": math.nan, "assigned": math.nan, "completed": math.nan}
    created = tasks / ingest_rate
    assigned = created + tasks / assign_rate
    return {
        "created": created,
        "assigned": assigned,
        "completed": assigned + 2 * tasks / update_rate,
    }


FLOOR_LABEL = "ticket-service work alone at this run's micro rates"


def _plan_figures(
    report: Report, name: str, timing: PlanTiming, target_s: float | None, runs: str = ""
) -> None:
    floor = _floor(report, timing.tasks)
    note = f"status {timing.status}; POST answered in {timing.submit_s * 1000:.0f} ms"
    if runs:
        note = f"{runs}; {note}"
    rows = (
        ("all tickets exist", timing.all_created_s, floor["created"], None),
        ("all tickets assigned", timing.all_assigned_s, floor["assigned"], None),
        ("plan COMPLETED", timing.plan_completed_s, floor["completed"], target_s),
    )
    for label, value, baseline, target in rows:
        report.add(
            Figure(
                SECTION,
                f"{name}: {label}",
                value,
                "s",
                FLOOR_LABEL,
                baseline,
                target=f"COMPLETED in < {target:g} s" if target else "",
                met=(not math.isnan(value) and value < target) if target else None,
                note=note if label == "plan COMPLETED" else "",
            )
        )


async def run_one_plan(
    report: Report,
    runner: PlanRunner,
    meter: CpuMeter,
    name: str,
    plan: dict[str, Any],
    target: float | None,
    sizes: PlanSizes,
    repeats: int = 1,
) -> None:
    """Submit the plan (``repeats`` times, one after the other, each under its own id),
    wait until it settles, record its timings and stage breakdown: the figures are the run
    with the median COMPLETED time, the note lists every run."""
    label = name if repeats == 1 else f"{name} ({repeats} runs)"
    print(f"bench: plans: {label}", flush=True)
    runs: list[tuple[PlanTiming, str]] = []
    for k in range(repeats):
        this = plan if repeats == 1 else {**plan, "plan_id": f"{plan['plan_id']}-{k + 1}"}
        await audit_settled(runner.outbox_dsn)
        with meter.measure(label, operations=len(this["tasks"])):
            t0, submit_s = await runner.submit(this)
            statuses = await runner.wait_settled({this["plan_id"]})
        timing = await runner.timing(this["plan_id"], len(this["tasks"]), t0, submit_s)
        runs.append((timing, this["plan_id"]))
        if timing.status != "COMPLETED":
            report.notes.append(
                f"GAP: {name} did not complete within {sizes.timeout_s:.0f} s "
                f"(statuses {statuses}); {await runner.explain(this['plan_id'])}"
            )
    by_time = sorted(runs, key=lambda run: run[0].plan_completed_s)
    timing, plan_id = by_time[(len(by_time) - 1) // 2]
    report.raw["plans"][name] = timing.to_json()
    report.raw["plans"][name]["runs"] = [run.to_json() for run, _ in runs]
    stages = await runner.stages([plan_id])
    report.raw["plans"][name]["stages"] = stages
    report.notes.append(_stage_note(name if repeats == 1 else f"{name}, median run", stages))
    every = ""
    if repeats > 1:
        every = (
            f"median of {repeats} runs (COMPLETED: "
            + ", ".join(f"{run.plan_completed_s:.2f} s" for run, _ in runs)
            + ")"
        )
    _plan_figures(report, name, timing, target if sizes.wide_tasks >= 1000 else None, every)


async def run_plans(
    report: Report,
    *,
    orchestrator_url: str,
    tickets_target: str,
    tickets_dsn: str,
    audit: AuditTrail,
    sizes: PlanSizes,
    meter: CpuMeter,
    after_wide: Callable[[], None] | None = None,
) -> None:
    """The wide plan, the DAG, many small plans, then the relay lag of them all.
    ``after_wide`` runs (in a thread) right after the wide plan: a variant of it measured
    as close in time as it can be."""
    run_id = uuid.uuid4().hex[:6]
    idle = await _idle_relay_lag(tickets_target, audit, samples=5)
    report.raw["relay_idle_lag_s"] = idle
    phase_start = time.time()
    limits = httpx.Limits(max_connections=sizes.many_plans + 5)
    async with httpx.AsyncClient(base_url=orchestrator_url, limits=limits) as http:
        runner = PlanRunner(http=http, tickets_dsn=tickets_dsn, timeout_s=sizes.timeout_s)
        report.raw["plans"] = {}
        for name, plan, target in (
            (
                f"wide plan, {sizes.wide_tasks:,} tasks",
                wide_plan(f"wide-{run_id}", sizes.wide_tasks),
                3.0,
            ),
            (
                f"{sizes.dag_levels}-level DAG, {sizes.dag_levels * sizes.dag_width:,} tasks",
                dag_plan(f"dag-{run_id}", sizes.dag_levels, sizes.dag_width),
                None,
            ),
        ):
            repeats = sizes.wide_repeats if target is not None else 1
            await run_one_plan(report, runner, meter, name, plan, target, sizes, repeats)
            if after_wide is not None and target is not None:
                await asyncio.to_thread(after_wide)

        # Many small plans at once.
        name = f"{sizes.many_plans} plans of {sizes.many_plan_tasks} tasks, submitted concurrently"
        print(f"bench: plans: {name}", flush=True)
        plans = [
            wide_plan(f"many-{run_id}-{i}", sizes.many_plan_tasks) for i in range(sizes.many_plans)
        ]
        await audit_settled(tickets_dsn)
        start_wall = time.time()
        with meter.measure(name, operations=sizes.many_plans * sizes.many_plan_tasks):
            submitted = await asyncio.gather(*(runner.submit(p) for p in plans))
            all_submitted_s = time.time() - start_wall
            ids = {p["plan_id"] for p in plans}
            statuses = await runner.wait_settled(ids)
        timings = [
            await runner.timing(p["plan_id"], len(p["tasks"]), t0, submit_s)
            for p, (t0, submit_s) in zip(plans, submitted, strict=True)
        ]
        done = [t for t in timings if t.status == "COMPLETED"]
        last_completed = max(
            (t.plan_completed_s + t0 for t, (t0, _) in zip(timings, submitted, strict=True)),
            default=math.nan,
        )
        per_plan = [t.plan_completed_s for t in done]
        makespan = last_completed - start_wall if len(done) == len(plans) else math.nan
        report.raw["plans"][name] = {
            "completed": len(done),
            "statuses": sorted(set(statuses.values())),
            "all_submitted_s": all_submitted_s,
            "makespan_s": makespan,
            "per_plan_completed_p50_s": percentile(per_plan, 0.5),
            "per_plan_completed_p99_s": percentile(per_plan, 0.99),
            "submit_p50_s": percentile([t.submit_s for t in timings], 0.5),
            "submit_p99_s": percentile([t.submit_s for t in timings], 0.99),
        }
        stages = await runner.stages(sorted(ids))
        report.raw["plans"][name]["stages"] = stages
        report.notes.append(_stage_note(name, stages))
        if len(done) != len(plans):
            report.notes.append(
                f"GAP: {name}: only {len(done)} of {len(plans)} plans COMPLETED within "
                f"{sizes.timeout_s:.0f} s (statuses {sorted(set(statuses.values()))})"
            )
        total_tasks = sizes.many_plans * sizes.many_plan_tasks
        floor = _floor(report, total_tasks)
        report.add(
            Figure(
                SECTION,
                f"{name}: all plans COMPLETED (from first POST)",
                makespan,
                "s",
                FLOOR_LABEL,
                floor["completed"],
                note=f"{len(done)}/{len(plans)} COMPLETED; all POSTs answered after "
                f"{all_submitted_s:.2f} s",
            )
        )
        report.add(
            Figure(
                SECTION,
                f"{name}: per-plan time to COMPLETED, p50",
                percentile(per_plan, 0.5),
                "s",
                FLOOR_LABEL + f" ({sizes.many_plan_tasks} tasks)",
                _floor(report, sizes.many_plan_tasks)["completed"],
            )
        )
        report.add(
            Figure(
                SECTION,
                f"{name}: per-plan time to COMPLETED, p99",
                percentile(per_plan, 0.99),
                "s",
                FLOOR_LABEL + f" ({sizes.many_plan_tasks} tasks)",
                _floor(report, sizes.many_plan_tasks)["completed"],
            )
        )

    lag = await _relay_lag_since(tickets_dsn, audit, phase_start, drain_timeout=30)
    report.raw["relay_lag_under_load"] = lag
    idle_p50 = percentile(idle, 0.5)
    report.add(
        Figure(
            SECTION_RELAY,
            "p50 lag (relayed_at - occurred_at) over every event of the plan runs",
            lag["p50_s"] * 1000,
            "ms",
            "single event on the idle stack (median of 5)",
            idle_p50 * 1000,
            note=f"{lag['events']:,} events",
        )
    )
    report.add(
        Figure(
            SECTION_RELAY,
            "p99 lag over every event of the plan runs",
            lag["p99_s"] * 1000,
            "ms",
            "single event on the idle stack (max of 5)",
            max(idle, default=math.nan) * 1000,
            target="p99 < 1 s",
            met=lag["p99_s"] < 1.0,
            note=f"max {lag['max_s'] * 1000:.0f} ms; {lag['unrelayed_at_end']} unrelayed at end",
        )
    )


async def _run_alone(
    report: Report,
    orchestrator_url: str,
    tickets_dsn: str,
    meter: CpuMeter,
    sizes: PlanSizes,
    name: str,
    plan: dict[str, Any],
) -> None:
    """One plan on its own (no target), as :func:`run_one_plan` records it."""
    async with httpx.AsyncClient(base_url=orchestrator_url) as http:
        runner = PlanRunner(http=http, tickets_dsn=tickets_dsn, timeout_s=sizes.timeout_s)
        await run_one_plan(report, runner, meter, name, plan, None, sizes)


def _wide_again(
    report: Report,
    dbs: Databases,
    args: argparse.Namespace,
    logs: Path,
    procs: ProcessStack,
    tickets: stack.Built,
    registry: stack.Built,
    orchestrator: stack.Built,
    sizes: PlanSizes,
    tickets_dsn: str,
) -> None:
    """Replace the workers by ones with more slots and run the wide plan once more."""
    replaced = [p for p in procs if p.name.startswith("worker-")]
    # Read before they stop: /proc/<pid> goes with the process.
    stack.record_memory(
        report, "plans", replaced, f"max_concurrent {sizes.worker_slots}, after the plan runs"
    )
    procs.stop(*(p.name for p in replaced))
    workers = [
        stack.worker(
            name=f"worker-{sizes.wide_again_slots}slots-{i}",
            tickets=tickets.endpoint,
            registry=registry.endpoint,
            max_concurrent=sizes.wide_again_slots,
            log_level=args.log_level,
        )
        for i in range(1, sizes.workers + 1)
    ]
    with ProcessStack([w.spec for w in workers], log_dir=logs / "plans") as extra:
        extra.start_all(timeout=120)
        services = [p for p in procs if p.is_running]
        meter = cpu.meter_for(dbs.cpu_sources, [*services, *extra])
        if args.profile:
            meter.around = profiling.sampler_for(services, args.out / "profiles")
        name = (
            f"wide plan, {sizes.wide_tasks:,} tasks, {sizes.workers} workers with "
            f"max_concurrent {sizes.wide_again_slots}"
        )

        plan = wide_plan(f"wide-again-{uuid.uuid4().hex[:6]}", sizes.wide_tasks)
        asyncio.run(
            _run_alone(
                report, orchestrator.endpoint.http_url, tickets_dsn, meter, sizes, name, plan
            )
        )
        report.cpu.update(meter.results)
        stack.record_memory(
            report, "plans", extra, f"max_concurrent {sizes.wide_again_slots}, after the wide plan"
        )


@dataclass(frozen=True)
class PlanStack:
    """The three services and the reference workers of a plans run, on fresh databases."""

    tickets: stack.Built
    registry: stack.Built
    orchestrator: stack.Built
    workers: list[stack.Built]
    tickets_dsn: str
    audit: AuditTrail

    @property
    def specs(self) -> list[ProcessSpec]:
        services = [self.tickets, self.registry, self.orchestrator, *self.workers]
        return [built.spec for built in services]


def _plan_stack(
    dbs: Databases, args: argparse.Namespace, sizes: PlanSizes, *, relay_idle: bool = False
) -> PlanStack:
    """``relay_idle``: the ticket service's MongoDB is unreachable, so its audit relay only
    backs off (the audit copy's cost, by difference)."""
    suffix = "-relay-idle" if relay_idle else ""
    db_suffix = suffix.replace("-", "_")
    database = f"bench_tickets_plans{db_suffix}"
    tickets_dsn = dbs.fresh_database(database)
    registry_dsn = dbs.fresh_database(f"bench_registry_plans{db_suffix}")
    orchestrator_dsn = dbs.fresh_database(f"bench_orchestrator_plans{db_suffix}")
    mongo: MongoClient[dict[str, Any]] = MongoClient(dbs.mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        mongo.drop_database(database)
    finally:
        mongo.close()
    tickets = stack.ticket_service(
        name="execution-ticket-service" + suffix,
        postgres_dsn=tickets_dsn,
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}" if relay_idle else dbs.mongo_uri,
        mongo_database=database,
        log_level=args.log_level,
        mongo_timeout_ms=200 if relay_idle else None,  # readiness answers at once
    )
    registry = stack.registry(
        name="service-registry" + suffix, postgres_dsn=registry_dsn, log_level=args.log_level
    )
    orchestrator = stack.orchestrator(
        name="orchestrator-dynamic" + suffix,
        postgres_dsn=orchestrator_dsn,
        tickets=tickets.endpoint,
        registry=registry.endpoint,
        log_level=args.log_level,
    )
    workers = [
        stack.worker(
            name=f"worker-{i}{suffix}",
            tickets=tickets.endpoint,
            registry=registry.endpoint,
            max_concurrent=sizes.worker_slots,
            log_level=args.log_level,
        )
        for i in range(1, sizes.workers + 1)
    ]
    return PlanStack(
        tickets=tickets,
        registry=registry,
        orchestrator=orchestrator,
        workers=workers,
        tickets_dsn=tickets_dsn,
        audit=AuditTrail(mongo_uri=dbs.mongo_uri, database=database),
    )


def phase_plans(report: Report, dbs: Databases, args: argparse.Namespace, logs: Path) -> None:
    sizes = QUICK_PLANS if args.quick else FULL_PLANS
    report.parameters["plans: workers"] = (
        f"{sizes.workers} hive-worker processes, max_concurrent {sizes.worker_slots} each"
    )
    plan_stack = _plan_stack(dbs, args, sizes)
    tickets, registry, orchestrator = (
        plan_stack.tickets,
        plan_stack.registry,
        plan_stack.orchestrator,
    )
    tickets_dsn = plan_stack.tickets_dsn
    with ProcessStack(plan_stack.specs, log_dir=logs / "plans") as procs:
        procs.start_all(timeout=120)
        meter = cpu.meter_for(dbs.cpu_sources, procs)
        if args.profile:
            meter.around = profiling.sampler_for(procs, args.out / "profiles")
        asyncio.run(
            run_plans(
                report,
                orchestrator_url=orchestrator.endpoint.http_url,
                tickets_target=tickets.endpoint.grpc_target,
                tickets_dsn=tickets_dsn,
                audit=plan_stack.audit,
                sizes=sizes,
                meter=meter,
                after_wide=lambda: _wide_relay_idle(report, dbs, args, logs, sizes),
            )
        )
        report.cpu.update(meter.results)
        if sizes.large_tasks:  # after the relay lag was read: its load is not in that figure
            name = f"wide plan, {sizes.large_tasks:,} tasks (the default plan size limit)"
            plan = wide_plan(f"large-{uuid.uuid4().hex[:6]}", sizes.large_tasks)
            asyncio.run(
                _run_alone(
                    report, orchestrator.endpoint.http_url, tickets_dsn, meter, sizes, name, plan
                )
            )
            report.cpu.update(meter.results)
        if sizes.wide_again_slots:
            _wide_again(
                report, dbs, args, logs, procs, tickets, registry, orchestrator, sizes, tickets_dsn
            )
        stack.record_memory(report, "plans", procs, "after all plan runs")


def _wide_relay_idle(
    report: Report, dbs: Databases, args: argparse.Namespace, logs: Path, sizes: PlanSizes
) -> None:
    """The wide plan once more, on a fresh stack whose audit relay is idle (MongoDB
    unreachable): what the audit copy costs the plan, by difference. Runs right after the
    wide plan on the main stack (idle meanwhile), so the VM's drift falls on both alike."""
    idle = _plan_stack(dbs, args, sizes, relay_idle=True)
    with ProcessStack(idle.specs, log_dir=logs / "plans") as procs:
        procs.start_all(timeout=120)
        meter = cpu.meter_for(dbs.cpu_sources, procs)
        if args.profile:
            meter.around = profiling.sampler_for(procs, args.out / "profiles")
        name = f"wide plan, {sizes.wide_tasks:,} tasks, audit relay idle (MongoDB unreachable)"
        plan = wide_plan(f"wide-relay-idle-{uuid.uuid4().hex[:6]}", sizes.wide_tasks)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=idle.orchestrator.endpoint.http_url) as http:
                runner = PlanRunner(
                    http=http,
                    tickets_dsn=idle.tickets_dsn,
                    timeout_s=sizes.timeout_s,
                    relay_idle=True,
                )
                await run_one_plan(
                    report, runner, meter, name, plan, None, sizes, sizes.wide_repeats
                )

        asyncio.run(run())
        report.cpu.update(meter.results)
        stack.record_memory(report, "plans", procs, "after the wide plan with the audit relay idle")
