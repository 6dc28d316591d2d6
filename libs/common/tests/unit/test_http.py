"""The FastAPI skeleton, driven in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import structlog
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field

from hive_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from hive_common.http import (
    CLIENT_CLOSED_REQUEST,
    CheckResult,
    ReadinessReport,
    check_dependency,
    create_http_app,
    json_path,
    overall_status,
    query_violations,
)
from hive_common.logging import configure_logging
from hive_common.metrics import HttpMetrics, new_registry

SECRET = "connection string postgres://admin:hunter2@db"


class Task(BaseModel):
    task_id: str = Field(min_length=1)
    timeout_seconds: int = Field(default=60, gt=0)


class Plan(BaseModel):
    name: str
    tasks: list[Task]


def build_app(report: dict[str, CheckResult], metrics: HttpMetrics | None = None) -> FastAPI:
    async def readiness() -> ReadinessReport:
        return report

    app = create_http_app(title="test", version="0.0.1", readiness=readiness, metrics=metrics)

    @app.post("/plans")
    async def submit(plan: Plan) -> dict[str, int]:
        return {"tasks": len(plan.tasks)}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.get("/plans")
    async def list_plans(page_size: int = 10) -> dict[str, Any]:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        return {"page_size": page_size, "request_id": request_id}

    things = APIRouter(prefix="/api/v1/things")

    @things.get("/{thing_id}")
    async def get_thing(thing_id: str) -> dict[str, str]:
        return {"thing_id": thing_id}

    @things.delete("/{thing_id}")
    async def delete_thing(thing_id: str) -> dict[str, str]:
        return {"thing_id": thing_id}

    app.include_router(things)

    @app.get("/plans/{plan_id}")
    async def get_plan(plan_id: str) -> dict[str, str]:
        if plan_id == "missing":
            raise NotFound("plan not found", details={"plan_id": plan_id})
        if plan_id == "bad":
            raise InvalidArgument("bad plan id", violations=[FieldViolation("plan_id", "bad")])
        if plan_id == "done":
            raise FailedPrecondition("plan is finished")
        raise RuntimeError(SECRET)

    return app


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=stream)
    return stream


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def report() -> dict[str, CheckResult]:
    return {"postgres": {"status": "ok"}}


@pytest.fixture
async def client(
    report: dict[str, CheckResult], log_stream: io.StringIO
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(report))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_health_is_always_ok(
    client: httpx.AsyncClient, report: dict[str, CheckResult]
) -> None:
    report["postgres"] = {"status": "down", "detail": "connection refused"}
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_head_is_get_without_the_body(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    # Monitors and `curl -I` probe with HEAD; FastAPI's routes answered it with 405.
    assert (await client.head("/health")).status_code == 200
    assert (await client.head("/ready")).status_code == 200
    got = await client.get("/plans?page_size=3")
    head = await client.head("/plans?page_size=3")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["content-type"] == "application/json"
    missing = await client.head("/plans/missing")
    assert (missing.status_code, missing.content) == (404, b"")
    assert (await client.head("/raw")).status_code == 405  # POST only
    lines = [x for x in log_lines(log_stream) if x["event"] == "http_request"]
    assert [(x["method"], x["route"], x["status"]) for x in lines[-3:]] == [
        ("HEAD", "/plans", 200),
        ("HEAD", "/plans/{plan_id}", 404),
        ("HEAD", "/raw", 405),
    ]


async def test_ready_down_is_logged_as_a_warning_not_an_internal_error(
    client: httpx.AsyncClient, report: dict[str, CheckResult], log_stream: io.StringIO
) -> None:
    # Every probe during a database outage used to log an ERROR with error_code INTERNAL.
    report["postgres"] = {"status": "down", "detail": "no answer within 2 s"}
    assert (await client.get("/ready")).status_code == 503
    [line] = [x for x in log_lines(log_stream) if x["event"] == "http_request"]
    assert (line["level"], line["error_code"]) == ("warning", "UNAVAILABLE")


async def test_ready_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"postgres": {"status": "ok"}}}


async def test_ready_degraded_is_still_200(
    client: httpx.AsyncClient, report: dict[str, CheckResult]
) -> None:
    report["mongo"] = {"status": "degraded", "detail": "audit relay lagging"}
    response = await client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["mongo"] == {"status": "degraded", "detail": "audit relay lagging"}


async def test_ready_down_is_503(client: httpx.AsyncClient, report: dict[str, CheckResult]) -> None:
    report["mongo"] = {"status": "degraded"}
    report["postgres"] = {"status": "down", "detail": "connection refused"}
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "down"
    assert response.json()["checks"]["postgres"]["detail"] == "connection refused"


async def test_ready_when_check_crashes_is_503(log_stream: io.StringIO) -> None:
    async def readiness() -> ReadinessReport:
        raise ConnectionError(SECRET)

    app = create_http_app(title="t", version="1", readiness=readiness)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["readiness"]["status"] == "down"
    assert SECRET not in response.text


async def test_ready_without_checks_is_ok(log_stream: io.StringIO) -> None:
    app = create_http_app(title="t", version="1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {}}


async def test_body_validation_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/plans",
        json={"name": "p", "tasks": [{"task_id": "a"}, {"task_id": "b"}, {"task_id": ""}]},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"] == "request validation failed"
    violations = error["details"]["field_violations"]
    assert [v["field"] for v in violations] == ["body.tasks[2].task_id"]
    assert "at least 1 character" in violations[0]["description"]


async def test_every_violation_is_reported(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/plans", json={"tasks": [{"task_id": "a", "timeout_seconds": 0}, {}]}
    )
    assert response.status_code == 400
    fields = {v["field"] for v in response.json()["error"]["details"]["field_violations"]}
    assert fields == {"body.name", "body.tasks[0].timeout_seconds", "body.tasks[1].task_id"}


async def test_query_validation_error_path(client: httpx.AsyncClient) -> None:
    response = await client.get("/plans", params={"page_size": "many"})
    assert response.status_code == 400
    violations = response.json()["error"]["details"]["field_violations"]
    assert [v["field"] for v in violations] == ["query.page_size"]


async def test_malformed_json_is_400_on_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/plans", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    violations = response.json()["error"]["details"]["field_violations"]
    assert [v["field"] for v in violations] == ["body"]


@pytest.mark.parametrize(
    ("plan_id", "status", "code"),
    [
        ("missing", 404, "NOT_FOUND"),
        ("bad", 400, "INVALID_ARGUMENT"),
        ("done", 412, "FAILED_PRECONDITION"),
    ],
)
async def test_hive_errors_map_to_status_and_body(
    client: httpx.AsyncClient, plan_id: str, status: int, code: str
) -> None:
    response = await client.get(f"/plans/{plan_id}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


async def test_hive_error_body_is_to_dict(client: httpx.AsyncClient) -> None:
    response = await client.get("/plans/missing")
    assert response.json() == NotFound("plan not found", details={"plan_id": "missing"}).to_dict()


async def test_unexpected_exception_is_generic_500_and_logged(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    response = await client.get("/plans/boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "INTERNAL", "message": "internal error", "details": {}}
    }
    assert SECRET not in response.text
    assert response.headers["x-request-id"]
    lines = log_lines(log_stream)
    crash = [line for line in lines if line["event"] == "unhandled exception in request"]
    assert len(crash) == 1
    assert SECRET in json.dumps(crash[0]["exception"])
    request_lines = [line for line in lines if line["event"] == "http_request"]
    assert request_lines[-1]["status"] == 500
    assert request_lines[-1]["route"] == "/plans/{plan_id}"


async def test_a_client_gone_before_its_body_is_read_is_499_not_a_server_error(
    report: dict[str, CheckResult], log_stream: io.StringIO
) -> None:
    registry = new_registry()
    app = build_app(report, metrics=HttpMetrics(registry))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/raw",
        "raw_path": b"/raw",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # gone before sending the body

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent == []  # nobody to answer
    lines = log_lines(log_stream)
    assert not [line for line in lines if line["event"] == "unhandled exception in request"]
    request_line = [line for line in lines if line["event"] == "http_request"][-1]
    assert request_line["status"] == CLIENT_CLOSED_REQUEST
    assert request_line["level"] == "info"
    labels = {"method": "POST", "route": "/raw", "status": str(CLIENT_CLOSED_REQUEST)}
    assert registry.get_sample_value("http_requests_total", labels) == 1


async def test_unknown_route_uses_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"
    response = await client.delete("/health")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "UNIMPLEMENTED"
    assert response.headers["allow"] == "GET, HEAD"


async def test_a_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    # GET and POST /plans are two routes: the answer named only the first one's method.
    response = await client.delete("/plans")
    assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD, POST")
    assert (await client.put("/raw")).headers["allow"] == "POST"
    # Routes of an included router too (every service's API is one).
    response = await client.put("/api/v1/things/7")
    assert (response.status_code, response.headers["allow"]) == (405, "DELETE, GET, HEAD")


async def test_one_log_line_per_request_with_request_id(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    response = await client.get("/plans", headers={"x-request-id": "req-7"})
    assert response.json() == {"page_size": 10, "request_id": "req-7"}
    assert response.headers["x-request-id"] == "req-7"
    lines = [line for line in log_lines(log_stream) if line["event"] == "http_request"]
    assert len(lines) == 1
    assert lines[0]["request_id"] == "req-7"
    assert lines[0]["method"] == "GET"
    assert lines[0]["path"] == "/plans"
    assert lines[0]["status"] == 200
    assert lines[0]["level"] == "info"


async def test_hostile_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    response = await client.get("/plans", headers={"x-request-id": "a b\tc"})
    generated = response.json()["request_id"]
    assert generated != "a b\tc"
    assert len(generated) == 32


async def test_error_code_in_request_line(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    await client.get("/plans/missing")
    lines = [line for line in log_lines(log_stream) if line["event"] == "http_request"]
    assert lines[0]["error_code"] == "NOT_FOUND"
    assert lines[0]["status"] == 404


async def test_http_metrics_by_route(
    report: dict[str, CheckResult], log_stream: io.StringIO
) -> None:
    registry = new_registry()
    app = build_app(report, metrics=HttpMetrics(registry))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.get("/plans/missing")
        await c.get("/plans/done")
        await c.get("/ready")
        # The OpenAPI document and the docs were counted as "unmatched", with the 404s.
        assert (await c.get("/openapi.json")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/nowhere/7")).status_code == 404
    for route, status in (("/openapi.json", "200"), ("/docs", "200"), ("unmatched", "404")):
        counted = {"method": "GET", "route": route, "status": status}
        assert registry.get_sample_value("http_requests_total", counted) == 1, route
    labels = {"method": "GET", "route": "/plans/{plan_id}"}
    assert registry.get_sample_value("http_requests_total", {**labels, "status": "404"}) == 1
    assert registry.get_sample_value("http_requests_total", {**labels, "status": "412"}) == 1
    assert registry.get_sample_value("http_request_duration_seconds_count", labels) == 2
    ready = {"method": "GET", "route": "/ready", "status": "200"}
    assert registry.get_sample_value("http_requests_total", ready) == 1


async def test_openapi_stays_enabled(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert "/plans" in response.json()["paths"]
    assert "/ready" in response.json()["paths"]


def test_json_path() -> None:
    assert json_path(("body", "tasks", 2, "task_id")) == "body.tasks[2].task_id"
    assert json_path(("query", "page_size")) == "query.page_size"
    assert json_path(("body",)) == "body"
    assert json_path(()) == ""


def test_query_violations_name_query_parameters_as_fastapi_does() -> None:
    # The ticket service said `page_size` and `status[0]` where the others (and FastAPI
    # itself, for a page_size that is no number) said `query.page_size`.
    violations = [
        FieldViolation("page_size", "must not be negative"),
        FieldViolation("status[0]", "x"),
    ]
    assert query_violations(violations) == [
        FieldViolation("query.page_size", "must not be negative"),
        FieldViolation("query.status[0]", "x"),
    ]


def test_overall_status() -> None:
    assert overall_status({}) == "ok"
    assert overall_status({"a": {"status": "ok"}, "b": {"status": "degraded"}}) == "degraded"
    assert overall_status({"a": {"status": "down"}, "b": {"status": "degraded"}}) == "down"


@pytest.mark.parametrize("bearer_auth", [False, True])
async def test_the_openapi_document_tells_the_errors_and_the_authentication(
    log_stream: io.StringIO, bearer_auth: bool
) -> None:
    # It listed only a 422 FastAPI would send (this API answers 400, with its own error
    # body) and no way to send the bearer token the API needs.
    app = create_http_app(title="test", version="1", bearer_auth=bearer_auth)

    @app.get("/api/v1/things/{thing_id}")
    async def get_thing(thing_id: str, page_size: int = 10) -> dict[str, str]:
        return {}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        document = (await c.get("/openapi.json")).json()
    operation = document["paths"]["/api/v1/things/{thing_id}"]["get"]
    assert "422" not in operation["responses"]
    error = {"$ref": "#/components/schemas/Error"}
    assert operation["responses"]["400"]["content"]["application/json"]["schema"] == error
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "error" in document["components"]["schemas"]["Error"]["properties"]
    if bearer_auth:
        assert operation["security"] == [{"bearerAuth": []}]
        assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        assert "401" in operation["responses"]
        assert "403" not in operation["responses"]  # only where a route declares it
    else:
        assert "security" not in operation
        assert "securitySchemes" not in document["components"]
    # The probes stay open.
    assert "security" not in document["paths"]["/health"]["get"]


async def test_a_trailing_slash_is_not_found_not_a_redirect_built_from_the_host_header(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/plans/", headers={"host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers


async def test_a_dependency_check_names_what_does_not_answer() -> None:
    async def ok() -> None:
        return None

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def refuses() -> None:
        raise Unavailable("registry database unavailable")

    assert await check_dependency(ok) == {"status": "ok"}
    assert await check_dependency(hangs, timeout_seconds=0.05) == {
        "status": "down",
        "detail": "no answer within 0.05 s",
    }

    # What the client last saw of it, when it has something to say.
    async def refused() -> str:
        return "connection refused"

    async def nothing() -> None:
        return None

    async def hangs_too() -> str:
        await asyncio.Event().wait()
        return "never"

    assert await check_dependency(hangs, timeout_seconds=0.05, last_error=refused) == {
        "status": "down",
        "detail": "connection refused",
    }
    for silent in (nothing, hangs_too):  # a look that says nothing in time: as before
        assert await check_dependency(hangs, timeout_seconds=0.05, last_error=silent) == {
            "status": "down",
            "detail": "no answer within 0.05 s",
        }
    assert await check_dependency(refuses, failed="degraded") == {
        "status": "degraded",
        "detail": "registry database unavailable",
    }


def test_the_openapi_document_lists_the_statuses_each_route_answers() -> None:
    # A route could only say 400/401/403/503 with the error body, and every /api/ route
    # said 400, also those with nothing a client could get wrong (a plan read by id).
    app = create_http_app(title="test", version="1")

    @app.get("/api/v1/things/{thing_id}", responses={404: {"description": "No such thing"}})
    async def get_thing(thing_id: str) -> dict[str, str]:
        return {}

    @app.post(
        "/api/v1/things/{thing_id}/close",
        responses={
            400: {"description": "Malformed thing id"},
            404: {"description": "No such thing"},
            412: {"description": "Already closed"},
        },
    )
    async def close_thing(thing_id: str) -> dict[str, str]:
        return {}

    @app.get("/api/v1/things")
    async def list_things(page_size: int = 10) -> dict[str, str]:
        return {}

    paths = app.openapi()["paths"]
    responses = {
        (method, path): operation["responses"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }
    assert set(responses["get", "/api/v1/things/{thing_id}"]) == {"200", "404", "503"}
    assert set(responses["post", "/api/v1/things/{thing_id}/close"]) == {
        "200",
        "400",
        "404",
        "412",
        "503",
    }
    assert set(responses["get", "/api/v1/things"]) == {"200", "400", "503"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for (_, path), answers in responses.items():
        for status, answer in answers.items():
            if status[0] in "45":
                assert answer["content"] == error, (path, status)
    assert responses["post", "/api/v1/things/{thing_id}/close"]["412"]["description"] == (
        "Already closed"
    )


@pytest.mark.parametrize(
    "query", ["page_size=", "page_size", "page_size=&x=1", "x=1&page_size=&&", "page_size=="]
)
async def test_an_empty_query_parameter_is_one_not_given(
    client: httpx.AsyncClient, query: str
) -> None:
    # An empty string filter was "unset" while an empty number was a 400.
    response = await client.get(f"/plans?{query}")
    if query == "page_size==":
        assert response.status_code == 400  # "=" is a value, and not a number
    else:
        assert (response.status_code, response.json()["page_size"]) == (200, 10)
    assert (await client.get("/plans?page_size=3&other=")).json()["page_size"] == 3
