"""The orchestrator's small pure pieces: protobuf mapping, the service token cache,
dependency health, settings checks, and the HTTP body reader."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from structlog.testing import capture_logs

from hive_common.auth import TokenIssuer, TokenVerifier
from hive_common.errors import Aborted, Unavailable
from hive_common.http import create_http_app
from hive_common.structs import struct_to_dict
from neuralhive.registry.v1 import registry_service_pb2 as registry_pb
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.config import MAX_PARAMETERS_BYTES_LIMIT, OrchestratorSettings
from orchestrator_dynamic.domain.plan import Plan, Priority, TaskSpec
from orchestrator_dynamic.domain.records import PlanLease
from orchestrator_dynamic.domain.scheduler import (
    Assignment,
    FreedSlot,
    PlanGraph,
    PlanProgress,
    PlanStatus,
    SchedulingPolicy,
    TicketState,
    TicketStatus,
    WorkerHealth,
)
from orchestrator_dynamic.domain.validation import (
    InvalidPlan,
    PlanLimits,
    PlanValidator,
    ValidPlan,
)
from orchestrator_dynamic.engine.convert import (
    ticket_spec,
    ticket_state,
    worker_candidate,
    worker_view,
)
from orchestrator_dynamic.engine.driver import (
    TICKET_CALL_BYTES,
    DrivenPlan,
    DriverSettings,
    PlanDriver,
    error_retry_delay,
)
from orchestrator_dynamic.engine.health import REGISTRY, TICKET_SERVICE, DependencyHealth
from orchestrator_dynamic.engine.metrics import OrchestratorMetrics
from orchestrator_dynamic.engine.tokens import ServiceTokenProvider
from orchestrator_dynamic.transport.http.routes import read_json_body

SECRET = "unit-test-secret-0123456789abcdef-0123456789"


def test_ticket_state_maps_every_field() -> None:
    ticket = ticket_pb.ExecutionTicket(
        ticket_id="t-1",
        task_id="build",
        status=ticket_pb.TICKET_STATUS_RUNNING,
        attempt=2,
        worker_id="w-1",
        error_message="",
        version=7,
    )
    lease = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ticket.lease_expires_at.FromDatetime(lease)
    state = ticket_state("build", ticket)
    assert state.task_id == "build"
    assert state.ticket_id == "t-1"
    assert state.status is TicketStatus.RUNNING
    assert state.attempt == 2
    assert state.worker_id == "w-1"
    assert state.error_message is None  # empty string on the wire means none
    assert state.lease_expires_at == lease
    assert state.updated_at is None  # unset timestamp
    assert state.version == 7


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (ticket_pb.TICKET_STATUS_PENDING, TicketStatus.PENDING),
        (ticket_pb.TICKET_STATUS_ASSIGNED, TicketStatus.ASSIGNED),
        (ticket_pb.TICKET_STATUS_COMPLETED, TicketStatus.COMPLETED),
        (ticket_pb.TICKET_STATUS_FAILED, TicketStatus.FAILED),
        (ticket_pb.TICKET_STATUS_CANCELLED, TicketStatus.CANCELLED),
    ],
)
def test_ticket_statuses(wire: ticket_pb.TicketStatus.ValueType, status: TicketStatus) -> None:
    assert ticket_state("x", ticket_pb.ExecutionTicket(status=wire, attempt=1)).status is status


def test_ticket_spec_carries_the_plan_and_task() -> None:
    task = TaskSpec(
        task_id="test",
        task_type="shell",
        description="run tests",
        required_capabilities=("python", "linux"),
        depends_on=("build",),
        parameters={"cmd": "make test", "n": 3},
        timeout_seconds=None,
        max_retries=2,
    )
    plan = Plan(tasks=(task,), plan_id="p-1", intent_id="i-1", priority=Priority.HIGH)
    spec = ticket_spec(plan, task)
    assert (spec.plan_id, spec.intent_id, spec.task_id, spec.task_type) == (
        "p-1",
        "i-1",
        "test",
        "shell",
    )
    assert spec.description == "run tests"
    assert list(spec.required_capabilities) == ["python", "linux"]
    assert list(spec.depends_on) == ["build"]
    assert dict(spec.parameters) == {"cmd": "make test", "n": 3.0}
    assert spec.priority == ticket_pb.PRIORITY_HIGH
    assert spec.max_retries == 2
    assert spec.timeout_seconds == 0  # the ticket service's default


def _ranked(spare: int, max_concurrent: int) -> registry_pb.RankedWorker:
    return registry_pb.RankedWorker(
        worker=registry_pb.Worker(worker_id="w", max_concurrent=max_concurrent),
        spare_capacity=spare,
        score=0.5,
    )


@pytest.mark.parametrize(
    ("spare", "max_concurrent", "known_active", "expected"),
    [
        (3, 4, 0, 3),  # the registry's view is the tighter one
        (3, 4, 2, 2),  # tickets assigned since the worker's last heartbeat
        (1, 4, 4, 0),  # full as far as this orchestrator knows
    ],
)
def test_worker_candidate_spare_is_the_tighter_bound(
    spare: int, max_concurrent: int, known_active: int, expected: int
) -> None:
    candidate = worker_candidate(_ranked(spare, max_concurrent), known_active)
    assert candidate.spare_capacity == expected
    assert candidate.score == 0.5


def test_worker_candidate_adds_the_slots_freed_since_the_last_heartbeat() -> None:
    heartbeat = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    ranked = _ranked(0, 4)  # full at its last heartbeat
    ranked.worker.in_flight = 4
    ranked.worker.last_heartbeat_at.FromDatetime(heartbeat)
    second = timedelta(seconds=1)
    freed = [  # as the driver keeps them: sorted by freed_at
        # Freed well before the heartbeat: already in its count.
        FreedSlot(held_since=heartbeat - 3 * second, freed_at=heartbeat - second),
        # Freed just before the heartbeat's stamp: the worker may have counted its load
        # before that (the stamp is the registry's, when it stored the heartbeat).
        FreedSlot(held_since=heartbeat - 3 * second, freed_at=heartbeat - second / 10),
        FreedSlot(held_since=heartbeat - 2 * second, freed_at=heartbeat + second),  # counts
        FreedSlot(held_since=heartbeat - second, freed_at=heartbeat + second),  # counts
        # Assigned after the heartbeat: the heartbeat never counted it.
        FreedSlot(held_since=heartbeat + second, freed_at=heartbeat + 2 * second),
    ]
    assert worker_candidate(ranked, known_active=0, freed=freed).spare_capacity == 3
    # Still bounded by what this orchestrator knows to be on the worker.
    assert worker_candidate(ranked, known_active=3, freed=freed).spare_capacity == 1
    # Without a heartbeat time nothing can be added.
    ranked.worker.ClearField("last_heartbeat_at")
    assert worker_candidate(ranked, known_active=0, freed=freed).spare_capacity == 0


def _driver(registry: Any = None, **settings: Any) -> PlanDriver:
    """A driver for its pure bookkeeping (no database, no ticket service)."""
    return PlanDriver(
        repository=cast(Any, None),
        tickets=cast(Any, None),
        registry=registry,
        policy=SchedulingPolicy(),
        settings=DriverSettings(owner_id="o", **settings),
        health=DependencyHealth(),
        metrics=OrchestratorMetrics(CollectorRegistry()),
    )


class CountingRegistry:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    async def discover_workers(self, **kwargs: Any) -> list[registry_pb.RankedWorker]:
        self.calls += 1
        if self.failing:
            raise Unavailable("registry down")
        return [_ranked(1, 4)]


async def test_a_discovery_answer_is_reused_for_a_short_while() -> None:
    registry = CountingRegistry()
    python = frozenset({"python"})
    cached = _driver(registry, discovery_cache=3600.0)
    first = await cached._discover(python)
    assert await cached._discover(python) == first
    assert registry.calls == 1
    await cached._discover(frozenset({"gpu"}))  # other capabilities: their own answer
    assert registry.calls == 2
    cached._discovered.clear()  # what a registry event does
    await cached._discover(python)
    assert registry.calls == 3
    # Not reused with a cache time of 0, and a failure is not remembered.
    uncached = _driver(registry, discovery_cache=0.0)
    await uncached._discover(python)
    await uncached._discover(python)
    assert registry.calls == 5
    registry.failing = True
    failing = _driver(registry, discovery_cache=3600.0)
    assert await failing._discover(python) == []
    registry.failing = False
    assert await failing._discover(python) == first
    assert registry.calls == 7


def driven_plan(task_ids: tuple[str, ...], start: datetime) -> DrivenPlan:
    tasks = tuple(TaskSpec(task_id=t, task_type="echo") for t in task_ids)
    graph = PlanGraph(Plan(tasks=tasks, plan_id="p"))  # a stored plan always has its id
    return DrivenPlan(
        lease=PlanLease(plan_id="p", owner_id="o", epoch=1, expires_at=start),
        progress=PlanProgress(graph),
        cancel_requested=False,
        status=PlanStatus.RUNNING,
        error_message=None,
        created_at=start,
    )


async def test_a_freed_slot_counts_from_when_the_ticket_was_assigned() -> None:
    driver = _driver()
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    plan = driven_plan(("a",), start)
    second = timedelta(seconds=1)

    def seen(status: TicketStatus, version: int, at: datetime) -> bool:
        state = TicketState(
            task_id="a",
            ticket_id="t",
            status=status,
            worker_id="w1",
            version=version,
            updated_at=at,
        )
        return driver._merge(plan, state)

    assert not seen(TicketStatus.ASSIGNED, 2, start)
    assert not seen(TicketStatus.RUNNING, 3, start + second)
    assert seen(TicketStatus.COMPLETED, 4, start + 2 * second)
    # A heartbeat between the assignment and the start counted the ticket (a worker counts
    # the assignments it accepted): the slot counts as freed since then, not since RUNNING.
    assert driver._freed_slots == {"w1": [FreedSlot(held_since=start, freed_at=start + 2 * second)]}
    assert plan.assigned_at == {}


async def test_freed_slots_are_kept_in_freed_order_and_forgotten_after_a_minute() -> None:
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    now = [start]
    driver = _driver()
    driver._clock = lambda: now[0]
    tasks = ("a", "b", "c")
    plan = driven_plan(tasks, start)
    second = timedelta(seconds=1)
    for task_id in tasks:
        driver._merge(
            plan,
            TicketState(
                task_id,
                "t-" + task_id,
                TicketStatus.ASSIGNED,
                worker_id="w1",
                version=2,
                updated_at=start,
            ),
        )
    # Seen out of order (events of different transactions): kept sorted by freed_at.
    for task_id, freed in (("a", 3), ("b", 1), ("c", 2)):
        driver._merge(
            plan,
            TicketState(
                task_id,
                "t-" + task_id,
                TicketStatus.COMPLETED,
                worker_id="w1",
                version=3,
                updated_at=start + freed * second,
            ),
        )
    assert [s.freed_at for s in driver._freed_slots["w1"]] == [
        start + second,
        start + 2 * second,
        start + 3 * second,
    ]
    now[0] = start + timedelta(seconds=62)
    driver._forget_old_frees()
    assert [s.freed_at for s in driver._freed_slots["w1"]] == [start + 3 * second]
    now[0] = start + timedelta(seconds=64)
    driver._forget_old_frees()
    assert driver._freed_slots == {}


class RecordingRepository:
    """The two writes of a dispatching round, recorded (no database)."""

    def __init__(self) -> None:
        self.statuses: list[PlanStatus] = []
        self.stored: list[TicketState] = []

    async def update_tickets(self, lease: PlanLease, tickets: list[TicketState]) -> list[str]:
        self.stored.extend(tickets)
        return [t.task_id for t in tickets]

    async def set_status(
        self,
        lease: PlanLease,
        *,
        status: PlanStatus,
        error_message: str | None = None,
        settled: bool = False,
    ) -> Any:
        self.statuses.append(status)
        return SimpleNamespace(status=status, error_message=error_message, cancel_requested_at=None)

    async def cancel_requested(self, plan_ids: list[str]) -> set[str]:
        return set()


class AssigningTickets:
    """AssignTickets that accepts every assignment (the worker never starts them)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []  # the tickets of each call
        self.capacities: set[int] = set()  # the worker capacities the calls named

    async def assign_tickets(
        self, requests: list[ticket_pb.AssignTicketRequest]
    ) -> list[ticket_pb.ExecutionTicket]:
        self.calls.append([r.ticket_id for r in requests])
        self.capacities.update(r.worker_capacity for r in requests)
        return [
            ticket_pb.ExecutionTicket(
                ticket_id=r.ticket_id,
                task_id=r.ticket_id.removeprefix("t-"),
                status=ticket_pb.TICKET_STATUS_ASSIGNED,
                attempt=r.attempt,
                worker_id=r.worker_id,
                version=r.expected_version + 1,
            )
            for r in requests
        ]


class OneWorkerRegistry:
    def __init__(self, spare: int) -> None:
        self.spare = spare

    async def discover_workers(self, **kwargs: Any) -> list[registry_pb.RankedWorker]:
        return [_ranked(self.spare, 4)] if self.spare else []


@pytest.mark.parametrize(("spare", "expected"), [(1, PlanStatus.RUNNING), (0, PlanStatus.PENDING)])
async def test_a_plan_is_running_as_soon_as_a_round_assigns_its_first_ticket(
    spare: int, expected: PlanStatus
) -> None:
    # The status used to be decided and stored before the round's assignments; our own
    # assignments never come back on the ticket watch (it excludes our changes), so the plan
    # stayed PENDING until the worker started a ticket or the next resync (30 s).
    repository = RecordingRepository()
    driver = PlanDriver(
        repository=cast(Any, repository),
        tickets=cast(Any, AssigningTickets()),
        registry=cast(Any, OneWorkerRegistry(spare)),
        policy=SchedulingPolicy(),
        settings=DriverSettings(owner_id="o"),
        health=DependencyHealth(),
        metrics=OrchestratorMetrics(CollectorRegistry()),
    )
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    plan = driven_plan(("a", "b"), start)
    plan.status = PlanStatus.PENDING
    for task_id in ("a", "b"):
        plan.progress.record(TicketState(task_id, "t-" + task_id, version=1))
    plan.activated.set()
    plan.resync_due = float("inf")  # no ListTickets in this round
    driver._plans[plan.plan_id] = plan

    await driver._round()

    assigned = [t.task_id for t in repository.stored if t.status is TicketStatus.ASSIGNED]
    assert assigned == (["a"] if spare else [])
    assert plan.status is expected
    # Stored at most once per round, and only when it changed.
    assert repository.statuses == ([expected] if expected is PlanStatus.RUNNING else [])
    await driver._round()  # nothing new: nothing stored
    assert repository.statuses == ([expected] if expected is PlanStatus.RUNNING else [])


class AbortingTickets:
    """AssignTickets answered ABORTED as a whole: the ticket service's group commit lost to
    concurrent changes of other callers' tickets ("retry the request")."""

    async def assign_tickets(self, requests: list[Any]) -> list[Any]:
        raise Aborted("concurrent update conflict; retry the request")


class CancellingRegistry(OneWorkerRegistry):
    """A registry during whose answer the plan is cancelled through this replica."""

    def __init__(self, driver: Callable[[], PlanDriver], plan_id: str) -> None:
        super().__init__(spare=1)
        self._driver = driver
        self._plan_id = plan_id

    async def discover_workers(self, **kwargs: Any) -> list[registry_pb.RankedWorker]:
        self._driver().kick(self._plan_id, cancel_requested=True)
        return await super().discover_workers(**kwargs)


async def test_a_cancel_that_arrives_while_the_round_asks_the_registry_assigns_nothing() -> None:
    # The round had read the cancels before it asked the registry; the cancel answered 200
    # meanwhile, then the round assigned a ticket of the cancelled plan (seen in a soak).
    tickets = AssigningTickets()
    plan = driven_plan(("a",), datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC))
    driver = PlanDriver(
        repository=cast(Any, RecordingRepository()),
        tickets=cast(Any, tickets),
        registry=cast(Any, CancellingRegistry(lambda: driver, plan.plan_id)),
        policy=SchedulingPolicy(),
        settings=DriverSettings(owner_id="o"),
        health=DependencyHealth(),
        metrics=OrchestratorMetrics(CollectorRegistry()),
    )
    plan.progress.record(TicketState("a", "t-a", version=1))
    plan.activated.set()
    plan.resync_due = float("inf")
    driver._plans[plan.plan_id] = plan

    await driver._round()

    assert plan.cancel_requested
    assert tickets.calls == []


async def test_an_aborted_round_is_postponed_like_an_outage_not_failed() -> None:
    # It was logged at ERROR as "plan round failed" and counted as a failing round.
    metrics = OrchestratorMetrics(CollectorRegistry())
    repository = RecordingRepository()
    driver = PlanDriver(
        repository=cast(Any, repository),
        tickets=cast(Any, AbortingTickets()),
        registry=cast(Any, OneWorkerRegistry(1)),
        policy=SchedulingPolicy(),
        settings=DriverSettings(owner_id="o"),
        health=DependencyHealth(),
        metrics=metrics,
    )
    plan = driven_plan(("a",), datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC))
    plan.progress.record(TicketState("a", "t-a", version=1))
    plan.activated.set()
    plan.resync_due = float("inf")
    driver._plans[plan.plan_id] = plan

    with capture_logs() as logs:
        await driver._round()

    assert plan.failed_rounds == 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == []
    assert "plan round postponed" in [e["event"] for e in logs]
    transient = metrics.round_failures.labels("transient")._value.get()
    assert transient == 1


async def test_assignments_go_in_calls_bounded_by_count_and_by_their_tickets_bytes() -> None:
    # The answer carries each ticket whole: ~0.8 MB each, at most two of them per call
    # (TICKET_CALL_BYTES), whatever the count bound allows.
    tickets = AssigningTickets()
    driver = PlanDriver(
        repository=cast(Any, RecordingRepository()),
        tickets=cast(Any, tickets),
        registry=cast(Any, None),
        policy=SchedulingPolicy(),
        settings=DriverSettings(owner_id="o", ticket_batch_size=3),
        health=DependencyHealth(),
        metrics=OrchestratorMetrics(CollectorRegistry()),
    )
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    tasks = [TaskSpec(t, "echo", parameters={"blob": "x" * 800_000}) for t in "abcd"]
    tasks += [TaskSpec(t, "echo") for t in "efghi"]
    plan = driven_plan((), start)
    plan.progress = PlanProgress(
        PlanGraph(Plan(tasks=tuple(tasks), plan_id="p")),
        {t.task_id: TicketState(t.task_id, "t-" + t.task_id, version=1) for t in tasks},
    )
    await driver._assign(plan, [Assignment(t.task_id, "w") for t in tasks], {"w": 4})
    assert tickets.calls == [["t-a", "t-b"], ["t-c", "t-d", "t-e"], ["t-f", "t-g", "t-h"], ["t-i"]]
    assert tickets.capacities == {4}  # the ticket service checks the worker's capacity


def test_worker_view() -> None:
    worker = registry_pb.Worker(
        worker_id="w",
        capabilities=["python"],
        status=registry_pb.WORKER_STATUS_DRAINING,
        max_concurrent=4,
        in_flight=1,
    )
    seen = datetime(2030, 1, 1, tzinfo=UTC)
    worker.last_heartbeat_at.FromDatetime(seen)
    view = worker_view(worker)
    assert view.capabilities == frozenset({"python"})
    assert view.status is WorkerHealth.DRAINING
    assert view.spare_capacity == 3
    assert view.last_heartbeat_at == seen
    assert not view.takes_work


def test_service_token_is_cached_and_renewed_before_expiry() -> None:
    now = [datetime.now(UTC)]
    issuer = TokenIssuer(secret=SECRET, issuer="hive-flow-c", clock=lambda: now[0].timestamp())
    provider = ServiceTokenProvider(
        issuer=issuer, service="orchestrator-dynamic", ttl_seconds=100, clock=lambda: now[0]
    )
    first = provider()
    assert provider() == first
    now[0] += timedelta(seconds=79)
    assert provider() == first
    now[0] += timedelta(seconds=2)  # less than a fifth of the lifetime left
    renewed = provider()
    assert renewed != first
    # The verifier runs on the real clock: check the token issued "now".
    claims = TokenVerifier(secret=SECRET).verify(first)
    assert claims.subject == "orchestrator-dynamic"
    assert claims.kind.value == "service"


def test_dependency_health_reports_degraded_until_success() -> None:
    health = DependencyHealth()
    assert health.report() == {TICKET_SERVICE: {"status": "ok"}, REGISTRY: {"status": "ok"}}
    health.failed(REGISTRY, "connection refused")
    assert health.report()[REGISTRY] == {"status": "degraded", "detail": "connection refused"}
    assert health.failure(REGISTRY) == "connection refused"
    assert health.failure(TICKET_SERVICE) is None
    health.succeeded(REGISTRY)
    assert health.report()[REGISTRY] == {"status": "ok"}


def test_settings_reject_a_renew_interval_beyond_the_lease() -> None:
    with pytest.raises(ValidationError):
        OrchestratorSettings(lease_ttl_seconds=5, lease_renew_interval_seconds=5)
    with pytest.raises(ValidationError):
        OrchestratorSettings(backoff_base_seconds=10, backoff_cap_seconds=1)
    settings = OrchestratorSettings(max_tasks=5, fail_fast=False, backoff_base_seconds=0.5)
    assert settings.plan_limits().max_tasks == 5
    assert settings.scheduling_policy().fail_fast is False
    assert settings.scheduling_policy().backoff.base_seconds == 0.5


def test_the_largest_ticket_c1_accepts_fits_in_one_call_with_room_for_a_result() -> None:
    with pytest.raises(ValidationError):
        OrchestratorSettings(max_parameters_bytes=MAX_PARAMETERS_BYTES_LIMIT + 1)
    limits = OrchestratorSettings(max_parameters_bytes=MAX_PARAMETERS_BYTES_LIMIT).plan_limits()
    deps = [f"{n:03}".ljust(limits.max_id_length, "d") for n in range(200)]
    # Numbers grow the most as a Struct: 11 bytes each for the 2 of "0," in C1's JSON
    # (whole numbers are measured as integers, "0.0" as "0").
    numbers = [0.0] * ((limits.max_parameters_bytes - len('{"n":[]}')) // 2)
    largest = {
        "task_id": "t" * limits.max_id_length,
        "task_type": "y" * limits.max_task_type_length,
        "description": "\U0001d11e" * limits.max_description_length,  # 4 bytes each
        "required_capabilities": [
            f"{n:02}".ljust(limits.max_capability_length, "c")
            for n in range(limits.max_capabilities_per_task)
        ],
        "depends_on": deps,
        "parameters": {"n": numbers},
    }
    raw = {
        "plan_id": "p" * limits.max_id_length,
        "tasks": [*({"task_id": d, "task_type": "echo"} for d in deps), largest],
    }
    valid = PlanValidator(limits=limits).validate(raw)
    assert isinstance(valid, ValidPlan), valid
    plan = valid.plan
    spec = ticket_spec(plan, plan.tasks[-1])
    # Under 1.5 MiB: within one call (TICKET_CALL_BYTES), 2.5 MiB of a 4 MiB message left.
    assert spec.ByteSize() < TICKET_CALL_BYTES * 3 // 4
    numbers.append(0.0)  # the parameters were as large as C1 accepts
    assert isinstance(PlanValidator(limits=limits).validate(raw), InvalidPlan)


def _ticket_service_measure(parameters: dict[str, Any]) -> int:
    """A task's parameters as the ticket service measures them: the Struct the orchestrator
    sends, read back with whole numbers as integers, as compact UTF-8 JSON."""
    valid = PlanValidator().validate(
        {"plan_id": "p", "tasks": [{"task_id": "t", "task_type": "echo", "parameters": parameters}]}
    )
    assert isinstance(valid, ValidPlan), valid
    sent = ticket_spec(valid.plan, valid.plan.tasks[0]).parameters
    return len(json.dumps(struct_to_dict(sent), separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "parameters",
    [
        {"text": "é" * 400},  # 2 bytes each in UTF-8, 6 as a \u00e9 escape
        {"emoji": "\U0001f600 and 中文", "quote": 'a"b\\c\n'},
        {"n": [1, 2, 3, -40, 2**53], "whole": 30.0, "e": 1e2, "f": 1.5, "big": 1e300},
        {"nested": {"list": [True, False, None, {"k": []}]}, "": 0},
    ],
)
def test_c1_measures_parameters_exactly_as_the_ticket_service(parameters: dict[str, Any]) -> None:
    size = _ticket_service_measure(parameters)
    raw = {"tasks": [{"task_id": "t", "task_type": "echo", "parameters": parameters}]}

    at_limit = PlanValidator(limits=PlanLimits(max_parameters_bytes=size)).validate(raw)
    below = PlanValidator(limits=PlanLimits(max_parameters_bytes=size - 1)).validate(raw)

    assert isinstance(at_limit, ValidPlan), at_limit
    assert isinstance(below, InvalidPlan)
    assert [str(e) for e in below.errors] == [
        f"$.tasks[0].parameters: is {size} bytes as UTF-8 JSON; the limit is {size - 1}"
    ]


def _body_app(limit: int) -> FastAPI:
    app = create_http_app(title="t", version="0")

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"value": await read_json_body(request, limit=limit)}

    return app


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"a": [1, 2]}', 200),
        (b"[1,", 400),
        (b"", 400),
        (b"   ", 400),
        (b"\xff\xfe", 400),
        (b'{"a": Infinity}', 400),
        (b"[" * 5000 + b"]" * 5000, 400),  # nesting too deep for the decoder
        (b'"' + b"x" * 20_001 + b'"', 413),
    ],
)
async def test_read_json_body(content: bytes, status: int) -> None:
    transport = httpx.ASGITransport(app=_body_app(limit=20_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/echo", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert error["code"] in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    else:
        assert response.json() == {"value": {"a": [1, 2]}}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/merge-patch+json",
    ],
)
async def test_read_json_body_takes_json_media_types(content_type: str) -> None:
    transport = httpx.ASGITransport(app=_body_app(limit=20_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/echo", content=b'{"a": [1, 2]}', headers={"content-type": content_type}
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        ({"content-type": "text/plain"}, "got 'text/plain'"),
        ({"content-type": "application/x-www-form-urlencoded"}, "got 'application/x-www"),
        ({"content-type": "application/jsonx"}, "got 'application/jsonx'"),
        ({}, "none was sent"),
    ],
)
async def test_read_json_body_refuses_other_media_types_with_415(
    headers: dict[str, str], shown: str
) -> None:
    transport = httpx.ASGITransport(app=_body_app(limit=20_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/echo", content=b'{"a": [1, 2]}', headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert "send Content-Type: application/json" in error["message"]
    assert shown in error["message"]


async def test_read_json_body_refuses_a_compressed_body_with_415() -> None:
    transport = httpx.ASGITransport(app=_body_app(limit=20_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/echo",
            content=gzip.compress(b'{"a": 1}'),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    assert response.status_code == 415, response.text
    assert "Content-Encoding 'gzip' is not supported" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "field", "description"),
    [
        (
            b'{"tasks": [{"parameters": ' + b'{"n": ' * 5000 + b"1" + b"}" * 5000 + b"}]}",
            "$",
            "nests more than 128 levels deep",
        ),
        (b"[" * 1_000_000 + b"]" * 1_000_000, "$", "nests more than 128 levels deep"),
        (
            b'{"tasks": [{"max_retries": ' + b"9" * 5000 + b"}]}",
            "$.tasks[0].max_retries",
            "number too large: an integer of 5000 digits",
        ),
        (
            b'{"plan_id": "a", "tasks": [1], "tasks": [2]}',
            "$.tasks",
            "duplicate key 'tasks': a key may appear only once in an object",
        ),
    ],
)
async def test_read_json_body_explains_unreadable_bodies_without_python_internals(
    content: bytes, field: str, description: str
) -> None:
    transport = httpx.ASGITransport(app=_body_app(limit=10_000_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/echo", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["details"]["field_violations"] == [{"field": field, "description": description}]
    for internal in ("recursion", "sys.set_int_max_str_digits", "4300"):
        assert internal not in response.text


def test_a_plan_whose_rounds_keep_failing_tries_again_later_each_time() -> None:
    # Every second, for ever, an ERROR line each (a refusal that fails the same way).
    delays = [error_retry_delay(n, first=1.0, cap=30.0) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert error_retry_delay(10_000, first=1.0, cap=30.0) == 30.0
    assert error_retry_delay(1, first=5.0, cap=2.0) == 5.0  # never sooner than the first
