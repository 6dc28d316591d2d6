"""explain(task_ids): why tickets are (not) running."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator_dynamic.domain.plan import Plan, TaskSpec
from orchestrator_dynamic.domain.scheduler import (
    PlanGraph,
    ReasonCode,
    RetryBackoff,
    RoundError,
    SchedulingPolicy,
    TicketState,
    TicketStatus,
    WorkerHealth,
    WorkerView,
    explain,
    in_namespace,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
S = TicketStatus
R = ReasonCode

# a -> (b, c) -> d ; x independent; g needs a gpu.
PLAN = Plan(
    tasks=(
        TaskSpec("a", "echo", required_capabilities=("python",)),
        TaskSpec("b", "echo", depends_on=("a",), required_capabilities=("python",)),
        TaskSpec("c", "echo", depends_on=("a",), required_capabilities=("python",)),
        TaskSpec("d", "echo", depends_on=("b", "c"), max_retries=2),
        TaskSpec("x", "echo"),
        TaskSpec("g", "echo", required_capabilities=("python", "gpu")),
    )
)
SEEN = NOW - timedelta(seconds=4)
PY = WorkerView("w-py", frozenset({"python"}), last_heartbeat_at=SEEN)
GPU = WorkerView("w-gpu", frozenset({"gpu"}), last_heartbeat_at=SEEN)
PY_GPU_DRAINING = WorkerView("w-drain", frozenset({"python", "gpu"}), status=WorkerHealth.DRAINING)
PY_GPU_SICK = WorkerView("w-sick", frozenset({"python", "gpu"}), status=WorkerHealth.UNHEALTHY)
PY_GPU_FULL = WorkerView("w-full", frozenset({"python", "gpu"}), spare_capacity=0)
PY_GPU = WorkerView("w-both", frozenset({"python", "gpu"}))


def ts(task_id: str, status: TicketStatus = S.PENDING, **kw: object) -> TicketState:
    return TicketState(task_id, f"ticket-{task_id}", status, **kw)  # type: ignore[arg-type]


ALL_PENDING = {k: ts(k) for k in PLAN.task_ids()}
A_DONE = {**ALL_PENDING, "a": ts("a", S.COMPLETED)}


@dataclass
class Case:
    name: str
    task_id: str
    tickets: dict[str, TicketState]
    codes: list[ReasonCode]
    summary_contains: str
    workers: list[WorkerView] | None = field(default_factory=lambda: [PY, GPU, PY_GPU])
    fail_fast: bool = True
    cancel_requested: bool = False
    round_error: RoundError | None = None
    tickets_unreachable: str | None = None


CASES = [
    Case("ready", "a", ALL_PENDING, [R.READY], "ready"),
    Case(
        "ticket not created",
        "a",
        {"b": ts("b")},
        [R.TICKET_NOT_CREATED],
        "has not been created",
    ),
    Case(
        "waiting on dependencies, with their statuses",
        "d",
        {**A_DONE, "b": ts("b", S.RUNNING), "c": ts("c", S.COMPLETED)},
        [R.WAITING_ON_DEPENDENCIES],
        "waiting on b (RUNNING)",
    ),
    Case(
        "waiting on dependencies and no worker for it either",
        "d",
        {**A_DONE, "b": ts("b", S.ASSIGNED)},
        [R.WAITING_ON_DEPENDENCIES, R.WORKERS_UNKNOWN],
        "waiting on b (ASSIGNED), c (PENDING)",
        workers=None,
    ),
    Case(
        "retry backoff",
        "x",
        {
            **ALL_PENDING,
            "x": ts(
                "x",
                attempt=2,
                backoff_until=NOW + timedelta(seconds=30),
                backoff_attempt=2,
                error_message="exit 3",
            ),
        },
        [R.RETRY_BACKOFF],
        "retry backoff until 2026-11-24 12:00:30Z before attempt 2 (previous error: exit 3)",
    ),
    Case(
        "retry backoff not started yet shows its ceiling",
        "x",
        {**ALL_PENDING, "x": ts("x", attempt=3)},
        [R.RETRY_BACKOFF],
        "no later than 2026-11-24 12:00:20Z",
    ),
    Case(
        "no live worker with the capability",
        "g",
        ALL_PENDING,
        [R.NO_CAPABLE_WORKER],
        "no live worker with capability 'gpu'",
        workers=[PY, PY_GPU_DRAINING, PY_GPU_SICK],
    ),
    Case(
        "capabilities spread over several workers",
        "g",
        ALL_PENDING,
        [R.NO_CAPABLE_WORKER],
        "no single live worker has all of 'python', 'gpu'",
        workers=[PY, GPU],
    ),
    Case(
        "capable workers all full",
        "g",
        ALL_PENDING,
        [R.NO_WORKER_CAPACITY],
        "all 1 capable live workers are at capacity",
        workers=[PY, GPU, PY_GPU_FULL],
    ),
    Case(
        # It said "ready" while every assignment was refused (e.g. a lease the ticket
        # service does not allow), the plan PENDING for ever.
        "ready, but the plan's rounds fail",
        "a",
        ALL_PENDING,
        [R.ROUNDS_FAILING],
        "ready, but the plan's scheduling rounds fail (the last at 2026-11-24 11:59:58Z, "
        "tried again later each time): InvalidArgument: invalid assignments",
        round_error=RoundError("InvalidArgument: invalid assignments", NOW - timedelta(seconds=2)),
    ),
    Case(
        # Its ticket creation refused (e.g. an orchestrator whose JWT secret the ticket
        # service does not accept): explain said "not created yet" for ever.
        "ticket not created, the plan's rounds fail",
        "a",
        {"b": ts("b")},
        [R.ROUNDS_FAILING, R.TICKET_NOT_CREATED, R.WORKERS_UNKNOWN],
        "its ticket has not been created: the plan's scheduling rounds fail (the last at "
        "2026-11-24 11:59:58Z, tried again later each time): Unauthenticated: token "
        "signature is invalid",
        workers=None,
        round_error=RoundError(
            "Unauthenticated: token signature is invalid", NOW - timedelta(seconds=2)
        ),
    ),
    Case(
        "ticket not created and waiting on dependencies, the plan's rounds fail",
        "d",
        {"a": ts("a", S.COMPLETED)},
        [R.ROUNDS_FAILING, R.TICKET_NOT_CREATED, R.WAITING_ON_DEPENDENCIES],
        "its ticket has not been created: the plan's scheduling rounds fail",
        round_error=RoundError("Unauthenticated: refused", NOW - timedelta(seconds=2)),
    ),
    Case(
        # It said "assigned in the next scheduling round" while the rounds waited for the
        # ticket service, and "not created yet" without saying why.
        "ready, the ticket service unreachable",
        "a",
        ALL_PENDING,
        [R.TICKET_SERVICE_UNREACHABLE],
        "the ticket service cannot be reached (connection refused): the scheduling rounds "
        "wait for it; ready: it is assigned once the service answers",
        tickets_unreachable="connection refused",
    ),
    Case(
        "ticket not created, the ticket service unreachable",
        "a",
        {"b": ts("b")},
        [R.TICKET_SERVICE_UNREACHABLE, R.TICKET_NOT_CREATED],
        "the ticket service cannot be reached (connection refused): the scheduling rounds "
        "wait for it; its ticket is created once it answers",
        tickets_unreachable="connection refused",
    ),
    Case(
        # What the rounds say when they fail for another reason comes first.
        "ticket not created, rounds failing, the ticket service unreachable",
        "a",
        {"b": ts("b")},
        [R.ROUNDS_FAILING, R.TICKET_NOT_CREATED],
        "its ticket has not been created: the plan's scheduling rounds fail",
        round_error=RoundError("Unauthenticated: refused", NOW - timedelta(seconds=2)),
        tickets_unreachable="connection refused",
    ),
    Case(
        "registry unreachable",
        "a",
        ALL_PENDING,
        [R.READY, R.WORKERS_UNKNOWN],
        "ready as far as the plan goes; whether a worker can take it is unknown",
        workers=None,
    ),
    Case(
        "leased to a live worker",
        "a",
        {
            **ALL_PENDING,
            "a": ts("a", S.ASSIGNED, worker_id="w-py", lease_expires_at=NOW + timedelta(seconds=9)),
        },
        [R.LEASED],
        "leased to worker w-py until 2026-11-24 12:00:09Z, waiting for it to start "
        "(healthy, last seen 2026-11-24 11:59:56Z)",
    ),
    Case(
        "leased to a worker that is gone, lease expired",
        "a",
        {
            **ALL_PENDING,
            "a": ts(
                "a", S.ASSIGNED, worker_id="w-old", lease_expires_at=NOW - timedelta(seconds=1)
            ),
        },
        [R.LEASED],
        "(expired), waiting for it to start (no longer registered",
    ),
    Case(
        "running",
        "a",
        {**ALL_PENDING, "a": ts("a", S.RUNNING, worker_id="w-py")},
        [R.RUNNING],
        "running on worker w-py (healthy, last seen 2026-11-24 11:59:56Z)",
    ),
    Case(
        "running, registry unreachable",
        "a",
        {**ALL_PENDING, "a": ts("a", S.RUNNING, worker_id="w-py")},
        [R.RUNNING],
        "worker status unknown",
        workers=None,
    ),
    Case("completed", "a", A_DONE, [R.FINISHED], "finished as COMPLETED after attempt 1"),
    Case(
        "failed",
        "a",
        {**ALL_PENDING, "a": ts("a", S.FAILED, attempt=3, error_message="boom")},
        [R.FINISHED],
        "finished as FAILED after attempt 3: boom",
    ),
    Case(
        "plan cancelled",
        "b",
        A_DONE,
        [R.PLAN_CANCELLED],
        "the plan was cancelled",
        cancel_requested=True,
    ),
    Case(
        "plan cancelled while running",
        "b",
        {**A_DONE, "b": ts("b", S.RUNNING, worker_id="w-py")},
        [R.PLAN_CANCELLED, R.RUNNING],
        "the plan was cancelled",
        cancel_requested=True,
    ),
    Case(
        "fail-fast stops an independent branch",
        "x",
        {**A_DONE, "b": ts("b", S.FAILED, error_message="boom")},
        [R.PLAN_FAILED],
        "the plan failed (task 'b' failed after 1 attempt: boom)",
    ),
    Case(
        "dependent of a failed task, transitively",
        "d",
        {**ALL_PENDING, "a": ts("a", S.FAILED)},
        [R.DEPENDENCY_FAILED],
        "will never run: depends on a (FAILED)",
        fail_fast=False,
    ),
    Case(
        "dependent of a cancelled task",
        "d",
        {**A_DONE, "c": ts("c", S.CANCELLED), "b": ts("b", S.RUNNING)},
        [R.DEPENDENCY_FAILED],
        "will never run: depends on c (CANCELLED)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_explain(case: Case) -> None:
    policy = SchedulingPolicy(
        fail_fast=case.fail_fast,
        backoff=RetryBackoff(base_seconds=10, cap_seconds=60, jitter=lambda: 0.0),
    )

    (explanation,) = explain(
        PlanGraph(PLAN),
        case.tickets,
        [case.task_id],
        now=NOW,
        policy=policy,
        workers=case.workers,
        cancel_requested=case.cancel_requested,
        round_error=case.round_error,
        tickets_unreachable=case.tickets_unreachable,
    )

    assert [r.code for r in explanation.reasons] == case.codes
    assert case.summary_contains in explanation.summary
    assert explanation.summary == explanation.reasons[0].message


def test_rounds_failing_for_a_ticket_not_created_carries_the_error() -> None:
    failed_at = NOW - timedelta(seconds=2)
    (explanation,) = explain(
        PlanGraph(PLAN),
        {},
        ["a"],
        now=NOW,
        policy=SchedulingPolicy(),
        workers=[PY],
        round_error=RoundError("Unauthenticated: token signature is invalid", failed_at),
    )

    assert explanation.ticket_id is None
    assert explanation.reasons[0].details == {
        "error": "Unauthenticated: token signature is invalid",
        "failed_at": failed_at.isoformat(),
    }


def test_worker_messages_name_a_namespace_other_than_the_default() -> None:
    # "no live worker with capability 'gpu'" while `hive workers list` showed one (in
    # another namespace than the orchestrator's).
    def summary(namespace: str, workers: list[WorkerView]) -> str:
        (explanation,) = explain(
            PlanGraph(PLAN),
            ALL_PENDING,
            ["g"],
            now=NOW,
            policy=SchedulingPolicy(),
            workers=workers,
            where=in_namespace(namespace),
        )
        return explanation.summary

    assert summary("ml", [PY]) == "no live worker in namespace 'ml' with capability 'gpu'"
    assert summary("ml", [PY, GPU]) == (
        "no single live worker in namespace 'ml' has all of 'python', 'gpu'"
    )
    assert summary("default", [PY]) == summary("", [PY]) == "no live worker with capability 'gpu'"


def test_explain_carries_structured_details() -> None:
    tickets = {**A_DONE, "b": ts("b", S.RUNNING), "d": ts("d", attempt=2, error_message="x")}

    (explanation,) = explain(
        PlanGraph(PLAN),
        tickets,
        ["d"],
        now=NOW,
        policy=SchedulingPolicy(),
        workers=[PY],
    )

    assert explanation.ticket_id == "ticket-d"
    assert (explanation.attempt, explanation.max_attempts) == (2, 3)
    body = explanation.to_json()
    assert body["status"] == "PENDING"
    assert body["reasons"][0] == {  # type: ignore[index]
        "code": "WAITING_ON_DEPENDENCIES",
        "message": "waiting on b (RUNNING), c (PENDING)",
        "details": {"dependencies": {"b": "RUNNING", "c": "PENDING"}},
    }


def test_explain_lease_details_name_worker_and_last_heartbeat() -> None:
    lease = NOW + timedelta(seconds=9)
    tickets = {**ALL_PENDING, "a": ts("a", S.ASSIGNED, worker_id="w-py", lease_expires_at=lease)}

    (explanation,) = explain(
        PlanGraph(PLAN), tickets, ["a"], now=NOW, policy=SchedulingPolicy(), workers=[PY]
    )

    assert explanation.worker_id == "w-py"
    assert explanation.reasons[0].details == {
        "worker_id": "w-py",
        "lease_expires_at": lease.isoformat(),
        "last_heartbeat_at": SEEN.isoformat(),
        "worker_status": "HEALTHY",
    }


def test_explain_does_not_draw_jitter() -> None:
    def exploding_jitter() -> float:
        raise AssertionError("explain must not consume randomness")

    policy = SchedulingPolicy(backoff=RetryBackoff(jitter=exploding_jitter))
    tickets = {**ALL_PENDING, "x": ts("x", attempt=2)}

    (explanation,) = explain(PlanGraph(PLAN), tickets, ["x"], now=NOW, policy=policy, workers=[PY])

    assert explanation.reasons[0].code is R.RETRY_BACKOFF


def test_explain_unknown_task() -> None:
    with pytest.raises(KeyError):
        explain(
            PlanGraph(PLAN),
            ALL_PENDING,
            ["a", "nope"],
            now=NOW,
            policy=SchedulingPolicy(),
            workers=[],
        )
