"""The ticket service's OpenAPI document: the statuses each route answers (with the
error body) and the values of the status filter."""

from __future__ import annotations

from typing import Any, cast

from execution_ticket_service.domain.models import TicketStatus
from execution_ticket_service.domain.validation import Limits
from execution_ticket_service.storage.audit import AuditStore
from execution_ticket_service.storage.tickets import TicketRepository
from execution_ticket_service.transport.http.routes import build_router
from hive_common.http import create_http_app
from hive_testsupport.openapi import assert_errors_have_the_error_body, operations

STATUSES = {
    "/api/v1/tickets": {"200", "400", "401", "503"},
    # A malformed id is 400, an unknown one 404.
    "/api/v1/tickets/{ticket_id}": {"200", "400", "401", "404", "503"},
    "/api/v1/tickets/{ticket_id}/events": {"200", "400", "401", "404", "503"},
}


def openapi_document() -> dict[str, Any]:
    app = create_http_app(title="execution-ticket-service", version="1", bearer_auth=True)
    app.include_router(
        build_router(
            repository=cast(TicketRepository, None),
            audit=cast(AuditStore, None),
            limits=Limits(),
            verifier=None,
        )
    )
    return app.openapi()


def test_every_route_documents_the_statuses_it_answers_with_the_error_body() -> None:
    # The by-id routes did not say 404.
    document = openapi_document()
    found = {path: operation for (_, path), operation in operations(document).items()}
    assert {path: set(op["responses"]) for path, op in found.items()} == STATUSES
    assert_errors_have_the_error_body(found)


def test_the_status_filter_and_the_ticket_status_document_their_values() -> None:
    document = openapi_document()
    parameters = {
        p["name"]: p["schema"] for p in document["paths"]["/api/v1/tickets"]["get"]["parameters"]
    }
    array = next(s for s in parameters["status"]["anyOf"] if s.get("type") == "array")
    assert array["items"]["enum"] == list(TicketStatus)
    assert parameters["page_size"]["minimum"] == 0
    schemas = document["components"]["schemas"]
    assert schemas["TicketOut"]["properties"]["status"] == {
        "$ref": "#/components/schemas/TicketStatus"
    }
    assert schemas["TicketStatus"]["enum"] == list(TicketStatus)


def test_the_audit_history_documents_its_event_types_and_statuses() -> None:
    # They were plain strings: an integrator had to guess the values.
    event = openapi_document()["components"]["schemas"]["AuditEventOut"]["properties"]
    assert event["type"]["enum"] == [
        "CREATED",
        "ASSIGNED",
        "STATUS_CHANGED",
        "REQUEUED",
        "LEASE_EXPIRED",
        "LATE_RESULT_REJECTED",
    ]
    assert event["status"]["enum"] == list(TicketStatus)
    [named, _] = event["previous_status"]["anyOf"]
    assert named["enum"] == list(TicketStatus)
