"""Read-only HTTP API over tickets and their audit history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, WithJsonSchema

from execution_ticket_service.domain.models import (
    EventType,
    Priority,
    Ticket,
    TicketStatus,
    ticket_document,
)
from execution_ticket_service.domain.paging import (
    decode_page_token,
    encode_page_token,
    fill_page,
)
from execution_ticket_service.domain.stores import AuditTrail, TicketStore
from execution_ticket_service.domain.validation import (
    Limits,
    Violations,
    resolve_page_size,
    validate_filter,
    validate_ticket_id,
)
from hive_common.auth import TokenClaims, TokenVerifier, bearer_token_from_metadata
from hive_common.errors import InvalidArgument, Unauthenticated
from hive_common.http import query_violations

MAX_EVENTS = 1000
# A status filter value: documented with its values, accepted in any case.
_StatusName = Annotated[
    str, WithJsonSchema({"type": "string", "enum": [s.value for s in TicketStatus]})
]
# An audit document's type and statuses: documented with their values, read as stored.
_AuditedType = Annotated[
    str,
    WithJsonSchema(
        {"type": "string", "enum": [t.value for t in EventType if t is not EventType.SNAPSHOT]}
    ),
]
_BY_ID: dict[int | str, dict[str, Any]] = {
    400: {"description": "The ticket id is not a UUID (INVALID_ARGUMENT)"},
    404: {"description": "No such ticket"},
}


class TicketOut(BaseModel):
    ticket_id: str
    plan_id: str
    intent_id: str
    task_id: str
    task_type: str
    description: str
    parameters: dict[str, Any]
    required_capabilities: list[str]
    depends_on: list[str]
    priority: Priority
    status: TicketStatus
    attempt: int
    lost_runs: int
    max_retries: int
    timeout_seconds: int
    worker_id: str
    lease_expires_at: datetime | None
    error_message: str
    result: dict[str, Any] | None
    version: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class TicketPage(BaseModel):
    tickets: list[TicketOut]
    next_page_token: str


class AuditEventOut(BaseModel):
    event_id: str
    sequence: int
    type: _AuditedType
    ticket_id: str
    plan_id: str
    worker_id: str
    attempt: int
    previous_status: _StatusName | None
    status: _StatusName
    actor: str
    occurred_at: datetime
    # When the relay sent the event to MongoDB (absent on documents of earlier versions).
    relayed_at: datetime | None = None
    late_result: bool
    details: dict[str, Any]


class AuditHistory(BaseModel):
    ticket_id: str
    events: list[AuditEventOut]
    truncated: bool = Field(
        description="More events follow the ones listed (oldest first): ask with a larger"
        " limit (at most 1000)"
    )


def _ticket_out(ticket: Ticket) -> TicketOut:
    return TicketOut(**ticket_document(ticket))


def build_router(
    *,
    repository: TicketStore,
    audit: AuditTrail,
    limits: Limits,
    verifier: TokenVerifier | None,
) -> APIRouter:
    """``verifier=None`` serves the API without authentication (local development)."""

    async def authenticated(request: Request) -> TokenClaims | None:
        if verifier is None:
            return None
        # Every Authorization header, not just the first: two are refused, as over gRPC.
        token = bearer_token_from_metadata(request.headers.items())
        if token is None:
            raise Unauthenticated(
                "missing 'Authorization: Bearer <token>' header", details={"reason": "missing"}
            )
        return verifier.verify(token)

    router = APIRouter(prefix="/api/v1/tickets", tags=["tickets"])
    auth = [Depends(authenticated)]

    @router.get("", response_model=TicketPage, dependencies=auth, summary="List tickets")
    async def list_tickets(
        plan_id: str = "",
        worker_id: str = "",
        status: Annotated[
            list[_StatusName] | None, Query(description="any of these statuses, any case")
        ] = None,
        # Checked with the other parameters (every problem in one answer), not by FastAPI.
        page_size: Annotated[int, Query(json_schema_extra={"minimum": 0})] = 0,
        page_token: str = "",
    ) -> TicketPage:
        errors = Violations()
        ticket_filter = validate_filter(
            plan_id=plan_id,
            statuses=status or [],
            worker_id=worker_id,
            errors=errors,
            statuses_path="status",
        )
        limit = resolve_page_size(page_size, limits, errors)
        after = decode_page_token(page_token, ticket_filter, errors)
        if errors.items:
            raise InvalidArgument("invalid list request", violations=query_violations(errors.items))
        rows, more = await repository.list_page(ticket_filter, after_seq=after, limit=limit)
        # Bounded by size as over gRPC (here, each ticket's JSON).
        tickets, next_after = fill_page(
            rows, more=more, convert=_ticket_out, size=lambda t: len(t.model_dump_json().encode())
        )
        return TicketPage(
            tickets=tickets,
            next_page_token=(
                encode_page_token(next_after, ticket_filter) if next_after is not None else ""
            ),
        )

    @router.get(
        "/{ticket_id}",
        response_model=TicketOut,
        responses=_BY_ID,
        dependencies=auth,
        summary="A ticket",
    )
    async def get_ticket(ticket_id: str) -> TicketOut:
        return _ticket_out(await repository.get(validate_ticket_id(ticket_id)))

    @router.get(
        "/{ticket_id}/events",
        response_model=AuditHistory,
        responses=_BY_ID,
        dependencies=auth,
        summary="Audit history of a ticket (from MongoDB; 503 while it is unavailable)",
    )
    async def ticket_events(
        ticket_id: str, limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = MAX_EVENTS
    ) -> AuditHistory:
        ticket = await repository.get(validate_ticket_id(ticket_id))
        documents = await audit.history(ticket.ticket_id, limit=limit + 1)
        return AuditHistory(
            ticket_id=ticket.ticket_id,
            events=[AuditEventOut(**doc) for doc in documents[:limit]],
            truncated=len(documents) > limit,
        )

    return router
