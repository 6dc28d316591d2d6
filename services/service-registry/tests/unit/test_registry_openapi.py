"""The registry's OpenAPI document: the statuses each route answers (with the error
body), the worker schema and the status filter's values."""

from __future__ import annotations

from typing import Any, cast

from hive_common.http import create_http_app
from hive_testsupport.openapi import assert_errors_have_the_error_body, resolve
from service_registry.domain.models import WorkerStatus
from service_registry.domain.service import RegistryService
from service_registry.domain.validation import Limits
from service_registry.transport.authorization import Authorizer
from service_registry.transport.http.routes import build_router

WORKER_FIELDS = [
    "worker_id",
    "name",
    "namespace",
    "capabilities",
    "labels",
    "max_concurrent",
    "in_flight",
    "spare_capacity",
    "version",
    "status",
    "registered_at",
    "last_heartbeat_at",
    "succeeded_total",
    "failed_total",
    "success_rate",
]


def openapi_document() -> dict[str, Any]:
    app = create_http_app(title="service-registry", version="1", bearer_auth=True)
    app.include_router(
        build_router(
            service=cast(RegistryService, None),
            authorizer=cast(Authorizer, None),
            limits=Limits(),
        )
    )
    return app.openapi()


def test_the_routes_document_their_statuses_and_answers() -> None:
    # GET /workers/{id} did not say 404, and both answers were untyped objects.
    document = openapi_document()
    listing = document["paths"]["/api/v1/workers"]["get"]
    one = document["paths"]["/api/v1/workers/{worker_id}"]["get"]
    assert set(listing["responses"]) == {"200", "400", "401", "403", "503"}
    assert set(one["responses"]) == {"200", "400", "401", "404", "503"}
    assert_errors_have_the_error_body({"listing": listing, "one": one})

    def answer_schema(operation: dict[str, Any]) -> dict[str, Any]:
        content = operation["responses"]["200"]["content"]["application/json"]
        return resolve(document, content["schema"])

    worker = answer_schema(one)
    assert list(worker["properties"]) == WORKER_FIELDS
    assert worker["required"] == WORKER_FIELDS
    assert resolve(document, worker["properties"]["status"])["enum"] == list(WorkerStatus)
    assert worker["properties"]["registered_at"]["format"] == "date-time"
    page = answer_schema(listing)
    assert list(page["properties"]) == ["workers", "next_page_token"]
    assert resolve(document, page["properties"]["workers"]["items"]) == worker


def test_the_query_parameters_document_their_values() -> None:
    parameters = {
        p["name"]: p["schema"]
        for p in openapi_document()["paths"]["/api/v1/workers"]["get"]["parameters"]
    }
    array = next(s for s in parameters["status"]["anyOf"] if s.get("type") == "array")
    assert array["items"]["enum"] == list(WorkerStatus)
    assert parameters["page_size"]["minimum"] == 0
