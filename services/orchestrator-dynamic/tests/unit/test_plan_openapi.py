"""The plan API's OpenAPI document: every status a route answers, with the error body,
and response schemas naming the fields the routes return (the answers themselves are
checked against the document in tests/service/test_http_api.py)."""

from __future__ import annotations

from typing import Any, cast

from hive_common.http import create_http_app
from hive_testsupport.openapi import assert_errors_have_the_error_body, operations, resolve
from orchestrator_dynamic.domain.scheduler import PlanStatus, TicketStatus
from orchestrator_dynamic.engine.plans import PlanService
from orchestrator_dynamic.transport.http.routes import build_router

PLAN_FIELDS = [
    "plan_id",
    "intent_id",
    "name",
    "priority",
    "status",
    "error_message",
    "task_count",
    "counts",
    "created_at",
    "updated_at",
    "completed_at",
    "settled_at",
    "cancel_requested_at",
    "owner_id",
    "owner_lease_expires_at",
]
TICKET_FIELDS = [
    "task_id",
    "ticket_id",
    "status",
    "attempt",
    "lost_runs",
    "worker_id",
    "error_message",
    "lease_expires_at",
    "backoff_until",
    "updated_at",
]
STATUSES = {
    ("post", "/api/v1/plans"): {"200", "202", "400", "409", "413", "415", "503"},
    ("get", "/api/v1/plans"): {"200", "400", "503"},
    # An id that names no plan (malformed included) is 404: no 400.
    ("get", "/api/v1/plans/{plan_id}"): {"200", "404", "503"},
    ("post", "/api/v1/plans/{plan_id}/cancel"): {"200", "404", "412", "503"},
    ("get", "/api/v1/plans/{plan_id}/explain"): {"200", "400", "404", "503"},
    ("get", "/api/v1/plans/{plan_id}/tasks/{task_id}/explain"): {"200", "404", "503"},
}


def openapi_document() -> dict[str, Any]:
    app = create_http_app(title="orchestrator-dynamic", version="1")
    app.include_router(build_router(plans=cast(PlanService, None), max_request_bytes=1024))
    return app.openapi()


def body_schema(document: dict[str, Any], method: str, path: str, status: str) -> dict[str, Any]:
    answer = document["paths"][path][method]["responses"][status]
    return resolve(document, answer["content"]["application/json"]["schema"])


def test_every_route_documents_the_statuses_it_answers_with_the_error_body() -> None:
    # The by-id routes did not say 404, cancel not 412, submit not 200 (an identical
    # resubmission); GET /plans/{id} said a 400 it never answers.
    document = openapi_document()
    found = operations(document)
    assert {key: set(op["responses"]) for key, op in found.items()} == STATUSES
    for (method, path), operation in found.items():
        if "{plan_id}" in path:
            assert "404" in operation["responses"], (method, path)
    assert_errors_have_the_error_body(found)


def test_every_answer_has_a_schema_with_the_fields_the_route_returns() -> None:
    # Every answer was {"type": "object", "additionalProperties": true} ({} for the 202).
    document = openapi_document()
    for (method, path), operation in operations(document).items():
        for status in operation["responses"]:
            if status[0] == "2":
                schema = body_schema(document, method, path, status)
                assert schema["type"] == "object", (method, path)
                assert schema["properties"], (method, path)
                # Always there, null where nothing is known (not left out).
                assert schema["required"] == list(schema["properties"]), (method, path)

    plan = body_schema(document, "get", "/api/v1/plans/{plan_id}", "200")
    assert list(plan["properties"]) == [*PLAN_FIELDS, "tickets"]
    assert resolve(document, plan["properties"]["status"])["enum"] == list(PlanStatus)
    assert resolve(document, plan["properties"]["priority"])["enum"] == [
        "LOW",
        "NORMAL",
        "HIGH",
        "CRITICAL",
    ]
    assert plan["properties"]["created_at"] == {
        "type": "string",
        "format": "date-time",
        "title": "Created At",
    }
    assert {"type": "null"} in plan["properties"]["settled_at"]["anyOf"]
    # The driving replica: null when no replica holds the plan's lease.
    assert {"type": "null"} in plan["properties"]["owner_id"]["anyOf"]
    assert {"type": "string", "format": "date-time"} in plan["properties"][
        "owner_lease_expires_at"
    ]["anyOf"]
    ticket = resolve(document, plan["properties"]["tickets"]["items"])
    assert list(ticket["properties"]) == TICKET_FIELDS
    assert resolve(document, ticket["properties"]["status"])["enum"] == list(TicketStatus)
    assert {"type": "null"} in ticket["properties"]["ticket_id"]["anyOf"]

    submitted = [
        body_schema(document, "post", "/api/v1/plans", status) for status in ("202", "200")
    ]
    for schema in submitted:
        assert list(schema["properties"]) == [
            *PLAN_FIELDS,
            "tickets",
            "created",
            "tickets_created",
            "ticket_ids",
            "warnings",
        ]
    cancelled = body_schema(document, "post", "/api/v1/plans/{plan_id}/cancel", "200")
    assert list(cancelled["properties"]) == [*PLAN_FIELDS, "tickets", "cancel_requested"]
    page = body_schema(document, "get", "/api/v1/plans", "200")
    assert list(page["properties"]) == ["plans", "next_page_token"]
    assert list(resolve(document, page["properties"]["plans"]["items"])["properties"]) == (
        PLAN_FIELDS
    )
    explained = body_schema(document, "get", "/api/v1/plans/{plan_id}/explain", "200")
    assert list(explained["properties"]) == ["plan_id", "stale_owner", "tasks"]
    task = resolve(document, explained["properties"]["tasks"]["items"])
    one = body_schema(document, "get", "/api/v1/plans/{plan_id}/tasks/{task_id}/explain", "200")
    assert list(one["properties"]) == ["plan_id", "stale_owner", *task["properties"]]
    for schema in (explained, one):
        # A reason of the plan's (code OWNER_LEASE_EXPIRED), or null.
        stale = schema["properties"]["stale_owner"]["anyOf"]
        assert {"type": "null"} in stale
        (reason,) = [resolve(document, s) for s in stale if s != {"type": "null"}]
        assert list(reason["properties"]) == ["code", "message", "details"]
        assert "OWNER_LEASE_EXPIRED" in resolve(document, reason["properties"]["code"])["enum"]


def test_the_status_filter_documents_its_values() -> None:
    operation = openapi_document()["paths"]["/api/v1/plans"]["get"]
    (status,) = [p for p in operation["parameters"] if p["name"] == "status"]
    array = next(s for s in status["schema"]["anyOf"] if s.get("type") == "array")
    assert array["items"]["enum"] == list(PlanStatus)
