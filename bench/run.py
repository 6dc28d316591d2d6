"""Command line of ``make bench``: start real services on real databases, measure, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench import cpu, profiling, stack
from bench.discovery import DiscoverySizes, run_discovery
from bench.environment import Databases, databases, describe_machine, load_average
from bench.report import Report
from bench.tickets import TicketSizes, run_durable_floor, run_ingest, run_updates
from hive_common.localdb import free_port
from hive_common.procstack import ProcessSpec, ProcessStack, logged_errors

PHASES = ("tickets", "discovery", "plans")
RELAY_IDLE = "audit relay idle: MongoDB unreachable"

FULL_TICKETS = TicketSizes(
    plans=20,
    plan_size=1000,
    ingest_concurrency=2,
    single_calls=4000,
    single_concurrency=16,
    update_calls={1: 1000, 16: 4000, 64: 4000},
)
QUICK_TICKETS = TicketSizes(
    plans=4,
    plan_size=1000,
    ingest_concurrency=2,
    single_calls=500,
    single_concurrency=16,
    update_calls={1: 200, 16: 600, 64: 600},
)
FULL_DISCOVERY = DiscoverySizes(populations=(100, 10_000), calls=1000, register_concurrency=32)
QUICK_DISCOVERY = DiscoverySizes(populations=(100, 1000), calls=200, register_concurrency=32)


@contextlib.contextmanager
def _running(processes: ProcessStack) -> Iterator[ProcessStack]:
    with processes:
        processes.start_all()
        yield processes


@contextlib.contextmanager
def _alongside(
    procs: ProcessStack,
    spec: ProcessSpec,
    meter: cpu.CpuMeter,
    args: argparse.Namespace,
    log_dir: Path,
) -> Iterator[None]:
    """Run one more process for the block, metered (and profiled) with ``procs``."""
    with _running(ProcessStack([spec], log_dir=log_dir)) as more:
        meter.add_pid(spec.name, more[spec.name].pid)
        if args.profile:
            meter.around = profiling.sampler_for([*procs, *more], args.out / "profiles")
        yield


def _meter(dbs: Databases, procs: ProcessStack, args: argparse.Namespace) -> cpu.CpuMeter:
    meter = cpu.meter_for(dbs.cpu_sources, procs)
    if args.profile:
        meter.around = profiling.sampler_for(procs, args.out / "profiles")
    return meter


async def _ingest_and_updates(
    report: Report,
    tickets_target: str,
    echo_target: str,
    dsn: str,
    sizes: TicketSizes,
    meter: cpu.CpuMeter,
    *,
    variant: str = "",
) -> None:
    """The ticket service's ingest and update benchmarks; a ``variant`` (the relay idle)
    has no audit copy to wait for: its outbox only grows."""
    outbox_dsn = None if variant else dsn
    await run_ingest(
        report,
        tickets_target=tickets_target,
        echo_target=echo_target,
        dsn=dsn,
        sizes=sizes,
        meter=meter,
        outbox_dsn=outbox_dsn,
        variant=variant,
    )
    await run_updates(
        report,
        tickets_target=tickets_target,
        echo_target=echo_target,
        sizes=sizes,
        meter=meter,
        outbox_dsn=outbox_dsn,
        variant=variant,
    )


def phase_tickets(report: Report, dbs: Databases, args: argparse.Namespace, logs: Path) -> None:
    dsn = dbs.fresh_database("bench_tickets_micro")
    tickets = stack.ticket_service(
        name="execution-ticket-service",
        postgres_dsn=dsn,
        mongo_uri=dbs.mongo_uri,
        mongo_database="bench_tickets_micro",
        log_level=args.log_level,
    )
    echo = stack.echo_server()
    sizes = QUICK_TICKETS if args.quick else FULL_TICKETS
    with _running(ProcessStack([tickets.spec, echo.spec], log_dir=logs / "tickets")) as procs:
        meter = _meter(dbs, procs, args)
        asyncio.run(
            _ingest_and_updates(
                report, tickets.endpoint.grpc_target, echo.endpoint.grpc_target, dsn, sizes, meter
            )
        )
        stack.record_memory(report, "tickets", procs, "after ingest and update benchmarks")
        procs.stop("execution-ticket-service")
        # Diagnostic: the same ingest and updates (16 clients) with the audit relay idle
        # (MongoDB unreachable, the relay backs off): what the relay and FerretDB cost them.
        quiet = stack.ticket_service(
            name="execution-ticket-service-relay-idle",
            postgres_dsn=dsn,
            mongo_uri=f"mongodb://127.0.0.1:{free_port()}",
            mongo_database="bench_tickets_micro",
            log_level=args.log_level,
            mongo_timeout_ms=200,  # readiness answers at once while MongoDB is away
        )
        with _alongside(procs, quiet.spec, meter, args, logs / "tickets"):
            asyncio.run(
                _ingest_and_updates(
                    report,
                    quiet.endpoint.grpc_target,
                    echo.endpoint.grpc_target,
                    dsn,
                    replace(sizes, update_calls={16: sizes.update_calls[16]}),
                    meter,
                    variant=RELAY_IDLE,
                )
            )
        # Diagnostic: the durable floor (the echo committing one row per call first), with
        # every ticket service stopped.
        floor = stack.echo_server(
            "echo-durable", postgres_dsn=dbs.fresh_database("bench_echo_durable")
        )
        with _alongside(procs, floor.spec, meter, args, logs / "tickets"):
            asyncio.run(
                run_durable_floor(
                    report,
                    echo_target=echo.endpoint.grpc_target,
                    floor_target=floor.endpoint.grpc_target,
                    sizes=sizes,
                    meter=meter,
                )
            )
        report.cpu.update(meter.results)


def phase_discovery(report: Report, dbs: Databases, args: argparse.Namespace, logs: Path) -> None:
    dsn = dbs.fresh_database("bench_registry_discovery")
    registry = stack.registry(
        name="service-registry",
        postgres_dsn=dsn,
        log_level=args.log_level,
        heartbeat_interval_seconds=600,
    )
    echo = stack.echo_server()
    sizes = QUICK_DISCOVERY if args.quick else FULL_DISCOVERY
    with _running(ProcessStack([registry.spec, echo.spec], log_dir=logs / "discovery")) as procs:
        meter = _meter(dbs, procs, args)
        asyncio.run(
            run_discovery(
                report,
                registry_target=registry.endpoint.grpc_target,
                registry_dsn=dsn,
                echo_target=echo.endpoint.grpc_target,
                sizes=sizes,
                meter=meter,
            )
        )
        report.cpu.update(meter.results)
        stack.record_memory(
            report, "discovery", procs, f"after {sizes.populations[-1]:,} registrations"
        )


def _logged_errors(logs: Path) -> str:
    """The error lines of the run's process logs, counted by process and message: a
    service that logged errors did not measure its normal path."""
    counts: Counter[str] = Counter()
    for path in sorted(logs.rglob("*.log")):
        for entry in logged_errors(path):
            message = str(entry.get("event", "")).partition("\n")[0][:100]
            counts[f"{path.parent.name}/{path.stem}: {message}"] += 1
    return "; ".join(f"{n} x {what}" for what, n in counts.most_common()) or "none"


def _foreign_share(report: Report) -> str:
    """Busy time of processes that are not ours, as a share of all cores, over all
    measurements (the machine is shared; the figures are only as clean as this)."""
    foreign = wall = 0.0
    for groups in report.cpu.values():
        if cpu.MACHINE not in groups:
            continue
        ours = sum(v for k, v in groups.items() if k not in cpu.NOT_PROCESSES)
        foreign += max(0.0, groups[cpu.MACHINE] - ours - groups.get(cpu.KERNEL, 0.0))
        wall += groups.get("wall", 0.0)
    cores = os.cpu_count() or 1
    if wall <= 0:
        return "n/a"
    return f"{foreign / (wall * cores):.0%} of {cores} cores on average ({foreign:.1f} CPU-s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (harness development)")
    parser.add_argument(
        "--phase", action="append", choices=PHASES, help="run only these phases (repeatable)"
    )
    parser.add_argument(
        "--no-durable",
        dest="durable",
        action="store_false",
        help="provisioned PostgreSQL without fsync/synchronous_commit (default: durable)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the services into <out>/profiles"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="services' log level (default INFO; workers log at INFO at least)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="JSON and logs")
    parser.add_argument(
        "--markdown",
        type=Path,
        help="also write the Markdown report here (default <out>/latest.md)",
    )
    args = parser.parse_args(argv)
    phases = args.phase or list(PHASES)

    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = (args.out / f"logs-{stamp}").resolve()
    with databases(durable=args.durable) as dbs:
        report = Report(
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            machine=describe_machine(dbs),
            parameters={
                "mode": "quick (development sizes)" if args.quick else "full",
                "phases": ", ".join(phases),
                "postgresql durability": {
                    True: "durable (fsync on, synchronous_commit on)",
                    False: "fsync off, synchronous_commit off",
                    None: "as configured by HIVE_BENCH_POSTGRES_DSN",
                }[dbs.durable],
                "service log level": args.log_level,
                "load average at start (1/5/15 min)": load_average(),
                "process logs": str(logs),
            },
        )
        report.notes += [
            "Method: every service is its own OS process started from its console script "
            "(hive_common.procstack) on databases this run provisioned; the load generator is "
            "this one Python asyncio process with the generated grpc.aio stubs, closed loop "
            "(each client sends its next call when the previous one answered). The echo "
            "baseline gets byte-for-byte the same requests from the same client code. Client, "
            "services and databases share the same cores, so the CPU table below says where "
            "the time went.",
            "Quiescence: every measurement that involves the ticket service (and the echo "
            "measured beside it) starts once the audit relay has delivered every earlier "
            "event (its outbox is empty), so no measurement runs beside the audit backlog of "
            "the ones before it; a measurement's own relay work runs during it and, for the "
            "part still queued when it ends, after it (the relay lag).",
            "Auth: every call carries a service JWT (HS256), verified by the service as in "
            "production; UpdateTicketStatus is sent with the service token rather than "
            "per-ticket tokens (same verification cost).",
            "Whole-plan baseline: the ticket-service work of the plan at the rates this run "
            "measured in isolation (create at the BatchCreateTickets rate + one AssignTicket "
            "at the 16-client assign rate + two updates at the 64-client update rate, per "
            "task), summed; the stack may overlap these steps (and the orchestrator assigns "
            "in batches with AssignTickets), so it is a yardstick, not a lower bound. How "
            "close a plan is to its CPU floor: its *busy* share in the CPU table.",
            "Relay lag: relayed_at - occurred_at of every audit document of the plan runs "
            "(the relay stamps relayed_at when it sends the batch to MongoDB), read from "
            "MongoDB once the outbox drained.",
        ]
        for phase in phases:
            print(f"bench: phase {phase} (load {load_average()})", flush=True)
            report.parameters[f"load average before phase {phase}"] = load_average()
            if phase == "tickets":
                phase_tickets(report, dbs, args, logs)
            elif phase == "discovery":
                phase_discovery(report, dbs, args, logs)
            elif phase == "plans":
                from bench.plans import phase_plans

                phase_plans(report, dbs, args, logs)
    report.parameters["load average at end (1/5/15 min)"] = load_average()
    report.parameters["errors in the process logs"] = _logged_errors(logs)
    report.parameters["CPU taken by processes outside this run, during the measurements"] = (
        _foreign_share(report)
    )
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.duration_s = time.monotonic() - started
    markdown = report.markdown()
    print(markdown)
    report.write_json(args.out / f"bench-{stamp}.json")
    report.write_json(args.out / "latest.json")
    markdown_path = args.markdown or args.out / "latest.md"
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown)
    print(f"bench: JSON report {args.out / f'bench-{stamp}.json'}", flush=True)
    return 0
