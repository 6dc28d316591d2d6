"""Read-only HTTP API: ``GET /api/v1/workers`` and ``GET /api/v1/workers/{worker_id}``.

Same rules as gRPC: listing needs the service token, one worker any valid token
(``Authorization: Bearer <jwt>``); errors use the shared JSON error shape.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from hive_common.auth import TokenKind
from hive_common.errors import FieldViolation, InvalidArgument, Unauthenticated
from service_registry.domain.models import Worker, WorkerStatus
from service_registry.domain.service import RegistryService
from service_registry.domain.validation import (
    Limits,
    encode_cursor,
    parse_worker_id,
    validate_list,
)
from service_registry.transport.authorization import Authorizer


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


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise Unauthenticated(
            "Authorization header must be 'Bearer <token>'",
            details={"reason": "malformed_header"},
        )
    return parts[1]


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


def _parse_labels(values: list[str]) -> tuple[dict[str, str], list[FieldViolation]]:
    labels, violations = {}, []
    for i, value in enumerate(values):
        key, sep, label_value = value.partition("=")
        if not sep:
            violations.append(FieldViolation(f"query.label[{i}]", "must be key=value"))
        else:
            labels[key] = label_value
    return labels, violations


def build_router(*, service: RegistryService, authorizer: Authorizer, limits: Limits) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["workers"])
    service_only = frozenset({TokenKind.SERVICE})
    any_token = frozenset({TokenKind.SERVICE, TokenKind.WORKER, TokenKind.TICKET})

    @router.get("/workers", summary="List workers (service token)")
    async def list_workers(
        authorization: Annotated[str | None, Header()] = None,
        namespace: str = "",
        status: Annotated[list[str] | None, Query()] = None,
        capability: str = "",
        label: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> dict[str, Any]:
        authorizer.authorize(_bearer(authorization), service_only, "listing workers")
        statuses, status_violations = _parse_statuses(status or [])
        labels, label_violations = _parse_labels(label or [])
        if status_violations or label_violations:
            raise InvalidArgument(
                "invalid list request", violations=status_violations + label_violations
            )
        query = validate_list(
            namespace=namespace,
            statuses=statuses,
            capability=capability,
            page_size=page_size,
            page_token=page_token,
            limits=limits,
            label_selector=labels,
        )
        page = await service.list_workers(query)
        return {
            "workers": [worker_to_json(w) for w in page.workers],
            "next_page_token": encode_cursor(page.next_cursor) if page.next_cursor else "",
        }

    @router.get("/workers/{worker_id}", summary="One worker (any valid token)")
    async def get_worker(
        worker_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        authorizer.authorize(_bearer(authorization), any_token, "reading a worker")
        return worker_to_json(await service.get(parse_worker_id(worker_id)))

    return router
