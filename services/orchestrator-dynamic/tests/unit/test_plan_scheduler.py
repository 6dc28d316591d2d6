"""Scheduling decisions, table-driven: plan + ticket states -> what to do next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator_dynamic.domain.plan import Plan, TaskSpec
from orchestrator_dynamic.domain.scheduler import (
    Assignment,
    CapacityLedger,
    PlanGraph,
    PlanStatus,
    RetryBackoff,
    SchedulingPolicy,
    TicketState,
    TicketStatus,
    WorkerCandidate,
    assign_round,
    choose_worker,
    decide,
    merge_observation,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
S = TicketStatus
P = PlanStatus


def make_plan(deps: Mapping[str, tuple[str, ...]]) -> Plan:
    return Plan(
        tasks=tuple(
            TaskSpec(task_id=t, task_type="echo", depends_on=d, max_retries=2)
            for t, d in deps.items()
        )
    )


DIAMOND = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
DIAMOND_PLUS = {**DIAMOND, "x": ()}
CHAIN = {"a": (), "b": ("a",), "c": ("b",)}
# "x" is a lone root; "a" heads a chain of three: a is on the critical path.
TWO_ROOTS = {"x": (), "a": (), "b": ("a",), "c": ("b",)}


@dataclass(frozen=True)
class T:
    status: TicketStatus
    attempt: int
    backoff_until: datetime | None
    backoff_attempt: int | None
    created: bool
    error: str | None


def t(
    status: TicketStatus = S.PENDING,
    *,
    attempt: int = 1,
    backoff: timedelta | None = None,
    backoff_attempt: int | None = None,
    created: bool = True,
    error: str | None = None,
) -> T:
    return T(
        status=status,
        attempt=attempt,
        backoff_until=NOW + backoff if backoff is not None else None,
        backoff_attempt=(backoff_attempt or attempt) if backoff is not None else None,
        created=created,
        error=error,
    )


@dataclass
class Case:
    name: str
    deps: Mapping[str, tuple[str, ...]]
    tickets: Mapping[str, T]
    status: PlanStatus
    dispatch: tuple[str, ...] = ()
    cancel: tuple[str, ...] = ()
    start_backoff: tuple[str, ...] = ()
    settled: bool = False
    wakeup: timedelta | None = None
    fail_fast: bool = True
    cancel_requested: bool = False
    error: str | None = None


def states(case: Case) -> dict[str, TicketState]:
    return {
        task_id: TicketState(
            task_id=task_id,
            ticket_id=f"ticket-{task_id}",
            status=spec.status,
            attempt=spec.attempt,
            error_message=spec.error,
            backoff_until=spec.backoff_until,
            backoff_attempt=spec.backoff_attempt,
        )
        for task_id, spec in case.tickets.items()
        if spec.created
    }


CASES = [
    Case(
        "fresh plan: every ticket still to create",
        DIAMOND,
        {},
        P.PENDING,
    ),
    Case(
        "some tickets created: only those can be dispatched",
        DIAMOND,
        {"a": t(), "b": t(created=False)},
        P.PENDING,
        dispatch=("a",),
    ),
    Case(
        "all pending: the roots are ready",
        DIAMOND,
        {k: t() for k in DIAMOND},
        P.PENDING,
        dispatch=("a",),
    ),
    Case(
        "root completed releases both dependents",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(), "c": t(), "d": t()},
        P.RUNNING,
        dispatch=("b", "c"),
    ),
    Case(
        "join waits for every dependency",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.COMPLETED), "c": t(S.RUNNING), "d": t()},
        P.RUNNING,
    ),
    Case(
        "join released when all dependencies completed",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.COMPLETED), "c": t(S.COMPLETED), "d": t()},
        P.RUNNING,
        dispatch=("d",),
    ),
    Case(
        "assigned and running tickets are not dispatched again",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.ASSIGNED), "c": t(S.RUNNING), "d": t()},
        P.RUNNING,
    ),
    Case(
        "dispatch order puts the critical path first",
        TWO_ROOTS,
        {k: t() for k in TWO_ROOTS},
        P.PENDING,
        dispatch=("a", "x"),
    ),
    Case(
        "all completed",
        DIAMOND,
        {k: t(S.COMPLETED) for k in DIAMOND},
        P.COMPLETED,
        settled=True,
    ),
    Case(
        "re-queued ticket starts its backoff and is not dispatched",
        CHAIN,
        {"a": t(S.COMPLETED), "b": t(attempt=2), "c": t()},
        P.RUNNING,
        start_backoff=("b",),
        wakeup=timedelta(seconds=0.5),  # base 1s * jitter 0.5
    ),
    Case(
        "ticket in backoff waits for it",
        CHAIN,
        {"a": t(S.COMPLETED), "b": t(attempt=2, backoff=timedelta(seconds=3)), "c": t()},
        P.RUNNING,
        wakeup=timedelta(seconds=3),
    ),
    Case(
        "backoff ending exactly now is over",
        CHAIN,
        {"a": t(S.COMPLETED), "b": t(attempt=2, backoff=timedelta(0)), "c": t()},
        P.RUNNING,
        dispatch=("b",),
    ),
    Case(
        "expired backoff: dispatched",
        CHAIN,
        {"a": t(S.COMPLETED), "b": t(attempt=3, backoff=timedelta(seconds=-1)), "c": t()},
        P.RUNNING,
        dispatch=("b",),
    ),
    Case(
        "backoff of an earlier attempt does not count: a new one starts",
        CHAIN,
        {
            "a": t(S.COMPLETED),
            "b": t(attempt=3, backoff=timedelta(seconds=-1), backoff_attempt=2),
            "c": t(),
        },
        P.RUNNING,
        start_backoff=("b",),
        wakeup=timedelta(seconds=1),  # ceiling 2s * 0.5
    ),
    Case(
        "re-queued root alone makes the plan RUNNING",
        {"a": ()},
        {"a": t(attempt=2, backoff=timedelta(seconds=5))},
        P.RUNNING,
        wakeup=timedelta(seconds=5),
    ),
    Case(
        "fail-fast: a final failure cancels everything in flight and fails the plan",
        DIAMOND_PLUS,
        {
            "a": t(S.COMPLETED),
            "b": t(S.FAILED, attempt=3, error="exit 1"),
            "c": t(S.RUNNING),
            "d": t(),
            "x": t(attempt=2),
        },
        P.FAILED,
        cancel=("c", "d", "x"),
        error="task 'b' failed after 3 attempts: exit 1",
    ),
    Case(
        "fail-fast: settled once everything is terminal",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.FAILED), "c": t(S.CANCELLED), "d": t(S.CANCELLED)},
        P.FAILED,
        settled=True,
        error="task 'b' failed after 1 attempt",
    ),
    Case(
        "fail-fast: tasks without tickets are cancelled, not created",
        DIAMOND,
        {"a": t(S.FAILED), "b": t(created=False)},
        P.FAILED,
        cancel=("b", "c", "d"),
        error="task 'a' failed after 1 attempt",
    ),
    Case(
        "no fail-fast: only transitive dependents are cancelled, other branches go on",
        DIAMOND_PLUS,
        {"a": t(S.COMPLETED), "b": t(S.FAILED), "c": t(S.RUNNING), "d": t(), "x": t()},
        P.RUNNING,
        dispatch=("x",),
        cancel=("d",),
        fail_fast=False,
        error="task 'b' failed after 1 attempt",
    ),
    Case(
        "no fail-fast: cancellation is transitive",
        {**CHAIN, "x": ()},
        {"a": t(S.FAILED), "b": t(), "c": t(), "x": t(S.RUNNING)},
        P.RUNNING,
        cancel=("b", "c"),
        fail_fast=False,
        error="task 'a' failed after 1 attempt",
    ),
    Case(
        "no fail-fast: plan fails when the last branch finishes",
        DIAMOND_PLUS,
        {
            "a": t(S.COMPLETED),
            "b": t(S.FAILED),
            "c": t(S.COMPLETED),
            "d": t(S.CANCELLED),
            "x": t(S.COMPLETED),
        },
        P.FAILED,
        settled=True,
        fail_fast=False,
        error="task 'b' failed after 1 attempt",
    ),
    Case(
        "no fail-fast: failed plan whose last dependents still need cancelling",
        DIAMOND_PLUS,
        {"a": t(S.COMPLETED), "b": t(S.FAILED), "c": t(S.COMPLETED), "d": t(), "x": t(S.COMPLETED)},
        P.FAILED,
        cancel=("d",),
        fail_fast=False,
        error="task 'b' failed after 1 attempt",
    ),
    Case(
        "two failures are both counted in the message",
        {"a": (), "b": ()},
        {"a": t(S.FAILED, error="boom"), "b": t(S.FAILED)},
        P.FAILED,
        settled=True,
        error="task 'a' failed after 1 attempt: boom (and 1 more failed tasks)",
    ),
    Case(
        "ticket cancelled outside the plan blocks its dependents without fail-fast",
        DIAMOND_PLUS,
        {"a": t(S.COMPLETED), "b": t(S.CANCELLED), "c": t(S.RUNNING), "d": t(), "x": t()},
        P.RUNNING,
        dispatch=("x",),
        cancel=("d",),
    ),
    Case(
        "plan ending with an outside cancel is CANCELLED",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.CANCELLED), "c": t(S.COMPLETED), "d": t(S.CANCELLED)},
        P.CANCELLED,
        settled=True,
        error="task 'b' was cancelled outside the plan",
    ),
    Case(
        "cancel request cancels every non-terminal ticket",
        DIAMOND_PLUS,
        {"a": t(S.COMPLETED), "b": t(S.RUNNING), "c": t(attempt=2), "d": t(), "x": t(S.ASSIGNED)},
        P.CANCELLED,
        cancel=("b", "c", "d", "x"),
        cancel_requested=True,
        error="cancelled on request",
    ),
    Case(
        "cancelled plan settles when every ticket is terminal",
        DIAMOND,
        {"a": t(S.COMPLETED), "b": t(S.CANCELLED), "c": t(S.COMPLETED), "d": t(S.CANCELLED)},
        P.CANCELLED,
        settled=True,
        cancel_requested=True,
        error="cancelled on request",
    ),
    Case(
        "cancel request after everything completed changes nothing",
        DIAMOND,
        {k: t(S.COMPLETED) for k in DIAMOND},
        P.COMPLETED,
        settled=True,
        cancel_requested=True,
    ),
    Case(
        "cancel request before any ticket exists",
        DIAMOND,
        {},
        P.CANCELLED,
        cancel=("a", "b", "c", "d"),
        cancel_requested=True,
        error="cancelled on request",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    policy = SchedulingPolicy(
        fail_fast=case.fail_fast,
        backoff=RetryBackoff(base_seconds=1, cap_seconds=8, jitter=lambda: 0.5),
    )

    decision = decide(
        PlanGraph(make_plan(case.deps)),
        states(case),
        now=NOW,
        policy=policy,
        cancel_requested=case.cancel_requested,
    )

    assert decision.status is case.status
    assert decision.dispatch == case.dispatch
    assert decision.cancel == case.cancel
    assert tuple(decision.start_backoff) == case.start_backoff
    assert decision.settled is case.settled
    assert decision.next_wakeup == (NOW + case.wakeup if case.wakeup is not None else None)
    assert decision.error_message == case.error
    assert sum(decision.counts.values()) == len(case.deps)


def test_counts_cover_every_status_and_count_missing_tickets_as_pending() -> None:
    graph = PlanGraph(make_plan(DIAMOND_PLUS))
    tickets = {
        "a": TicketState("a", "t-a", S.COMPLETED),
        "b": TicketState("b", "t-b", S.RUNNING),
        "c": TicketState("c", "t-c", S.ASSIGNED),
    }

    decision = decide(graph, tickets, now=NOW, policy=SchedulingPolicy())

    assert decision.counts == {
        "PENDING": 2,
        "ASSIGNED": 1,
        "RUNNING": 1,
        "COMPLETED": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }


def test_started_backoff_uses_the_attempt_and_jitter() -> None:
    draws = iter([0.25, 1.0])
    policy = SchedulingPolicy(
        backoff=RetryBackoff(base_seconds=2, cap_seconds=100, jitter=lambda: next(draws))
    )
    graph = PlanGraph(make_plan({"a": (), "b": ()}))
    tickets = {
        "a": TicketState("a", "t-a", S.PENDING, attempt=2),
        "b": TicketState("b", "t-b", S.PENDING, attempt=4),
    }

    decision = decide(graph, tickets, now=NOW, policy=policy)

    assert decision.start_backoff == {
        "a": NOW + timedelta(seconds=0.5),  # ceiling 2s, jitter 0.25
        "b": NOW + timedelta(seconds=8),  # ceiling 2 * 2**2 = 8s, jitter 1
    }
    assert decision.next_wakeup == NOW + timedelta(seconds=0.5)
    assert decision.dispatch == ()


# -- backoff ----------------------------------------------------------------------------------

CEILINGS = [(1, 0.0), (0, 0.0), (2, 1.5), (3, 3.0), (4, 6.0), (5, 12.0), (6, 20.0), (10_000, 20.0)]


@pytest.mark.parametrize(("attempt", "ceiling"), CEILINGS)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    backoff = RetryBackoff(base_seconds=1.5, cap_seconds=20)

    assert backoff.ceiling(attempt) == ceiling


@pytest.mark.parametrize(
    ("draw", "seconds"), [(0.0, 0.0), (0.5, 1.5), (1.0, 3.0), (-3.0, 0.0), (7.0, 3.0)]
)
def test_full_jitter_scales_the_ceiling_and_is_clamped(draw: float, seconds: float) -> None:
    backoff = RetryBackoff(base_seconds=1.5, cap_seconds=20, jitter=lambda: draw)

    assert backoff.delay(3) == timedelta(seconds=seconds)
    assert backoff.until(3, NOW) == NOW + timedelta(seconds=seconds)


def test_default_jitter_stays_within_the_ceiling() -> None:
    backoff = RetryBackoff(base_seconds=1, cap_seconds=4)

    delays = {backoff.delay(3) for _ in range(200)}

    assert all(timedelta(0) <= d <= timedelta(seconds=2) for d in delays)
    assert len(delays) > 1  # it is random


# -- worker choice -----------------------------------------------------------------------------

A = WorkerCandidate("A", spare_capacity=2, score=0.9)
B = WorkerCandidate("B", spare_capacity=1, score=0.5)
FULL = WorkerCandidate("F", spare_capacity=0, score=0.99)

CHOICES: list[tuple[str, list[WorkerCandidate], dict[str, int], str | None]] = [
    ("best ranked with room", [A, B], {}, "A"),
    ("rank order is kept even when a later one has more room", [B, A], {}, "B"),
    ("full workers are skipped", [FULL, B], {}, "B"),
    ("promised capacity is subtracted", [A, B], {"A": 2}, "B"),
    ("partly promised still has room", [A, B], {"A": 1}, "A"),
    ("everyone full", [A, B], {"A": 2, "B": 1}, None),
    ("no candidates", [], {}, None),
    ("negative spare is full", [WorkerCandidate("N", -1)], {}, None),
]


@pytest.mark.parametrize(
    ("candidates", "promised", "chosen"),
    [(c, p, w) for _, c, p, w in CHOICES],
    ids=[n for n, *_ in CHOICES],
)
def test_choose_worker(
    candidates: list[WorkerCandidate], promised: dict[str, int], chosen: str | None
) -> None:
    result = choose_worker(candidates, promised)

    assert (result.worker_id if result else None) == chosen


def test_ledger_promises_capacity_across_one_round() -> None:
    ledger = CapacityLedger()

    picks = [ledger.choose([A, B]) for _ in range(4)]

    assert [p.worker_id if p else None for p in picks] == ["A", "A", "B", None]
    assert ledger.promised("A") == 2
    ledger.release("A")
    assert ledger.promised("A") == 1
    chosen = ledger.choose([A, B])
    assert chosen is not None
    assert chosen.worker_id == "A"
    ledger.release("B")
    ledger.release("B")  # releasing more than promised never goes negative
    assert ledger.promised("B") == 0


CAPS_PLAN = Plan(
    tasks=(
        TaskSpec("p1", "echo", required_capabilities=("python",)),
        TaskSpec("g1", "echo", required_capabilities=("gpu", "python")),
        TaskSpec("p2", "echo", required_capabilities=("python",)),
        TaskSpec("any", "echo"),
        TaskSpec("g2", "echo", required_capabilities=("python", "gpu")),
        TaskSpec("p3", "echo", required_capabilities=("python",)),
    )
)


def test_assign_round_fills_workers_in_rank_order_and_leaves_the_rest_waiting() -> None:
    graph = PlanGraph(CAPS_PLAN)
    py = frozenset({"python"})
    both = frozenset({"python", "gpu"})
    big = WorkerCandidate("big", spare_capacity=2)
    gpu = WorkerCandidate("gpu", spare_capacity=1)
    candidates = {py: [big, gpu], both: [gpu], frozenset(): [big, gpu]}
    ledger = CapacityLedger()

    result = assign_round(graph, ["g1", "p1", "p2", "p3", "g2", "any"], candidates, ledger)

    assert result.assignments == (
        Assignment("g1", "gpu"),
        Assignment("p1", "big"),
        Assignment("p2", "big"),
    )
    assert result.unassigned == ("p3", "g2", "any")
    assert (ledger.promised("big"), ledger.promised("gpu")) == (2, 1)


def test_assign_round_leaves_the_rest_waiting_once_every_capability_set_is_full() -> None:
    graph = PlanGraph(CAPS_PLAN)
    py = frozenset({"python"})
    both = frozenset({"python", "gpu"})
    one = WorkerCandidate("one", spare_capacity=1)
    ledger = CapacityLedger()
    candidates = {py: [one], both: [one], frozenset(): [one]}

    result = assign_round(graph, ["p1", "g1", "p2", "any", "p3", "g2"], candidates, ledger)

    assert result.assignments == (Assignment("p1", "one"),)
    assert result.unassigned == ("g1", "p2", "any", "p3", "g2")
    assert ledger.promised("one") == 1


def test_capability_sets_of_ready_tasks() -> None:
    graph = PlanGraph(CAPS_PLAN)
    py, both = frozenset({"python"}), frozenset({"python", "gpu"})

    assert graph.capability_sets == {py, both, frozenset()}
    assert graph.capability_sets_of(["p1", "p2"]) == {py}
    assert graph.capability_sets_of(["g2", "p3", "g1"]) == {py, both}
    assert graph.capability_sets_of(["p1", "any", "g1", "p2"]) == graph.capability_sets
    assert graph.capability_sets_of([]) == set()


def test_a_retry_goes_to_another_worker_when_one_has_room() -> None:
    # A task's next attempt went straight back to the worker its last one ended on (a
    # frozen worker still HEALTHY in the registry got the retry of the task it froze on).
    graph = PlanGraph(CAPS_PLAN)
    py = frozenset({"python"})
    best = WorkerCandidate("best", spare_capacity=1, score=0.9)
    other = WorkerCandidate("other", spare_capacity=1, score=0.1)

    elsewhere = assign_round(graph, ["p1"], {py: [best, other]}, CapacityLedger(), {"p1": "best"})
    assert elsewhere.assignments == (Assignment("p1", "other"),)
    # Only when another has room: else the same worker (better than waiting).
    only = assign_round(graph, ["p1"], {py: [best]}, CapacityLedger(), {"p1": "best"})
    assert only.assignments == (Assignment("p1", "best"),)
    full = WorkerCandidate("other", spare_capacity=0)
    same = assign_round(graph, ["p1"], {py: [best, full]}, CapacityLedger(), {"p1": "best"})
    assert same.assignments == (Assignment("p1", "best"),)
    # Other tasks keep the ranking.
    kept = assign_round(graph, ["p2"], {py: [best, other]}, CapacityLedger(), {"p1": "best"})
    assert kept.assignments == (Assignment("p2", "best"),)


def test_assign_round_without_candidates_assigns_nothing() -> None:
    graph = PlanGraph(CAPS_PLAN)

    result = assign_round(graph, ["p1", "g1"], {}, CapacityLedger())

    assert result.assignments == ()
    assert result.unassigned == ("p1", "g1")


BACKOFF_END = NOW + timedelta(seconds=9)
KNOWN = TicketState(
    "a", "tk", S.PENDING, attempt=2, version=4, backoff_until=BACKOFF_END, backoff_attempt=2
)
MERGES: list[tuple[str, TicketState, TicketState, TicketState | None]] = [
    (
        "newer version wins, backoff kept",
        KNOWN,
        TicketState("a", "tk", S.ASSIGNED, attempt=2, worker_id="w", version=5),
        TicketState(
            "a",
            "tk",
            S.ASSIGNED,
            attempt=2,
            worker_id="w",
            version=5,
            backoff_until=BACKOFF_END,
            backoff_attempt=2,
        ),
    ),
    (
        "same version is not newer",
        KNOWN,
        replace(KNOWN, status=S.RUNNING, backoff_until=None),
        None,
    ),
    ("older version is ignored", KNOWN, TicketState("a", "tk", S.RUNNING, version=3), None),
    (
        "first observation with a ticket id is taken even at version 0",
        TicketState("a"),
        TicketState("a", "tk", S.PENDING, version=0),
        TicketState("a", "tk", S.PENDING, version=0),
    ),
    (
        "a newer observation without a ticket id keeps the known id",
        KNOWN,
        TicketState("a", None, S.RUNNING, attempt=2, version=6),
        replace(KNOWN, status=S.RUNNING, version=6),
    ),
]


@pytest.mark.parametrize(
    ("current", "observed", "merged"),
    [(c, o, m) for _, c, o, m in MERGES],
    ids=[n for n, *_ in MERGES],
)
def test_merge_observation(
    current: TicketState, observed: TicketState, merged: TicketState | None
) -> None:
    assert merge_observation(current, observed) == merged


def test_merged_requeue_starts_a_new_backoff() -> None:
    requeued = merge_observation(KNOWN, TicketState("a", "tk", S.PENDING, attempt=3, version=9))
    assert requeued is not None
    graph = PlanGraph(make_plan({"a": ()}))
    policy = SchedulingPolicy(backoff=RetryBackoff(base_seconds=1, jitter=lambda: 1.0))

    decision = decide(graph, {"a": requeued}, now=NOW, policy=policy)

    assert requeued.backoff_end() is None  # the stored backoff belonged to attempt 2
    assert decision.start_backoff == {"a": NOW + timedelta(seconds=2)}


@pytest.mark.parametrize("status", [S.ASSIGNED, S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_a_backoff_means_nothing_once_the_ticket_left_pending(status: S) -> None:
    # A FAILED (or CANCELLED) ticket used to show the backoff of its last retry for good.
    waiting = TicketState(
        "a", "tk", S.PENDING, attempt=2, backoff_until=NOW, backoff_attempt=2, version=5
    )
    assert waiting.backoff_end() == NOW
    moved = merge_observation(waiting, TicketState("a", "tk", status, attempt=2, version=6))
    assert moved is not None
    assert moved.backoff_end() is None
