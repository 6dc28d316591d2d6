"""Read-only HTTP API: ``GET /api/v1/workers`` and ``GET /api/v1/workers/{worker_id}``.

Same rules as gRPC: listing needs the service token, one worker any valid token
(``Authorization: Bearer <jwt>``, exactly once, as gRPC requires); errors use the shared
JSON error shape, and field violations name query parameters (``query.label[0]``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, WithJsonSchema

from hive_common.auth import TokenKind, bearer_token_from_metadata
from hive_common.errors import FieldViolation
from hive_common.http import IsoDateTime
from service_registry.domain.models import Worker, WorkerStatus
from service_registry.domain.service import RegistryService
from service_registry.domain.validation import (
    Limits,
    encode_cursor,
    parse_worker_id,
    validate_list,
)
from service_registry.transport.authorization import Authorizer


class WorkerOut(BaseModel):
    """A worker as the API shows it (the model of :func:`worker_to_json`, same key order)."""

    worker_id: str
    name: str
    namespace: str
    capabilities: list[str]
    labels: dict[str, str]
    max_concurrent: int
    in_flight: int
    spare_capacity: int
    version: str
    status: WorkerStatus
    registered_at: IsoDateTime
    last_heartbeat_at: IsoDateTime
    succeeded_total: int
    failed_total: int
    success_rate: float


class WorkerPage(BaseModel):
    workers: list[WorkerOut]
    next_page_token: str = Field(description='"" on the last page')


# A status filter value: documented with its values, accepted in any case.
_StatusName = Annotated[
    str, WithJsonSchema({"type": "string", "enum": [s.value for s in WorkerStatus]})
]


def worker_to_json(worker: Worker) -> dict[str, Any]:
    return {
        "worker_id": str(worker.worker_id),
        "name": worker.name,
        "namespace": worker.namespace,
        "capabilities": list(worker.capabilities),
        "labels": dict(worker.labels),
        "max_concurrent": worker.max_concurrent,
        "in_flight": worker.in_flight,
        "spare_capacity": worker.spare_capacity,
        "version": worker.version,
        "status": worker.status.value,
        "registered_at": worker.registered_at.isoformat(),
        "last_heartbeat_at": worker.last_heartbeat_at.isoformat(),
        "succeeded_total": worker.succeeded_total,
        "failed_total": worker.failed_total,
        "success_rate": worker.success_rate,
    }


def _bearer(request: Request) -> str | None:
    # Every Authorization header, not just the first: two are refused, as over gRPC.
    return bearer_token_from_metadata(request.headers.items())


def _parse_statuses(values: list[str]) -> tuple[list[WorkerStatus], list[FieldViolation]]:
    statuses, violations = [], []
    for i, value in enumerate(values):
        try:
            statuses.append(WorkerStatus(value.upper()))
        except ValueError:
            violations.append(
                FieldViolation(f"query.status[{i}]", "must be HEALTHY, UNHEALTHY or DRAINING")
            )
    return statuses, violations


def build_router(*, service: RegistryService, authorizer: Authorizer, limits: Limits) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["workers"])
    service_only = frozenset({TokenKind.SERVICE})
    any_token = frozenset({TokenKind.SERVICE, TokenKind.WORKER, TokenKind.TICKET})

    @router.get(
        "/workers",
        response_model=WorkerPage,
        responses={403: {"description": "A worker or ticket token: listing needs a service token"}},
        summary="List workers (service token)",
    )
    async def list_workers(
        request: Request,
        namespace: str = "",
        status: Annotated[list[_StatusName] | None, Query(description="any case")] = None,
        capability: str = "",
        label: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
        # Checked with the other parameters (every problem in one answer), not by FastAPI.
        page_size: Annotated[int, Query(json_schema_extra={"minimum": 0})] = 0,
        page_token: str = "",
    ) -> dict[str, Any]:
        authorizer.authorize(_bearer(request), service_only, "listing workers")
        statuses, violations = _parse_statuses(status or [])
        query = validate_list(
            namespace=namespace,
            statuses=statuses,
            capability=capability,
            page_size=page_size,
            page_token=page_token,
            limits=limits,
            labels=label or [],
            field_prefix="query.",
            status_violations=violations,
        )
        page = await service.list_workers(query)
        return {
            "workers": [worker_to_json(w) for w in page.workers],
            "next_page_token": encode_cursor(page.next_cursor) if page.next_cursor else "",
        }

    @router.get(
        "/workers/{worker_id}",
        response_model=WorkerOut,
        responses={
            400: {"description": "The worker id is not a UUID (INVALID_ARGUMENT)"},
            404: {"description": "No such worker"},
        },
        summary="One worker (any valid token)",
    )
    async def get_worker(worker_id: str, request: Request) -> dict[str, Any]:
        authorizer.authorize(_bearer(request), any_token, "reading a worker")
        return worker_to_json(await service.get(parse_worker_id(worker_id)))

    return router
