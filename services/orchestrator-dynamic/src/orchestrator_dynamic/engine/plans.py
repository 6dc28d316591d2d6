"""Use cases behind the plan API: submit (C1 + C2), read, list, cancel, explain."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from hive_common.clients import RegistryClient
from hive_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HiveError,
    NotFound,
    Unavailable,
    describe_error,
)
from hive_common.logging import get_logger
from hive_common.text import shown
from neuralhive.registry.v1 import registry_service_pb2 as registry_pb
from orchestrator_dynamic.domain.clock import Clock, utc_now
from orchestrator_dynamic.domain.plan import Plan, plan_body_hash
from orchestrator_dynamic.domain.records import PlanPage, PlanSummary, StoredPlan
from orchestrator_dynamic.domain.scheduler import (
    Explanation,
    PlanGraph,
    PlanStatus,
    Reason,
    SchedulingPolicy,
    WorkerView,
    explain,
    in_namespace,
    owner_lease_expired,
)
from orchestrator_dynamic.domain.validation import (
    InvalidPlan,
    IssueCode,
    PlanValidator,
    Severity,
    ValidationIssue,
    is_valid_id,
)
from orchestrator_dynamic.engine.convert import worker_view
from orchestrator_dynamic.engine.driver import PlanDriver
from orchestrator_dynamic.engine.health import REGISTRY, TICKET_SERVICE, DependencyHealth
from orchestrator_dynamic.engine.metrics import OrchestratorMetrics
from orchestrator_dynamic.storage.plans import PlanRepository

_log = get_logger("orchestrator_dynamic.plans")
_LIVE = (registry_pb.WORKER_STATUS_HEALTHY,)
# Explain (and feasibility for plans with many capability sets) read the registered
# workers, in pages of 500, if there are at most this many.
_MAX_WORKERS_READ = 5000
_WORKERS_PAGE = 500
# Feasibility asks DiscoverWorkers about each distinct capability set a plan requires, up
# to this many sets.
_MAX_DISCOVERED_SETS = 32


@dataclass(frozen=True, slots=True)
class Submission:
    stored: StoredPlan
    created: bool
    warnings: tuple[ValidationIssue, ...]
    # False when the tickets could not be created yet (the driver keeps trying).
    tickets_created: bool


@dataclass(frozen=True, slots=True)
class PlanExplanation:
    # Set when the plan's owner let its lease expire: what is shown is as it left it.
    stale_owner: Reason | None
    tasks: list[Explanation]


class PlanService:
    """The orchestrator's plan operations, shared by the HTTP (and gRPC) transports."""

    def __init__(
        self,
        *,
        repository: PlanRepository,
        validator: PlanValidator,
        driver: PlanDriver,
        registry: RegistryClient,
        policy: SchedulingPolicy,
        health: DependencyHealth,
        metrics: OrchestratorMetrics,
        namespace: str = "",
        submit_wait_seconds: float = 10.0,
        registry_deadline_seconds: float = 5.0,
        clock: Clock = utc_now,
    ) -> None:
        self._repo = repository
        self._validator = validator
        self._driver = driver
        self._registry = registry
        self._policy = policy
        self._health = health
        self._metrics = metrics
        self._namespace = namespace
        self._submit_wait = submit_wait_seconds
        # Feasibility and explain are advisory: a slow registry must not stall them long.
        self._registry_deadline = registry_deadline_seconds
        self._clock = clock

    async def submit(self, raw: object, *, strict: bool = False) -> Submission:
        """Validate (C1), store, create the tickets (C2). Raises ``InvalidArgument`` with
        every problem, ``AlreadyExists`` for a known plan id with a different body."""
        # In a thread, as the hash below: a plan of 5,000 tasks with a million
        # dependencies takes a second of CPU, which held every request and plan round.
        result = await asyncio.to_thread(self._validator.validate, raw, strict=strict)
        if isinstance(result, InvalidPlan):
            raise result.to_error()
        feasibility_warning = None
        # A plan already stored under this id is returned (same body) or refused (another
        # body, 409) as it is: whether workers can run it now is not a question any more
        # (a strict resubmission was a 400 for a plan that existed and ran).
        if not await self._exists(result.plan.plan_id):
            capabilities, feasibility_warning = await self._capabilities_for(result.plan)
            if capabilities is not None:
                result = self._validator.check_feasibility(
                    result, capabilities, strict=strict, where=in_namespace(self._namespace)
                )
                if isinstance(result, InvalidPlan):
                    raise result.to_error()
        plan = result.plan
        if plan.plan_id is None:
            plan = plan.with_plan_id(str(uuid.uuid4()))
        warnings = result.warnings + ((feasibility_warning,) if feasibility_warning else ())
        body_hash = await asyncio.to_thread(plan_body_hash, result.plan)
        stored, created = await self._repo.create(plan, body_hash=body_hash)
        tickets_created = all(t.ticket_id is not None for t in stored.tasks)
        if not stored.summary.settled and not tickets_created:
            try:
                await self._driver.adopt(stored.plan_id, wait_seconds=self._submit_wait)
            except HiveError as exc:
                # Stored: the claim loop picks the plan up when the database answers again.
                _log.warning(
                    "adopting a new plan failed", plan_id=stored.plan_id, error=describe_error(exc)
                )
            stored = await self._repo.get(stored.plan_id)
            tickets_created = all(t.ticket_id is not None for t in stored.tasks)
        self._metrics.submissions.labels("created" if created else "existing").inc()
        _log.info(
            "plan submitted" if created else "plan resubmitted",
            plan_id=stored.plan_id,
            tasks=len(stored.tasks),
            tickets_created=tickets_created,
        )
        return Submission(stored, created, warnings, tickets_created)

    async def _exists(self, plan_id: str | None) -> bool:
        if plan_id is None:
            return False
        try:
            await self._repo.get_summary(plan_id)
        except NotFound:
            return False
        return True

    async def _capabilities_for(
        self, plan: Plan
    ) -> tuple[list[frozenset[str]] | None, ValidationIssue | None]:
        """Capability sets of live workers, enough for the plan's feasibility check (see
        ``PlanValidator.check_feasibility``), or None (and a warning) when that cannot be
        told: the plan is accepted and waits for workers anyway.

        One DiscoverWorkers per distinct set the plan requires (and, for a set no worker
        covers, per capability of it): a few indexed queries whatever the number of
        workers. A plan requiring more than ``_MAX_DISCOVERED_SETS`` distinct sets reads
        the live workers instead (and says it could not tell past ``_MAX_WORKERS_READ``)."""
        needed = {frozenset(t.required_capabilities) for t in plan.tasks}
        needed.discard(frozenset())
        try:
            if len(needed) <= _MAX_DISCOVERED_SETS:
                return await self._witnesses(needed), None
            workers = await self._workers(statuses=_LIVE)
            if workers is not None:
                return [frozenset(w.capabilities) for w in workers], None
            reason = (
                f"the plan requires more than {_MAX_DISCOVERED_SETS} distinct capability sets"
                f" and more than {_MAX_WORKERS_READ} workers are live"
            )
        except HiveError as exc:
            if isinstance(exc, Unavailable | DeadlineExceeded):
                self._health.failed(REGISTRY, str(exc))
            else:
                _log.error(
                    "asking the registry about capabilities failed", error=describe_error(exc)
                )
            reason = "the registry could not be asked"
        return None, ValidationIssue(
            "$.tasks",
            f"capability feasibility not checked: {reason}",
            IssueCode.FEASIBILITY_UNCHECKED,
            Severity.WARNING,
        )

    async def _witnesses(self, needed: Collection[frozenset[str]]) -> list[frozenset[str]]:
        """For each set, the capabilities of one live worker that has them all; for a set
        no live worker covers, of one live worker per capability of it someone has."""
        found: dict[frozenset[str], frozenset[str] | None] = {}

        async def witness(capabilities: frozenset[str]) -> frozenset[str] | None:
            if capabilities not in found:
                ranked = await self._registry.discover_workers(
                    required_capabilities=sorted(capabilities),
                    namespace=self._namespace,
                    max_results=1,
                    include_full=True,
                    deadline=self._registry_deadline,
                )
                self._health.succeeded(REGISTRY)
                found[capabilities] = frozenset(ranked[0].worker.capabilities) if ranked else None
            return found[capabilities]

        for capabilities in needed:
            if await witness(capabilities) is None and len(capabilities) > 1:
                for capability in capabilities:
                    await witness(frozenset({capability}))
        return [caps for caps in found.values() if caps is not None]

    async def _workers(
        self, *, statuses: Collection[registry_pb.WorkerStatus.ValueType] = ()
    ) -> list[registry_pb.Worker] | None:
        """The registered workers (with these statuses); None when there are more than
        ``_MAX_WORKERS_READ``: a partial list would make absent workers look gone."""
        workers: list[registry_pb.Worker] = []
        page_token = ""
        while True:
            page = await self._registry.list_workers(
                namespace=self._namespace or "default",
                statuses=statuses,
                page_size=_WORKERS_PAGE,
                page_token=page_token,
                deadline=self._registry_deadline,
            )
            self._health.succeeded(REGISTRY)
            workers.extend(page.workers)
            page_token = page.next_page_token
            if not page_token:
                return workers
            if len(workers) >= _MAX_WORKERS_READ:
                return None

    def _lookup(self, plan_id: str) -> str:
        """``plan_id`` if it could be a plan's id; ``NotFound`` otherwise, without asking
        the database (which cannot even compare some strings, e.g. with NUL), echoing at
        most the start of it (a 5,000-character id made the gRPC error's trailer too large
        for the client: RESOURCE_EXHAUSTED instead of NOT_FOUND)."""
        if len(plan_id) > self._validator.limits.max_id_length or not is_valid_id(plan_id):
            raise NotFound(
                f"plan {shown(plan_id)!r} not found", details={"plan_id": shown(plan_id)}
            )
        return plan_id

    async def get(self, plan_id: str) -> StoredPlan:
        return await self._repo.get(self._lookup(plan_id))

    async def get_summary(self, plan_id: str) -> PlanSummary:
        """The plan's row alone (no tasks): cheap."""
        return await self._repo.get_summary(self._lookup(plan_id))

    async def list_plans(
        self, *, page_size: int, page_token: str | None, statuses: Collection[PlanStatus]
    ) -> PlanPage:
        return await self._repo.list_plans(
            page_size=page_size, page_token=page_token, statuses=statuses
        )

    async def cancel(self, plan_id: str) -> tuple[StoredPlan, bool]:
        """Mark the plan CANCELLED; its owner cancels every ticket still in flight. Returns
        the plan and whether this call requested the cancel (a CANCELLED plan again: no);
        ``FailedPrecondition`` for a COMPLETED or FAILED plan."""
        summary, changed = await self._repo.request_cancel(self._lookup(plan_id))
        if not changed and summary.status is not PlanStatus.CANCELLED:
            raise FailedPrecondition(
                f"plan {plan_id!r} is already {summary.status.value}",
                details={"plan_id": plan_id, "status": summary.status.value},
            )
        if changed:
            self._driver.kick(plan_id, cancel_requested=True)
            _log.info("plan cancel requested", plan_id=plan_id)
        return await self._repo.get(plan_id), changed

    async def explain(self, plan_id: str, task_id: str | None = None) -> PlanExplanation:
        """Why the task's ticket (or every not-running ticket) is where it is, and whether
        the plan's owner let its lease expire (the state explained is then as it left it)."""
        stored = await self._repo.get(self._lookup(plan_id))
        graph = PlanGraph(stored.plan)
        if task_id is not None and task_id not in graph.index:
            raise NotFound(
                f"plan {plan_id!r} has no task {shown(task_id)!r}",
                details={"plan_id": plan_id, "task_id": shown(task_id)},
            )
        views: list[WorkerView] | None = None
        try:
            workers = await self._workers()
        except HiveError as exc:
            if isinstance(exc, Unavailable | DeadlineExceeded):
                self._health.failed(REGISTRY, str(exc))
        else:
            views = [worker_view(w) for w in workers] if workers is not None else None
        now = self._clock()
        tasks = explain(
            graph,
            stored.ticket_states(),
            [task_id] if task_id is not None else graph.order,
            now=now,
            policy=self._policy,
            workers=views,
            cancel_requested=stored.summary.cancel_requested_at is not None,
            where=in_namespace(self._namespace),
            round_error=await self._repo.round_error(stored.summary.plan_id),
            tickets_unreachable=self._health.failure(TICKET_SERVICE),
        )
        stale_owner = None
        holder = stored.summary.lease_holder
        if holder is not None:
            owner_id, lease_expires_at = holder
            # The claims' own test (owner_lease_expires_at <= now): claimable from now on.
            if lease_expires_at <= now:
                stale_owner = owner_lease_expired(
                    owner_id,
                    lease_expires_at,
                    last_changed_at=stored.summary.updated_at,
                    claim_interval_seconds=self._driver.claim_interval,
                )
        return PlanExplanation(stale_owner, tasks)
