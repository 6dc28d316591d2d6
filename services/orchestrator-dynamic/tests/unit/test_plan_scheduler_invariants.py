"""Invariants of decide(), PlanProgress and explain() over random DAGs and ticket states
(seeded)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator_dynamic.domain.plan import Plan, TaskSpec
from orchestrator_dynamic.domain.scheduler import (
    OCCUPYING,
    PlanGraph,
    PlanProgress,
    PlanStatus,
    RetryBackoff,
    SchedulingPolicy,
    TicketState,
    TicketStatus,
    WorkerView,
    decide,
    explain,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
S = TicketStatus


def random_case(rng: random.Random) -> tuple[Plan, dict[str, TicketState]]:
    n = rng.randint(1, 12)
    ids = [f"t{i}" for i in range(n)]
    tasks = []
    for i, task_id in enumerate(ids):
        # Dependencies only on earlier tasks: always acyclic, like every validated plan.
        deps = tuple(rng.sample(ids[:i], k=rng.randint(0, min(i, 3))))
        caps = tuple(rng.sample(["python", "gpu", "shell"], k=rng.randint(0, 2)))
        tasks.append(TaskSpec(task_id, "echo", depends_on=deps, required_capabilities=caps))
    tickets = {task_id: random_state(rng, task_id) for task_id in ids if rng.random() >= 0.1}
    return Plan(tasks=tuple(tasks)), tickets  # 10 %: ticket not created yet


def random_state(rng: random.Random, task_id: str) -> TicketState:
    attempt = rng.randint(1, 3)
    backoff_attempt = rng.choice([None, attempt, attempt - 1])
    backoff_until = (
        NOW + timedelta(seconds=rng.randint(-5, 5)) if backoff_attempt is not None else None
    )
    return TicketState(
        task_id,
        f"tk-{task_id}",
        rng.choice(list(S)),
        attempt=attempt,
        worker_id=rng.choice([None, "w1", "w-gone"]),
        backoff_until=backoff_until,
        backoff_attempt=backoff_attempt if backoff_until else None,
    )


WORKERS = [WorkerView("w1", frozenset({"python", "shell"}), spare_capacity=1)]


@pytest.mark.parametrize("seed", range(30))
def test_decisions_respect_their_invariants(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        plan, tickets = random_case(rng)
        graph = PlanGraph(plan)
        fail_fast = rng.random() < 0.5
        cancel_requested = rng.random() < 0.2
        policy = SchedulingPolicy(
            fail_fast=fail_fast, backoff=RetryBackoff(jitter=lambda: rng.random())
        )

        d = decide(graph, tickets, now=NOW, policy=policy, cancel_requested=cancel_requested)

        status = {t: (tickets[t].status if t in tickets else S.PENDING) for t in graph.order}
        terminal = {t for t, s in status.items() if s.terminal}
        assert sum(d.counts.values()) == len(graph.order)
        assert set(d.cancel).isdisjoint(terminal)
        assert set(d.dispatch).isdisjoint(d.cancel)
        for task_id in d.dispatch:
            assert status[task_id] is S.PENDING
            assert task_id in tickets
            assert all(status[dep] is S.COMPLETED for dep in graph.depends_on[task_id])
            end = tickets[task_id].backoff_end()
            assert end is None or end <= NOW
            assert task_id not in d.start_backoff
        for task_id, until in d.start_backoff.items():
            assert tickets[task_id].attempt > 1
            assert NOW <= until <= NOW + timedelta(seconds=policy.backoff.cap_seconds)
        assert d.settled == (terminal == set(graph.order))
        assert (d.status is PlanStatus.COMPLETED) == all(s is S.COMPLETED for s in status.values())
        failed = any(s is S.FAILED for s in status.values())
        if (cancel_requested or (failed and fail_fast)) and d.status is not PlanStatus.COMPLETED:
            assert set(d.cancel) == set(graph.order) - terminal
            assert d.status is (PlanStatus.CANCELLED if cancel_requested else PlanStatus.FAILED)
        if d.next_wakeup is not None:
            assert d.next_wakeup > NOW

        workers = rng.choice([None, [], WORKERS])
        explanations = explain(
            graph,
            tickets,
            graph.order,
            now=NOW,
            policy=policy,
            workers=workers,
            cancel_requested=cancel_requested,
        )
        assert [e.task_id for e in explanations] == list(graph.order)
        for task_id, explanation in zip(graph.order, explanations, strict=True):
            # Explaining the tasks together says what explaining each alone says.
            assert [explanation] == explain(
                graph,
                tickets,
                [task_id],
                now=NOW,
                policy=policy,
                workers=workers,
                cancel_requested=cancel_requested,
            )
            assert explanation.reasons
            assert explanation.summary == explanation.reasons[0].message


@pytest.mark.parametrize("seed", range(30))
def test_a_progress_kept_up_to_date_decides_as_one_built_afresh(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        plan, tickets = random_case(rng)
        graph = PlanGraph(plan)
        # A constant jitter: both sides draw the same backoffs.
        policy = SchedulingPolicy(
            fail_fast=rng.random() < 0.5, backoff=RetryBackoff(jitter=lambda: 0.5)
        )
        progress = PlanProgress(graph, tickets)
        known = dict(progress.states)
        for _ in range(100):
            task_id = rng.choice(graph.order)
            # Mostly real tickets; sometimes back to "no ticket yet" (a fresh PlanProgress).
            state = random_state(rng, task_id) if rng.random() < 0.95 else TicketState(task_id)
            progress.record(state)
            known[task_id] = state
            cancel_requested = rng.random() < 0.1

            decided = progress.decide(now=NOW, policy=policy, cancel_requested=cancel_requested)

            afresh = PlanProgress(graph, known)
            assert decided == afresh.decide(
                now=NOW, policy=policy, cancel_requested=cancel_requested
            )
            assert progress.states == known
            occupying: dict[str, int] = {}
            for s in known.values():
                if s.status in OCCUPYING and s.worker_id:
                    occupying[s.worker_id] = occupying.get(s.worker_id, 0) + 1
            assert progress.occupying == occupying


def test_a_progress_refuses_a_task_not_in_the_plan() -> None:
    progress = PlanProgress(PlanGraph(Plan(tasks=(TaskSpec("a", "echo"),))))
    with pytest.raises(KeyError):
        progress.record(TicketState("b", "tk-b"))
    assert list(progress.states) == ["a"]
