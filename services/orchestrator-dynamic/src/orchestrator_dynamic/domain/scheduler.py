"""C3 to C5 as pure decisions: no I/O, no clock, no randomness unless injected.

The orchestrator feeds in the plan and what it knows of each ticket (from the ticket
service, via WatchTickets or a ListTickets resync) and gets back what to do next: which
tickets to dispatch, which to cancel, which re-queued tickets start a retry backoff, the
plan's aggregated status, and when to look again.

Decisions:
- Fail-fast (default): a ticket that is FAILED (the ticket service only leaves a ticket
  FAILED once its retries are used up) cancels every other non-terminal ticket and fails
  the plan at once. With ``fail_fast=False`` only the failed task's transitive dependents
  are cancelled; independent branches finish and the plan becomes FAILED when nothing is
  left in flight.
- A ticket CANCELLED outside a plan cancel (e.g. through the ticket service API) blocks
  its dependents, which are cancelled; it is not a failure, so it does not fail-fast. A
  plan that ends with cancelled but no failed tickets is CANCELLED.
- Every re-queue (attempt > 1, whether after a FAILED report or a lost lease) waits for an
  exponential backoff with full jitter before it is dispatched again.
- ``status`` can be terminal while ``settled`` is False: the plan has FAILED or been
  CANCELLED but some ticket is still in flight and must be cancelled. The orchestrator keeps
  driving a plan until it is settled.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from hive_common.namespaces import DEFAULT_NAMESPACE
from orchestrator_dynamic.domain.graph import heights, reachable, reverse_edges
from orchestrator_dynamic.domain.plan import JsonValue, Plan, TaskSpec


class TicketStatus(StrEnum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_TICKET


_TERMINAL_TICKET = frozenset({TicketStatus.COMPLETED, TicketStatus.FAILED, TicketStatus.CANCELLED})


class PlanStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_PLAN


_TERMINAL_PLAN = frozenset({PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class TicketState:
    """What the orchestrator knows of one task's ticket.

    ``ticket_id`` is None until C2 created the ticket. ``backoff_until`` is only meaningful
    for ``backoff_attempt``: a backoff computed for attempt 2 says nothing about attempt 3,
    and only while the ticket is PENDING (it delays a dispatch).
    """

    task_id: str
    ticket_id: str | None = None
    status: TicketStatus = TicketStatus.PENDING
    attempt: int = 1
    # Attempts that ended with their worker: they used none of the task's retries.
    lost_runs: int = 0
    worker_id: str | None = None
    error_message: str | None = None
    lease_expires_at: datetime | None = None
    backoff_until: datetime | None = None
    backoff_attempt: int | None = None
    # The ticket's version when this was observed: older observations never overwrite newer.
    version: int = 0
    updated_at: datetime | None = None

    def backoff_end(self) -> datetime | None:
        if self.status is TicketStatus.PENDING and self.backoff_attempt == self.attempt:
            return self.backoff_until
        return None


def merge_observation(current: TicketState, observed: TicketState) -> TicketState | None:
    """Fold a ticket observation (a WatchTickets event or a ListTickets resync) into what is
    known. Returns the new state, or None when the observation is not newer (the same rule
    ``PlanRepository.update_tickets`` applies): a higher ``version`` wins, and the first
    observation carrying a ticket id is always taken. The orchestrator's own backoff fields
    are kept; they only count for the attempt they were computed for."""
    first_ticket = current.ticket_id is None and observed.ticket_id is not None
    if observed.version <= current.version and not first_ticket:
        return None
    return replace(
        observed,
        ticket_id=observed.ticket_id or current.ticket_id,
        backoff_until=current.backoff_until,
        backoff_attempt=current.backoff_attempt,
    )


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """Exponential backoff with full jitter: the wait before attempt ``n`` (n >= 2) is
    uniform in ``[0, min(cap, base * 2 ** (n - 2))]``.

    ``jitter`` returns a number in ``[0, 1]``; inject a constant in tests.
    """

    base_seconds: float = 1.0
    cap_seconds: float = 300.0
    jitter: Callable[[], float] = random.random

    def ceiling(self, attempt: int) -> float:
        retry = attempt - 1
        if retry < 1:
            return 0.0
        # Stop doubling once past the cap: 2 ** 10_000 would overflow a float.
        ceiling = self.base_seconds
        for _ in range(retry - 1):
            ceiling *= 2
            if ceiling >= self.cap_seconds:
                break
        return max(0.0, min(self.cap_seconds, ceiling))

    def delay(self, attempt: int) -> timedelta:
        fraction = min(1.0, max(0.0, self.jitter()))
        return timedelta(seconds=self.ceiling(attempt) * fraction)

    def until(self, attempt: int, now: datetime) -> datetime:
        return now + self.delay(attempt)


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    fail_fast: bool = True
    backoff: RetryBackoff = field(default_factory=RetryBackoff)


class PlanGraph:
    """The dependency structure of a validated plan, computed once per plan."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tasks: dict[str, TaskSpec] = {t.task_id: t for t in plan.tasks}
        self.order: tuple[str, ...] = plan.task_ids()
        self.index: dict[str, int] = {task_id: i for i, task_id in enumerate(self.order)}
        self.depends_on: dict[str, tuple[str, ...]] = {t.task_id: t.depends_on for t in plan.tasks}
        # The other way round: the tasks waiting for each task.
        self.dependents: dict[str, list[str]] = reverse_edges(self.order, self.depends_on)
        self.max_retries: dict[str, int] = {t.task_id: t.max_retries for t in plan.tasks}
        self.required_capabilities: dict[str, tuple[str, ...]] = {
            t.task_id: t.required_capabilities for t in plan.tasks
        }
        # The same as sets: what a task's workers must have (DiscoverWorkers' key).
        self.capability_set: dict[str, frozenset[str]] = {
            task_id: frozenset(caps) for task_id, caps in self.required_capabilities.items()
        }
        self.capability_sets: frozenset[frozenset[str]] = frozenset(self.capability_set.values())
        # Longest chain of dependents above each task: dispatch the critical path first.
        height = heights(self.order, self.depends_on)
        # Dispatch order: the critical path first, then plan order.
        self.ranked: tuple[str, ...] = tuple(
            sorted(self.order, key=lambda t: (-height[t], self.index[t]))
        )
        self.dispatch_rank: dict[str, int] = {task_id: i for i, task_id in enumerate(self.ranked)}

    def capability_sets_of(self, task_ids: Iterable[str]) -> set[frozenset[str]]:
        """The capability sets ``task_ids`` need (done as soon as it has every set the plan
        uses: ready lists may be long, and most plans use one or two)."""
        found: set[frozenset[str]] = set()
        for task_id in task_ids:
            found.add(self.capability_set[task_id])
            if len(found) == len(self.capability_sets):
                break
        return found

    def dependents_of(self, roots: Sequence[str]) -> set[str]:
        """Every task that directly or not depends on one of ``roots``."""
        return reachable(roots, self.dependents)


@dataclass(frozen=True, slots=True)
class SchedulingDecision:
    status: PlanStatus
    # Ticket count per status name, every status present (tasks without a ticket count as
    # PENDING).
    counts: Mapping[str, int]
    # Tasks to assign now, critical path first.
    dispatch: tuple[str, ...]
    # Tasks whose tickets must be cancelled (those without a ticket yet: just never create).
    cancel: tuple[str, ...]
    # Re-queued tasks whose backoff starts now: task id -> backoff end, to be persisted with
    # the ticket's current attempt.
    start_backoff: Mapping[str, datetime]
    # The earliest future backoff end: when to decide again if nothing else happens.
    next_wakeup: datetime | None
    # Every ticket is terminal: nothing left to drive.
    settled: bool
    error_message: str | None = None


# Tickets in these states occupy a slot of their worker.
OCCUPYING = frozenset({TicketStatus.ASSIGNED, TicketStatus.RUNNING})


class PlanProgress:
    """What is known of one plan's tickets, indexed for :meth:`decide`.

    The counts per status, the non-terminal tasks and, for every task, how many of its
    dependencies are not COMPLETED are kept up to date as states are recorded, so a
    scheduling round costs what changed and what is ready to go rather than the plan's
    size (a plan may hold 10,000 tasks, and a round runs every few ticket events). Tasks
    without a ticket state are PENDING with no ticket.
    """

    def __init__(self, graph: PlanGraph, tickets: Mapping[str, TicketState] | None = None) -> None:
        self.graph = graph
        self._states: dict[str, TicketState] = {}
        self._by_status = dict.fromkeys(TicketStatus, 0)
        # Dependencies not COMPLETED, per task (one not recorded yet counts as not).
        self._unmet = {task_id: len(set(deps)) for task_id, deps in graph.depends_on.items()}
        self._active: set[str] = set()  # non-terminal
        self._failed: set[str] = set()
        self._cancelled: set[str] = set()
        self._started = 0  # tasks whose ticket left PENDING or was re-queued
        # PENDING tasks with a ticket, by what decide() has to do with them: start or wait
        # out a retry backoff; dispatch once the dependencies are COMPLETED (``_ready``: the
        # dispatch ranks of those whose dependencies are, sorted). Those without a ticket
        # wait for the driver to create it (C2).
        self._retrying: set[str] = set()
        self._ready: list[int] = []
        # Worker id -> this plan's tickets ASSIGNED or RUNNING there.
        self.occupying: dict[str, int] = {}
        tickets = tickets or {}
        for task_id in graph.order:
            self.record(tickets.get(task_id) or TicketState(task_id=task_id))

    @property
    def states(self) -> Mapping[str, TicketState]:
        """Every task's state, by task id (read-only: change it with :meth:`record`)."""
        return self._states

    def record(self, state: TicketState) -> None:
        """Record a task's new state (``KeyError`` for a task not in the plan)."""
        task_id = state.task_id
        old = self._states.get(task_id)
        if old is None and task_id not in self._unmet:
            raise KeyError(task_id)
        if old is not None:
            self._unindex(old)
        self._states[task_id] = state
        self._index(state)
        done = state.status is TicketStatus.COMPLETED
        if done != (old is not None and old.status is TicketStatus.COMPLETED):
            self._dependency_changed(task_id, -1 if done else 1)

    def _dependency_changed(self, task_id: str, delta: int) -> None:
        for dependent in self.graph.dependents[task_id]:
            state = self._states.get(dependent)
            waiting = state is not None and _waits_for_dependencies(state)
            if waiting and not self._unmet[dependent]:
                self._unready(dependent)
            self._unmet[dependent] += delta
            if waiting and not self._unmet[dependent]:
                bisect.insort(self._ready, self.graph.dispatch_rank[dependent])

    def _unready(self, task_id: str) -> None:
        ready = self._ready
        del ready[bisect.bisect_left(ready, self.graph.dispatch_rank[task_id])]

    def _index(self, state: TicketState) -> None:
        task_id, status = state.task_id, state.status
        self._by_status[status] += 1
        if status is TicketStatus.FAILED:
            self._failed.add(task_id)
        elif status is TicketStatus.CANCELLED:
            self._cancelled.add(task_id)
        elif status is not TicketStatus.COMPLETED:
            self._active.add(task_id)
        if status is not TicketStatus.PENDING or state.attempt > 1:
            self._started += 1
        if _waits_for_dependencies(state):
            if not self._unmet[task_id]:
                bisect.insort(self._ready, self.graph.dispatch_rank[task_id])
        elif status is TicketStatus.PENDING:
            if state.ticket_id is not None:
                self._retrying.add(task_id)
        elif status in OCCUPYING and state.worker_id:
            self.occupying[state.worker_id] = self.occupying.get(state.worker_id, 0) + 1

    def _unindex(self, state: TicketState) -> None:
        task_id, status = state.task_id, state.status
        self._by_status[status] -= 1
        self._failed.discard(task_id)
        self._cancelled.discard(task_id)
        self._active.discard(task_id)
        if status is not TicketStatus.PENDING or state.attempt > 1:
            self._started -= 1
        if _waits_for_dependencies(state):
            if not self._unmet[task_id]:
                self._unready(task_id)
        elif status is TicketStatus.PENDING:
            self._retrying.discard(task_id)
        elif status in OCCUPYING and state.worker_id:
            left = self.occupying[state.worker_id] - 1
            if left:
                self.occupying[state.worker_id] = left
            else:
                del self.occupying[state.worker_id]

    def _in_plan_order(self, task_ids: set[str]) -> list[str]:
        return sorted(task_ids, key=self.graph.index.__getitem__)

    def decide(
        self, *, now: datetime, policy: SchedulingPolicy, cancel_requested: bool = False
    ) -> SchedulingDecision:
        """What to do next for the plan; see :func:`decide`."""
        graph, states, active = self.graph, self._states, self._active
        failed = self._in_plan_order(self._failed)
        cancelled = self._in_plan_order(self._cancelled)
        if cancel_requested or (failed and policy.fail_fast):
            to_cancel = active
        elif failed or cancelled:
            to_cancel = graph.dependents_of(failed + cancelled) & active
        else:
            to_cancel = set()

        ranks: list[int] = self._ready
        if to_cancel:
            ranks = [r for r in ranks if graph.ranked[r] not in to_cancel]
        start_backoff: dict[str, datetime] = {}
        wakeups: list[datetime] = []
        for task_id in self._in_plan_order(self._retrying - to_cancel):
            state = states[task_id]
            backoff_end = state.backoff_end()
            if backoff_end is None:
                backoff_end = policy.backoff.until(state.attempt, now)
                start_backoff[task_id] = backoff_end
            if self._unmet[task_id]:
                continue
            if backoff_end > now:
                wakeups.append(backoff_end)
            else:
                if ranks is self._ready:
                    ranks = list(ranks)
                bisect.insort(ranks, graph.dispatch_rank[task_id])

        # Every task terminal, or about to be cancelled (to_cancel only holds active tasks).
        if len(to_cancel) == len(active):
            if self._by_status[TicketStatus.COMPLETED] == len(graph.order):
                status = PlanStatus.COMPLETED
            elif cancel_requested:
                status = PlanStatus.CANCELLED
            elif failed:
                status = PlanStatus.FAILED
            else:
                status = PlanStatus.CANCELLED
        elif self._started:
            status = PlanStatus.RUNNING
        else:
            status = PlanStatus.PENDING

        return SchedulingDecision(
            status=status,
            counts={ticket_status.value: n for ticket_status, n in self._by_status.items()},
            dispatch=tuple(map(graph.ranked.__getitem__, ranks)),
            cancel=tuple(self._in_plan_order(to_cancel)),
            start_backoff=start_backoff,
            next_wakeup=min(wakeups, default=None),
            settled=not active,
            error_message=_error_message(states, failed, cancelled, status, cancel_requested),
        )

    def after_dispatch(self, decision: SchedulingDecision) -> SchedulingDecision:
        """``decision`` (from :meth:`decide`) once its dispatch was done, whether every,
        some or none of its tickets were assigned: a PENDING plan with a ticket that left
        PENDING is RUNNING now, as :meth:`decide` would say, without deciding again (the
        assignments are the only change; a refused one's re-read is decided next round)."""
        if decision.status is PlanStatus.PENDING and self._started:
            return replace(decision, status=PlanStatus.RUNNING)
        return decision


def _waits_for_dependencies(state: TicketState) -> bool:
    """A PENDING ticket on its first attempt with no backoff: dispatched as soon as its
    dependencies are COMPLETED. (A PENDING task without a ticket needs one first; one on a
    later attempt is checked for a retry backoff.)"""
    return (
        state.status is TicketStatus.PENDING
        and state.ticket_id is not None
        and state.attempt == 1
        and state.backoff_end() is None
    )


def decide(
    graph: PlanGraph,
    tickets: Mapping[str, TicketState],
    *,
    now: datetime,
    policy: SchedulingPolicy,
    cancel_requested: bool = False,
) -> SchedulingDecision:
    """What to do next for one plan, given every ticket's current state (keyed by task id;
    missing tasks have no ticket yet). The orchestrator keeps a :class:`PlanProgress` per
    plan and asks it instead, which costs only what is ready rather than the whole plan."""
    return PlanProgress(graph, tickets).decide(
        now=now, policy=policy, cancel_requested=cancel_requested
    )


def _error_message(
    states: Mapping[str, TicketState],
    failed: Sequence[str],
    cancelled: Sequence[str],
    status: PlanStatus,
    cancel_requested: bool,
) -> str | None:
    if status is PlanStatus.COMPLETED:
        return None
    if cancel_requested:
        return "cancelled on request" if status is PlanStatus.CANCELLED else None
    if failed:
        first = states[failed[0]]
        message = (
            f"task {first.task_id!r} failed after {first.attempt} "
            f"attempt{'s' if first.attempt != 1 else ''}"
        )
        if first.error_message:
            message += f": {first.error_message}"
        if len(failed) > 1:
            message += f" (and {len(failed) - 1} more failed tasks)"
        return message
    if cancelled and status is PlanStatus.CANCELLED:
        return f"task {cancelled[0]!r} was cancelled outside the plan"
    return None


# -- worker choice -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerCandidate:
    """One DiscoverWorkers result: best first, with the spare capacity it reported."""

    worker_id: str
    spare_capacity: int
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class FreedSlot:
    """A slot this orchestrator saw a ticket leave on a worker: the ticket was assigned
    there at ``held_since`` and left at ``freed_at`` (ticket-service times)."""

    held_since: datetime
    freed_at: datetime


def freed_at(slot: FreedSlot) -> datetime:
    return slot.freed_at


# The registry stamps a heartbeat when it stores it, some time after the worker counted its
# load: a slot freed within this much before the stamp may still be in that count.
HEARTBEAT_STAMP_SLACK = timedelta(milliseconds=250)


def freed_since_heartbeat(freed: Sequence[FreedSlot], heartbeat_at: datetime | None) -> int:
    """How many slots the worker's last heartbeat may still have counted as in flight that
    are free by now: the ticket was already assigned there at the heartbeat (a worker
    counts the assignments it accepted, started or not) and left after it. The registry
    learns of them only with the next heartbeat. "After it" allows for the heartbeat's
    stamp lagging the worker's count (``HEARTBEAT_STAMP_SLACK``): a slot freed just
    before a late stamp would otherwise wait for the next heartbeat. (An assignment still
    on its way to the worker at the heartbeat was not counted, and a slot freed within the
    slack may already be out of the count, so this may count a slot or two too many; what
    the orchestrator knows to be on the worker bounds the total, see
    ``engine.convert.worker_candidate``.)

    ``freed`` is sorted by ``freed_at``: only the slots freed after the heartbeat are read.
    """
    if heartbeat_at is None:
        return 0
    after = bisect.bisect_right(freed, heartbeat_at - HEARTBEAT_STAMP_SLACK, key=freed_at)
    return sum(1 for slot in freed[after:] if slot.held_since <= heartbeat_at)


def choose_worker(
    candidates: Sequence[WorkerCandidate], promised: Mapping[str, int]
) -> WorkerCandidate | None:
    """The best-ranked candidate that still has room once the capacity already promised in
    this scheduling round is subtracted; None if every candidate is full. The registry's
    ranking (spare capacity, health, track record) is kept as is."""
    for candidate in candidates:
        if candidate.spare_capacity - promised.get(candidate.worker_id, 0) > 0:
            return candidate
    return None


class CapacityLedger:
    """Capacity promised to assignments during one scheduling round, so that several ready
    tickets ranked against the same DiscoverWorkers snapshot do not overfill one worker."""

    def __init__(self) -> None:
        self._promised: dict[str, int] = {}

    def promised(self, worker_id: str) -> int:
        return self._promised.get(worker_id, 0)

    def choose(
        self, candidates: Sequence[WorkerCandidate], avoid: str | None = None
    ) -> WorkerCandidate | None:
        """Pick a worker and promise it one slot; another than ``avoid`` when one has room
        (``avoid`` only when it is the only one)."""
        others = [c for c in candidates if c.worker_id != avoid] if avoid else candidates
        chosen = choose_worker(others, self._promised) or choose_worker(candidates, self._promised)
        if chosen is not None:
            self._promised[chosen.worker_id] = self.promised(chosen.worker_id) + 1
        return chosen

    def release(self, worker_id: str) -> None:
        """Give a slot back (the assignment did not happen)."""
        remaining = self.promised(worker_id) - 1
        if remaining > 0:
            self._promised[worker_id] = remaining
        else:
            self._promised.pop(worker_id, None)


@dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class AssignmentRound:
    assignments: tuple[Assignment, ...]
    # Ready tasks no candidate had room for: they wait for capacity or a new worker.
    unassigned: tuple[str, ...]


def assign_round(
    graph: PlanGraph,
    ready: Sequence[str],
    candidates: Mapping[frozenset[str], Sequence[WorkerCandidate]],
    ledger: CapacityLedger,
    avoid: Mapping[str, str] | None = None,
) -> AssignmentRound:
    """Match ready tasks (in dispatch order) to workers: for each, the best-ranked candidate
    for its capability set that still has room after this round's promises; for a task in
    ``avoid`` (task id -> the worker its last attempt ended on), another worker if one has
    room. The ledger may be shared across plans so one round never overfills a worker."""
    avoid = avoid or {}
    assignments: list[Assignment] = []
    unassigned: list[str] = []
    # Capability sets whose candidates are all full: promises only grow during the round,
    # so the other tasks needing them are left waiting without looking again, and once
    # every set of the plan is full, so is the rest of the list.
    full: set[frozenset[str]] = set()
    for i, task_id in enumerate(ready):
        needed = graph.capability_set[task_id]
        chosen = (
            None
            if needed in full
            else ledger.choose(candidates.get(needed, ()), avoid.get(task_id))
        )
        if chosen is not None:
            assignments.append(Assignment(task_id, chosen.worker_id))
            continue
        unassigned.append(task_id)
        full.add(needed)
        if len(full) == len(graph.capability_sets):
            unassigned.extend(ready[i + 1 :])
            break
    return AssignmentRound(tuple(assignments), tuple(unassigned))


# -- explain -------------------------------------------------------------------------------


class WorkerHealth(StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What explain needs to know about one registered worker."""

    worker_id: str
    capabilities: frozenset[str]
    status: WorkerHealth = WorkerHealth.HEALTHY
    spare_capacity: int = 1
    last_heartbeat_at: datetime | None = None

    @property
    def takes_work(self) -> bool:
        return self.status is WorkerHealth.HEALTHY


class ReasonCode(StrEnum):
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    PLAN_CANCELLED = "PLAN_CANCELLED"
    PLAN_FAILED = "PLAN_FAILED"
    TICKET_NOT_CREATED = "TICKET_NOT_CREATED"
    WAITING_ON_DEPENDENCIES = "WAITING_ON_DEPENDENCIES"
    DEPENDENCY_FAILED = "DEPENDENCY_FAILED"
    RETRY_BACKOFF = "RETRY_BACKOFF"
    NO_CAPABLE_WORKER = "NO_CAPABLE_WORKER"
    NO_WORKER_CAPACITY = "NO_WORKER_CAPACITY"
    WORKERS_UNKNOWN = "WORKERS_UNKNOWN"
    LEASED = "LEASED"
    READY = "READY"
    ROUNDS_FAILING = "ROUNDS_FAILING"
    TICKET_SERVICE_UNREACHABLE = "TICKET_SERVICE_UNREACHABLE"
    # Of the plan, not of a task: explain's ``stale_owner`` (see owner_lease_expired).
    OWNER_LEASE_EXPIRED = "OWNER_LEASE_EXPIRED"


@dataclass(frozen=True, slots=True)
class RoundError:
    """Why a plan's scheduling rounds keep failing, and when the last one did."""

    message: str
    failed_at: datetime


@dataclass(frozen=True, slots=True)
class Reason:
    code: ReasonCode
    message: str
    details: Mapping[str, JsonValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, JsonValue]:
        return {"code": self.code.value, "message": self.message, "details": dict(self.details)}


@dataclass(frozen=True, slots=True)
class Explanation:
    task_id: str
    ticket_id: str | None
    status: TicketStatus
    attempt: int
    max_attempts: int
    worker_id: str | None
    # The first reason's message: one line for humans.
    summary: str
    reasons: tuple[Reason, ...]

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "task_id": self.task_id,
            "ticket_id": self.ticket_id,
            "status": self.status.value,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "worker_id": self.worker_id,
            "summary": self.summary,
            "reasons": [reason.to_json() for reason in self.reasons],
        }


def _no_jitter() -> float:
    return 1.0


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _shown(moment: datetime) -> str:
    """A time in a message for people, as the CLI's tables show times (UTC, to the second;
    the details carry it in full)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def explain(
    graph: PlanGraph,
    tickets: Mapping[str, TicketState],
    task_ids: Sequence[str],
    *,
    now: datetime,
    policy: SchedulingPolicy,
    workers: Sequence[WorkerView] | None,
    cancel_requested: bool = False,
    where: str = "",
    round_error: RoundError | None = None,
    tickets_unreachable: str | None = None,
) -> list[Explanation]:
    """Why each of ``task_ids``' tickets is (not) running. ``workers`` is the registry's
    view of the registered workers (None when they could not be read), ``where`` where
    they were looked for, as the messages say it (see :func:`in_namespace`);
    ``round_error``: why the plan's scheduling rounds keep failing, if they do;
    ``tickets_unreachable``: why the ticket service could not be reached last, if it
    could not (the rounds wait for it). Raises ``KeyError`` for a task that is not in the
    plan."""
    for task_id in task_ids:
        if task_id not in graph.index:
            raise KeyError(task_id)
    progress = PlanProgress(graph, tickets)
    # Explaining must not draw jitter: a backoff that has not started is shown at its ceiling.
    upper_bound = replace(policy, backoff=replace(policy.backoff, jitter=_no_jitter))
    decision = progress.decide(now=now, policy=upper_bound, cancel_requested=cancel_requested)
    context = _Explaining(
        graph=graph,
        states=progress.states,
        decision=decision,
        cancel=frozenset(decision.cancel),
        dispatch=frozenset(decision.dispatch),
        workers=workers,
        by_id={w.worker_id: w for w in workers or ()},
        now=now,
        cancel_requested=cancel_requested,
        where=where,
        round_error=round_error,
        tickets_unreachable=tickets_unreachable,
    )
    return [_explain_one(context, task_id) for task_id in task_ids]


def in_namespace(namespace: str) -> str:
    """How a message says where workers were looked for: nothing for the default
    namespace, `` in namespace 'ml'`` for another (a worker registered elsewhere is
    listed by the registry, yet never offered)."""
    return "" if namespace in ("", DEFAULT_NAMESPACE) else f" in namespace {namespace!r}"


@dataclass(frozen=True, slots=True)
class _Explaining:
    """What explaining the tasks of one plan shares."""

    graph: PlanGraph
    states: Mapping[str, TicketState]
    decision: SchedulingDecision
    cancel: frozenset[str]
    dispatch: frozenset[str]
    workers: Sequence[WorkerView] | None
    by_id: Mapping[str, WorkerView]
    now: datetime
    cancel_requested: bool
    where: str
    round_error: RoundError | None
    tickets_unreachable: str | None
    # Required capabilities -> what the workers say about them (the same for many tasks).
    worker_reasons: dict[tuple[str, ...], list[Reason]] = field(default_factory=dict)


def _explain_one(context: _Explaining, task_id: str) -> Explanation:
    graph, states = context.graph, context.states
    state = states[task_id]
    reasons: list[Reason] = []
    if state.status in (TicketStatus.ASSIGNED, TicketStatus.RUNNING):
        reasons.append(
            _lease_reason(state, context.by_id, context.workers is not None, context.now)
        )
    elif state.status.terminal:
        detail = f": {state.error_message}" if state.error_message else ""
        reasons.append(
            Reason(
                ReasonCode.FINISHED,
                f"finished as {state.status.value} after attempt {state.attempt}{detail}",
                {"status": state.status.value, "error_message": state.error_message},
            )
        )
    if task_id in context.cancel:
        reasons.insert(
            0, _cancel_reason(graph, states, task_id, context.decision, context.cancel_requested)
        )
    elif state.status is TicketStatus.PENDING:
        reasons.extend(_pending_reasons(context, state))

    if not reasons:  # pragma: no cover - every state above yields a reason; never index []
        reasons.append(Reason(ReasonCode.READY, f"{state.status.value.lower()}"))
    max_attempts = graph.max_retries[task_id] + 1 + state.lost_runs
    return Explanation(
        task_id=task_id,
        ticket_id=state.ticket_id,
        status=state.status,
        attempt=state.attempt,
        max_attempts=max_attempts,
        worker_id=state.worker_id,
        summary=reasons[0].message,
        reasons=tuple(reasons),
    )


def _cancel_reason(
    graph: PlanGraph,
    states: Mapping[str, TicketState],
    task_id: str,
    decision: SchedulingDecision,
    cancel_requested: bool,
) -> Reason:
    if cancel_requested:
        return Reason(ReasonCode.PLAN_CANCELLED, "the plan was cancelled; cancelling the ticket")
    # Failed or cancelled tasks upstream, nearest first.
    blocked_by: list[str] = []
    seen: set[str] = set()
    frontier = list(graph.depends_on[task_id])
    while frontier:
        dep = frontier.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        if states[dep].status in (TicketStatus.FAILED, TicketStatus.CANCELLED):
            blocked_by.append(dep)
        else:
            frontier.extend(graph.depends_on[dep])
    if blocked_by:
        return Reason(
            ReasonCode.DEPENDENCY_FAILED,
            "will never run: depends on "
            + ", ".join(f"{d} ({states[d].status.value})" for d in blocked_by)
            + "; cancelling the ticket",
            {"dependencies": {d: states[d].status.value for d in blocked_by}},
        )
    return Reason(
        ReasonCode.PLAN_FAILED,
        f"the plan failed ({decision.error_message}); cancelling the ticket",
    )


def _lease_reason(
    state: TicketState, by_id: Mapping[str, WorkerView], workers_known: bool, now: datetime
) -> Reason:
    worker = by_id.get(state.worker_id or "")
    details: dict[str, JsonValue] = {
        "worker_id": state.worker_id,
        "lease_expires_at": _iso(state.lease_expires_at),
        "last_heartbeat_at": _iso(worker.last_heartbeat_at if worker else None),
        "worker_status": worker.status.value if worker else None,
    }
    if worker is not None:
        seen = (
            f"last seen {_shown(worker.last_heartbeat_at)}"
            if worker.last_heartbeat_at
            else "never seen"
        )
        health = f"{worker.status.value.lower()}, {seen}"
    elif workers_known:
        health = (
            "no longer registered; the ticket is handed back when the orchestrator sees the"
            " worker gone (at once, or at its next re-read of the plan), or when its lease"
            " expires"
        )
    else:
        health = "worker status unknown"
    if state.status is TicketStatus.RUNNING:
        return Reason(
            ReasonCode.RUNNING, f"running on worker {state.worker_id} ({health})", details
        )
    lease = (
        f" until {_shown(state.lease_expires_at)}"
        + (" (expired)" if state.lease_expires_at <= now else "")
        if state.lease_expires_at
        else ""
    )
    return Reason(
        ReasonCode.LEASED,
        f"leased to worker {state.worker_id}{lease}, waiting for it to start ({health})",
        details,
    )


def _pending_reasons(context: _Explaining, state: TicketState) -> list[Reason]:
    graph, states, decision, now = context.graph, context.states, context.decision, context.now
    task_id = state.task_id
    reasons: list[Reason] = []
    if state.ticket_id is None:
        if context.round_error is not None:
            # Tickets are created by the plan's rounds (C2 first in each): while they fail,
            # creation is what fails (it said "not created yet" for ever).
            reasons.append(
                _rounds_failing(context.round_error, "its ticket has not been created: ")
            )
        elif context.tickets_unreachable is not None:
            reasons.append(
                _tickets_unreachable(
                    context.tickets_unreachable, "its ticket is created once it answers"
                )
            )
        reasons.append(Reason(ReasonCode.TICKET_NOT_CREATED, "its ticket has not been created yet"))
    waiting = [
        dep for dep in graph.depends_on[task_id] if states[dep].status is not TicketStatus.COMPLETED
    ]
    if waiting:
        reasons.append(
            Reason(
                ReasonCode.WAITING_ON_DEPENDENCIES,
                "waiting on " + ", ".join(f"{dep} ({states[dep].status.value})" for dep in waiting),
                {"dependencies": {dep: states[dep].status.value for dep in waiting}},
            )
        )
    backoff_end = state.backoff_end()
    if task_id in decision.start_backoff:
        reasons.append(
            Reason(
                ReasonCode.RETRY_BACKOFF,
                f"re-queued for attempt {state.attempt}; a retry backoff ending no later than "
                f"{_shown(decision.start_backoff[task_id])} starts in the next scheduling "
                "round"
                + (f" (previous error: {state.error_message})" if state.error_message else ""),
                {
                    "backoff_until": None,
                    "backoff_until_at_most": decision.start_backoff[task_id].isoformat(),
                    "attempt": state.attempt,
                },
            )
        )
    elif backoff_end is not None and backoff_end > now:
        reasons.append(
            Reason(
                ReasonCode.RETRY_BACKOFF,
                f"retry backoff until {_shown(backoff_end)} before attempt {state.attempt}"
                + (f" (previous error: {state.error_message})" if state.error_message else ""),
                {"backoff_until": backoff_end.isoformat(), "attempt": state.attempt},
            )
        )
    required = graph.required_capabilities[task_id]
    if required not in context.worker_reasons:
        context.worker_reasons[required] = _worker_reasons(required, context.workers, context.where)
    reasons.extend(context.worker_reasons[required])
    blocked_on_workers = any(
        r.code in (ReasonCode.NO_CAPABLE_WORKER, ReasonCode.NO_WORKER_CAPACITY) for r in reasons
    )
    if task_id in context.dispatch and not blocked_on_workers:
        reasons.insert(0, _ready_reason(context))
    return reasons


def _tickets_unreachable(detail: str, then: str) -> Reason:
    return Reason(
        ReasonCode.TICKET_SERVICE_UNREACHABLE,
        f"the ticket service cannot be reached ({detail}): the scheduling rounds wait for it;"
        f" {then}",
        {"error": detail},
    )


def _ready_reason(context: _Explaining) -> Reason:
    round_error = context.round_error
    if round_error is None and context.tickets_unreachable is not None:
        # It said "assigned in the next scheduling round" through the outage.
        return _tickets_unreachable(
            context.tickets_unreachable, "ready: it is assigned once the service answers"
        )
    if round_error is None and context.workers is None:
        # No claim about workers it cannot see (it said "assigned in the next round").
        return Reason(
            ReasonCode.READY,
            "ready as far as the plan goes; whether a worker can take it is unknown",
        )
    if round_error is None:
        return Reason(ReasonCode.READY, "ready: it is assigned in the next scheduling round")
    return _rounds_failing(round_error, "ready, but ")


def _rounds_failing(round_error: RoundError, lead: str) -> Reason:
    """ROUNDS_FAILING, its message led by what it means for the task (``ready, but ``;
    ``its ticket has not been created: ``)."""
    return Reason(
        ReasonCode.ROUNDS_FAILING,
        f"{lead}the plan's scheduling rounds fail (the last at "
        f"{_shown(round_error.failed_at)}, tried again later each time): {round_error.message}",
        {"error": round_error.message, "failed_at": round_error.failed_at.isoformat()},
    )


def owner_lease_expired(
    owner_id: str,
    lease_expires_at: datetime,
    *,
    last_changed_at: datetime,
    claim_interval_seconds: float,
) -> Reason:
    """What explain says of a plan whose owner let its lease expire (killed, or cut off
    from the database): until a replica claims the plan, what the plan shows is what that
    owner last stored, and the plan may not be driven at all."""
    return Reason(
        ReasonCode.OWNER_LEASE_EXPIRED,
        f"replica {owner_id} has not renewed its lease on this plan, which expired at"
        f" {_shown(lease_expires_at)} (it stopped, or cannot reach the database): the plan's"
        f" status, counts and tickets are shown as {owner_id} last wrote them (the plan last"
        f" changed at {_shown(last_changed_at)}) and may be behind the ticket service;"
        " a running replica takes the plan over at its next claim of unowned plans (this"
        f" one claims every {claim_interval_seconds:g} s, CLAIM_INTERVAL_SECONDS) and"
        " re-reads its tickets",
        {
            "owner_id": owner_id,
            "owner_lease_expires_at": lease_expires_at.isoformat(),
            "last_changed_at": last_changed_at.isoformat(),
            "claim_interval_seconds": claim_interval_seconds,
        },
    )


def _worker_reasons(
    required: Sequence[str], workers: Sequence[WorkerView] | None, where: str
) -> list[Reason]:
    if workers is None:
        return [
            Reason(
                ReasonCode.WORKERS_UNKNOWN,
                "worker availability unknown: the registry's workers could not be read",
            )
        ]
    live = [w for w in workers if w.takes_work]
    needed = frozenset(required)
    offered: frozenset[str] = frozenset().union(*(w.capabilities for w in live))
    missing = [c for c in required if c not in offered]
    if missing:
        return [
            Reason(
                ReasonCode.NO_CAPABLE_WORKER,
                f"no live worker{where} with capability " + ", ".join(repr(c) for c in missing),
                {"missing_capabilities": list(missing)},
            )
        ]
    capable = [w for w in live if needed <= w.capabilities]
    if not capable:
        return [
            Reason(
                ReasonCode.NO_CAPABLE_WORKER,
                f"no single live worker{where} has all of " + ", ".join(repr(c) for c in required),
                {"missing_capabilities": []},
            )
        ]
    if all(w.spare_capacity <= 0 for w in capable):
        return [
            Reason(
                ReasonCode.NO_WORKER_CAPACITY,
                f"all {len(capable)} capable live workers are at capacity",
                {"workers": [w.worker_id for w in capable]},
            )
        ]
    return []
