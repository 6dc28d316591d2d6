"""OrchestratorService: the gRPC twin of the HTTP plan API.

A ``PlanSpec`` is turned into the same JSON shape the HTTP API takes and goes through the
same ``PlanValidator``, so both APIs accept exactly the same plans and report problems with
the same JSON paths (``$.tasks[2].depends_on[0]``). Errors are ``HiveError``s, mapped to
status codes with ``google.rpc.BadRequest`` details by the shared interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from hive_common.errors import ResourceExhausted
from hive_common.structs import struct_to_dict
from hive_common.timestamps import datetime_to_timestamp
from neuralhive.orchestrator.v1 import orchestrator_service_pb2 as pb
from neuralhive.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.domain.plan import Priority
from orchestrator_dynamic.domain.records import StoredPlan
from orchestrator_dynamic.domain.scheduler import PlanStatus, TicketState, TicketStatus
from orchestrator_dynamic.engine.plans import PlanService
from orchestrator_dynamic.transport.auth import check_api_token

SERVICE_NAME = "neuralhive.orchestrator.v1.OrchestratorService"

_PLAN_STATUS = {
    PlanStatus.PENDING: pb.PLAN_STATUS_PENDING,
    PlanStatus.RUNNING: pb.PLAN_STATUS_RUNNING,
    PlanStatus.COMPLETED: pb.PLAN_STATUS_COMPLETED,
    PlanStatus.FAILED: pb.PLAN_STATUS_FAILED,
    PlanStatus.CANCELLED: pb.PLAN_STATUS_CANCELLED,
}
_PRIORITY = {
    Priority.LOW: ticket_pb.PRIORITY_LOW,
    Priority.NORMAL: ticket_pb.PRIORITY_NORMAL,
    Priority.HIGH: ticket_pb.PRIORITY_HIGH,
    Priority.CRITICAL: ticket_pb.PRIORITY_CRITICAL,
}
_TICKET_STATUS = {
    TicketStatus.PENDING: ticket_pb.TICKET_STATUS_PENDING,
    TicketStatus.ASSIGNED: ticket_pb.TICKET_STATUS_ASSIGNED,
    TicketStatus.RUNNING: ticket_pb.TICKET_STATUS_RUNNING,
    TicketStatus.COMPLETED: ticket_pb.TICKET_STATUS_COMPLETED,
    TicketStatus.FAILED: ticket_pb.TICKET_STATUS_FAILED,
    TicketStatus.CANCELLED: ticket_pb.TICKET_STATUS_CANCELLED,
}


def plan_spec_json(spec: pb.PlanSpec) -> dict[str, Any]:
    """The HTTP API's JSON for a ``PlanSpec`` (proto3 defaults mean "absent")."""
    body: dict[str, Any] = {}
    for name in ("plan_id", "intent_id", "name"):
        if getattr(spec, name):
            body[name] = getattr(spec, name)
    if spec.priority in ticket_pb.Priority.values():
        if spec.priority != ticket_pb.PRIORITY_UNSPECIFIED:
            body["priority"] = ticket_pb.Priority.Name(spec.priority).removeprefix("PRIORITY_")
    else:  # a number the enum does not name: the validator refuses it with its path
        body["priority"] = str(spec.priority)
    tasks: list[dict[str, Any]] = []
    for task in spec.tasks:
        item: dict[str, Any] = {
            "task_id": task.task_id,
            "task_type": task.task_type,
            "required_capabilities": list(task.required_capabilities),
            "depends_on": list(task.depends_on),
        }
        if task.description:
            item["description"] = task.description
        if task.HasField("parameters"):
            # Whole numbers come back as integers, as the validator reads JSON parameters,
            # so both APIs hash the same plan the same.
            item["parameters"] = struct_to_dict(task.parameters)
        if task.timeout_seconds:
            item["timeout_seconds"] = task.timeout_seconds
        if task.max_retries:
            item["max_retries"] = task.max_retries
        tasks.append(item)
    body["tasks"] = tasks
    return body


def _set_time(target: Any, moment: datetime | None) -> None:
    if moment is not None:
        target.CopyFrom(datetime_to_timestamp(moment))


def plan_ticket_message(state: TicketState) -> pb.PlanTicket:
    """One entry of the HTTP plan's ``tickets`` (``ticket_json``): null strings are "",
    null times unset."""
    message = pb.PlanTicket(
        task_id=state.task_id,
        ticket_id=state.ticket_id or "",
        status=_TICKET_STATUS[state.status],
        worker_id=state.worker_id or "",
        attempt=state.attempt,
        lost_runs=state.lost_runs,
        error_message=state.error_message or "",
    )
    _set_time(message.lease_expires_at, state.lease_expires_at)
    # Only the backoff of the current PENDING attempt, as over HTTP.
    _set_time(message.backoff_until, state.backoff_end())
    _set_time(message.updated_at, state.updated_at)
    return message


def plan_message(stored: StoredPlan) -> pb.Plan:
    """The HTTP API's plan (``plan_json``) as a message: null strings are "", null times
    unset."""
    summary = stored.summary
    message = pb.Plan(
        plan_id=summary.plan_id,
        intent_id=summary.intent_id,
        name=summary.name,
        priority=_PRIORITY[summary.priority],
        status=_PLAN_STATUS[summary.status],
        task_count=summary.task_count,
        counts=dict(summary.counts),
        error_message=summary.error_message or "",
        tickets=[plan_ticket_message(t) for t in stored.tasks],
    )
    _set_time(message.created_at, summary.created_at)
    _set_time(message.updated_at, summary.updated_at)
    _set_time(message.completed_at, summary.completed_at)
    _set_time(message.settled_at, summary.settled_at)
    _set_time(message.cancel_requested_at, summary.cancel_requested_at)
    if (holder := summary.lease_holder) is not None:
        message.owner_id = holder[0]
        _set_time(message.owner_lease_expires_at, holder[1])
    return message


class _PlanFeed:
    """One plan's changes, read once for every WatchPlan stream watching it."""

    def __init__(self, changes: AsyncIterator[pb.Plan]) -> None:
        self.plan: pb.Plan | None = None
        self.version = 0
        self.error: Exception | None = None
        self.ended = False
        self.watchers = 0
        self._updated = asyncio.Event()
        self.task = asyncio.create_task(self._follow(changes), name="hive-watch-plan")

    async def _follow(self, changes: AsyncIterator[pb.Plan]) -> None:
        try:
            async for plan in changes:
                self.plan, self.version = plan, self.version + 1
                self._wake()
        except Exception as exc:  # e.g. NotFound, Unavailable: every watcher gets it
            self.error = exc
        finally:
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        self._updated.set()
        self._updated = asyncio.Event()

    async def updates(self) -> AsyncIterator[pb.Plan]:
        """The latest plan, then every later one, until the feed ends (its error raised)."""
        seen = 0
        while True:
            if self.version > seen and self.plan is not None:
                seen = self.version
                yield self.plan
            elif self.ended:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._updated.wait()


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(
        self,
        *,
        plans: PlanService,
        api_token: str | None = None,
        watch_interval_seconds: float = 0.5,
        max_watch_streams: int = 256,
    ) -> None:
        self._plans = plans
        self._api_token = api_token
        self._watch_interval = watch_interval_seconds
        self._max_watches = max_watch_streams
        self._watches = 0
        self._feeds: dict[str, _PlanFeed] = {}
        self._draining = asyncio.Event()

    async def end_watches(self) -> None:
        """End every WatchPlan stream at its next idle moment: a stop would otherwise wait
        for streams of unsettled plans until its grace period ends (watchers start again
        at a replica still running, or this one once it is back)."""
        self._draining.set()

    def _authorize(self, context: Any) -> None:
        check_api_token(context.invocation_metadata(), self._api_token, header="authorization")

    async def SubmitPlan(
        self, request: pb.SubmitPlanRequest, context: Any
    ) -> pb.SubmitPlanResponse:
        self._authorize(context)
        submission = await self._plans.submit(plan_spec_json(request.plan), strict=request.strict)
        return pb.SubmitPlanResponse(
            plan=plan_message(submission.stored),
            created=submission.created,
            # The HTTP warning's code, field and description in one string.
            warnings=[f"{w.code.value}: {w}" for w in submission.warnings],
            tickets_created=submission.tickets_created,
            ticket_ids={t.task_id: t.ticket_id or "" for t in submission.stored.tasks},
        )

    async def GetPlan(self, request: pb.GetPlanRequest, context: Any) -> pb.GetPlanResponse:
        self._authorize(context)
        return pb.GetPlanResponse(plan=plan_message(await self._plans.get(request.plan_id)))

    async def CancelPlan(
        self, request: pb.CancelPlanRequest, context: Any
    ) -> pb.CancelPlanResponse:
        self._authorize(context)
        stored, changed = await self._plans.cancel(request.plan_id)
        return pb.CancelPlanResponse(plan=plan_message(stored), cancel_requested=changed)

    async def WatchPlan(
        self, request: pb.WatchPlanRequest, context: Any
    ) -> AsyncIterator[pb.WatchPlanResponse]:
        """The plan now and after every change, until every ticket is terminal (or the
        server stops: the stream then ends with OK).

        The streams of one plan share one poll (:class:`_PlanFeed`): it reads the plan's
        row, and the whole plan (every task) only when the row says it changed (every
        write of the plan's tasks touches it). Each stream read the whole plan twice a
        second: 20 streams on a 3,000-task plan held up the orchestrator. At most
        ``max_watch_streams`` streams at once (RESOURCE_EXHAUSTED beyond)."""
        self._authorize(context)
        if self._watches >= self._max_watches:
            raise ResourceExhausted(
                f"this orchestrator serves {self._max_watches} WatchPlan streams already "
                "(WATCH_PLAN_MAX_STREAMS); try again later, or poll GetPlan"
            )
        plan_id = request.plan_id
        feed = self._feeds.get(plan_id)
        if feed is None or feed.ended:
            feed = self._feeds[plan_id] = _PlanFeed(self._changes(plan_id))
        feed.watchers += 1
        self._watches += 1
        try:
            async for plan in feed.updates():
                yield pb.WatchPlanResponse(plan=plan)
        finally:
            self._watches -= 1
            feed.watchers -= 1
            if feed.watchers == 0:
                feed.task.cancel()
                if self._feeds.get(plan_id) is feed:
                    del self._feeds[plan_id]

    async def _changes(self, plan_id: str) -> AsyncIterator[pb.Plan]:
        seen: tuple[object, ...] | None = None
        last: tuple[object, ...] | None = None
        while True:
            summary = await self._plans.get_summary(plan_id)
            row = (summary.updated_at, summary.status, summary.settled_at)
            if row != seen:
                seen = row
                stored = await self._plans.get(plan_id)
                summary = stored.summary
                key = (summary.updated_at, summary.status, summary.settled_at, stored.tasks)
                if key != last:
                    last = key
                    yield plan_message(stored)
            if summary.settled:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), self._watch_interval)
            if self._draining.is_set():
                return
