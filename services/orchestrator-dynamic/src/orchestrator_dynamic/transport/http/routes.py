"""The orchestrator's HTTP API: ``/api/v1/plans``.

The plan body is read and decoded here rather than by FastAPI's model binding, so that
every kind of bad input (too large, not JSON, wrong types, invalid plan) gets the one error
shape with JSON paths from ``PlanValidator``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, WithJsonSchema
from starlette.responses import JSONResponse

from hive_common.errors import FieldViolation, InvalidArgument, ResourceExhausted
from hive_common.http import IsoDateTime, query_violations
from orchestrator_dynamic.domain.json_input import decode_json
from orchestrator_dynamic.domain.plan import Priority
from orchestrator_dynamic.domain.records import PlanSummary, StoredPlan
from orchestrator_dynamic.domain.scheduler import (
    PlanStatus,
    Reason,
    ReasonCode,
    TicketState,
    TicketStatus,
)
from orchestrator_dynamic.domain.validation import IssueCode
from orchestrator_dynamic.engine.plans import PlanService
from orchestrator_dynamic.transport.auth import check_api_token

PLANS_PATH = "/api/v1/plans"


# The answers (and their schemas in the OpenAPI document). The routes build them as dicts
# (plan_json ...), which FastAPI serialises through these models: a field must be in both,
# in the same order.
class PlanSummaryOut(BaseModel):
    plan_id: str
    intent_id: str
    name: str
    priority: Priority
    status: PlanStatus
    error_message: str | None
    task_count: int
    counts: dict[str, int] = Field(description="Tickets per status, every status present")
    created_at: IsoDateTime
    updated_at: IsoDateTime
    completed_at: IsoDateTime | None = Field(description="When the status became terminal")
    settled_at: IsoDateTime | None = Field(description="When every ticket was terminal")
    cancel_requested_at: IsoDateTime | None
    owner_id: str | None = Field(
        description="The replica driving the plan (holding its lease); null when none does:"
        " not claimed yet, released at shutdown, or settled"
    )
    owner_lease_expires_at: IsoDateTime | None = Field(
        description="When its lease ends unless renewed; in the past: that replica stopped"
        " renewing it, and a replica takes the plan over at its next claim (explain's"
        " stale_owner says so)"
    )


class PlanTicketOut(BaseModel):
    task_id: str
    ticket_id: str | None = Field(description="null until the ticket is created")
    status: TicketStatus
    attempt: int
    lost_runs: int = Field(description="Attempts that ended with their worker, using no retry")
    worker_id: str | None
    error_message: str | None
    lease_expires_at: IsoDateTime | None
    backoff_until: IsoDateTime | None
    updated_at: IsoDateTime | None


class PlanOut(PlanSummaryOut):
    tickets: list[PlanTicketOut]


class PlanWarningOut(BaseModel):
    field: str
    description: str
    code: IssueCode


class SubmittedPlanOut(PlanOut):
    created: bool = Field(description="false for an identical resubmission (200)")
    tickets_created: bool = Field(description="false: the ticket service did not answer yet")
    ticket_ids: dict[str, str | None] = Field(description="Task id -> ticket id (or null)")
    warnings: list[PlanWarningOut]


class CancelledPlanOut(PlanOut):
    cancel_requested: bool = Field(description="false when the plan was already CANCELLED")


class PlanPage(BaseModel):
    plans: list[PlanSummaryOut]
    next_page_token: str = Field(description='"" on the last page')


class ReasonOut(BaseModel):
    code: ReasonCode
    message: str
    details: dict[str, Any]


class TaskExplanationOut(BaseModel):
    task_id: str
    ticket_id: str | None
    status: TicketStatus
    attempt: int
    max_attempts: int
    worker_id: str | None
    summary: str
    reasons: list[ReasonOut]


_STALE_OWNER = (
    "Set (code OWNER_LEASE_EXPIRED) when the plan's owner has not renewed its lease: the"
    " state explained is as that replica last wrote it, until another replica takes the plan"
    " over; null otherwise"
)


class PlanExplanationOut(BaseModel):
    plan_id: str
    stale_owner: ReasonOut | None = Field(description=_STALE_OWNER)
    tasks: list[TaskExplanationOut]


class _InPlan(BaseModel):
    plan_id: str
    stale_owner: ReasonOut | None = Field(description=_STALE_OWNER)


# Bases in this order put plan_id first (pydantic takes the fields of the last base first).
class ExplainedTaskOut(TaskExplanationOut, _InPlan):
    pass


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such plan"}}


class PayloadTooLarge(ResourceExhausted):
    """The request body exceeds the configured limit."""

    http_status = 413


class UnsupportedMediaType(InvalidArgument):
    """The request body is not sent as JSON (its ``Content-Type`` says otherwise)."""

    http_status = 415

    @property
    def code(self) -> str:
        return "UNSUPPORTED_MEDIA_TYPE"


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, any parameters (``charset``)."""
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def declared_charset(content_type: str) -> str | None:
    """The ``charset`` parameter of a Content-Type, lower-case and unquoted, if any."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def summary_json(summary: PlanSummary) -> dict[str, Any]:
    holder = summary.lease_holder
    return {
        "plan_id": summary.plan_id,
        "intent_id": summary.intent_id,
        "name": summary.name,
        "priority": summary.priority.value,
        "status": summary.status.value,
        "error_message": summary.error_message,
        "task_count": summary.task_count,
        "counts": dict(summary.counts),
        "created_at": _iso(summary.created_at),
        "updated_at": _iso(summary.updated_at),
        "completed_at": _iso(summary.completed_at),
        "settled_at": _iso(summary.settled_at),
        "cancel_requested_at": _iso(summary.cancel_requested_at),
        "owner_id": holder[0] if holder else None,
        "owner_lease_expires_at": _iso(holder[1]) if holder else None,
    }


def _reason_json(reason: Reason | None) -> dict[str, Any] | None:
    return reason.to_json() if reason is not None else None


def ticket_json(state: TicketState) -> dict[str, Any]:
    return {
        "task_id": state.task_id,
        "ticket_id": state.ticket_id,
        "status": state.status.value,
        "attempt": state.attempt,
        "lost_runs": state.lost_runs,
        "worker_id": state.worker_id,
        "error_message": state.error_message,
        "lease_expires_at": _iso(state.lease_expires_at),
        "backoff_until": _iso(state.backoff_end()),
        "updated_at": _iso(state.updated_at),
    }


def plan_json(stored: StoredPlan) -> dict[str, Any]:
    body = summary_json(stored.summary)
    body["tickets"] = [ticket_json(t) for t in stored.tasks]
    return body


async def read_json_body(request: Request, *, limit: int) -> object:
    """The request body decoded as JSON; 415 unless it is sent as JSON, 413 beyond
    ``limit`` bytes, 400 if not JSON."""
    content_type = request.headers.get("content-type")
    if not is_json_media_type(content_type):
        raise UnsupportedMediaType(
            "request body must be JSON: send Content-Type: application/json"
            + (f" (got {content_type!r})" if content_type else " (none was sent)"),
            details={"content_type": content_type or ""},
        )
    charset = declared_charset(content_type or "")
    if charset not in (None, "utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"request body must be UTF-8 JSON (RFC 8259), not charset={charset!r}",
            details={"content_type": content_type or ""},
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the JSON uncompressed",
            details={"content_encoding": encoding},
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} bytes",
            details={"limit_bytes": limit},
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {limit} bytes",
                details={"limit_bytes": limit},
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "request body is not UTF-8",
            violations=[FieldViolation("$", f"invalid UTF-8 at byte {exc.start}")],
        ) from exc
    if not text.strip():
        raise InvalidArgument(
            "request body is empty", violations=[FieldViolation("$", "a plan object is required")]
        )
    return await asyncio.to_thread(decode_json, text)  # up to 8 MiB: off the event loop


# A status filter value: documented with its values, accepted in any case.
_PlanStatusName = Annotated[
    str, WithJsonSchema({"type": "string", "enum": [s.value for s in PlanStatus]})
]


def _statuses(values: list[str]) -> list[PlanStatus]:
    violations = []
    statuses: list[PlanStatus] = []
    for i, value in enumerate(values):
        try:
            statuses.append(PlanStatus(value.upper()))
        except ValueError:
            violations.append(
                FieldViolation(
                    f"query.status[{i}]",
                    "must be one of " + ", ".join(s.value for s in PlanStatus),
                )
            )
    if violations:
        raise InvalidArgument("invalid status filter", violations=violations)
    return statuses


_PLAN_BODY: dict[str, Any] = {
    "required": True,
    "description": "A plan: a DAG of tasks (see the README's plan format).",
    "content": {
        "application/json": {
            "schema": {"type": "object", "required": ["tasks"]},
            "example": {
                "name": "hello: one echo task",
                "tasks": [
                    {
                        "task_id": "hello",
                        "task_type": "echo",
                        "required_capabilities": ["python"],
                        "parameters": {"message": "hello from hive"},
                    }
                ],
            },
        }
    },
}


def build_router(
    *, plans: PlanService, max_request_bytes: int, api_token: str | None = None
) -> APIRouter:
    """Routes under ``/api/v1/plans``; with ``api_token`` every route needs
    ``Authorization: Bearer <api_token>``."""

    async def authorize(request: Request) -> None:
        # Every Authorization header, not just the first: two are refused.
        check_api_token(request.headers.items(), api_token)

    router = APIRouter(prefix=PLANS_PATH, tags=["plans"], dependencies=[Depends(authorize)])

    @router.post(
        "",
        status_code=202,
        summary="Submit a plan (202 new, 200 identical resubmission, 409 different body)",
        # The body is read and checked by the plan validator (every problem with its JSON
        # path), not by a model: documented here so that /docs can send one.
        openapi_extra={"requestBody": _PLAN_BODY},
        response_model=SubmittedPlanOut,
        response_description="A new plan: stored, its tickets created (or on their way)",
        responses={
            200: {
                "model": SubmittedPlanOut,
                "description": "The same plan was submitted before: that plan, created false",
            },
            409: {"description": "A plan with this id and a different body exists"},
            413: {"description": "Body over MAX_REQUEST_BYTES"},
            415: {"description": "Content-Type is not JSON"},
        },
    )
    async def submit_plan(
        request: Request, strict: Annotated[bool, Query()] = False
    ) -> JSONResponse:
        raw = await read_json_body(request, limit=max_request_bytes)
        submission = await plans.submit(raw, strict=strict)
        body = plan_json(submission.stored)
        body["created"] = submission.created
        body["tickets_created"] = submission.tickets_created
        body["ticket_ids"] = {t.task_id: t.ticket_id for t in submission.stored.tasks}
        body["warnings"] = [w.to_json() for w in submission.warnings]
        return JSONResponse(
            body,
            status_code=202 if submission.created else 200,
            headers={"Location": f"{PLANS_PATH}/{submission.stored.plan_id}"},
        )

    @router.get(
        "",
        response_model=PlanPage,
        summary="List plans, newest first (cursor pagination)",
    )
    async def list_plans(
        page_size: Annotated[int, Query(ge=0, le=500)] = 0,
        page_token: Annotated[str | None, Query()] = None,
        status: Annotated[list[_PlanStatusName] | None, Query(description="any case")] = None,
    ) -> dict[str, Any]:
        statuses = _statuses(status or [])
        try:
            page = await plans.list_plans(
                page_size=page_size, page_token=page_token or None, statuses=statuses
            )
        except InvalidArgument as exc:
            # The repository names the token as gRPC does; here it is a query parameter.
            raise InvalidArgument(
                exc.message, violations=query_violations(exc.violations), details=exc.details
            ) from exc
        return {
            "plans": [summary_json(s) for s in page.plans],
            # "" on the last page, like the ticket service's and the registry's listings
            "next_page_token": page.next_page_token or "",
        }

    @router.get(
        "/{plan_id}",
        # Documented, not run through the model: the plan watchers poll (hive plan watch,
        # every second) would pay ~40 ms instead of ~5 for a 10,000-task plan. The tests
        # check the answers against the document.
        response_model=None,
        responses={200: {"model": PlanOut, "description": "The plan"}, **_NOT_FOUND},
        summary="Plan status, per-ticket status, counts, timestamps, driving replica",
    )
    async def get_plan(plan_id: str) -> dict[str, Any]:
        return plan_json(await plans.get(plan_id))

    @router.post(
        "/{plan_id}/cancel",
        response_model=CancelledPlanOut,
        responses={
            **_NOT_FOUND,
            412: {"description": "The plan is already COMPLETED or FAILED"},
        },
        summary="Cancel a plan and every ticket in flight",
    )
    async def cancel_plan(plan_id: str) -> dict[str, Any]:
        stored, changed = await plans.cancel(plan_id)
        body = plan_json(stored)
        body["cancel_requested"] = changed
        return body

    @router.get(
        "/{plan_id}/explain",
        response_model=PlanExplanationOut,
        responses=_NOT_FOUND,
        summary="Why each ticket that is not running is not running",
    )
    async def explain_plan(
        plan_id: str, all_tasks: Annotated[bool, Query(alias="all")] = False
    ) -> dict[str, Any]:
        explained = await plans.explain(plan_id)
        explanations = explained.tasks
        if not all_tasks:
            explanations = [
                e
                for e in explanations
                if e.status is not TicketStatus.RUNNING and not e.status.terminal
            ]
        return {
            "plan_id": plan_id,
            "stale_owner": _reason_json(explained.stale_owner),
            "tasks": [e.to_json() for e in explanations],
        }

    @router.get(
        "/{plan_id}/tasks/{task_id}/explain",
        response_model=ExplainedTaskOut,
        responses={404: {"description": "No such plan, or no such task in it"}},
        summary="Why one task's ticket is where it is",
    )
    async def explain_task(plan_id: str, task_id: str) -> dict[str, Any]:
        explained = await plans.explain(plan_id, task_id)
        (explanation,) = explained.tasks
        body: dict[str, Any] = {
            "plan_id": plan_id,
            "stale_owner": _reason_json(explained.stale_owner),
            **explanation.to_json(),
        }
        return body

    return router
