"""The plan API's input handling: bad input is refused with paths and stores nothing;
resubmission is idempotent; listing pages; the optional API token."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from hive_common.auth import TokenIssuer

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


def task(task_id: str, *deps: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_type": "echo",
        "required_capabilities": ["python"],
        "depends_on": list(deps),
        "parameters": {"n": 1},
    }


async def assert_nothing_stored(flow: Flow) -> None:
    listed = await flow.client().get("/api/v1/plans")
    assert listed.status_code == 200
    assert listed.json()["plans"] == []


def violations(response: Any) -> dict[str, str]:
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT", error
    return {v["field"]: v["description"] for v in error["details"]["field_violations"]}


async def test_bad_input_is_refused_with_paths_and_nothing_is_stored(flow: Flow) -> None:
    await flow.start_orchestrator()
    client = flow.client()
    headers = {"content-type": "application/json"}

    malformed = await client.post("/api/v1/plans", content=b'{"tasks": [', headers=headers)
    assert malformed.status_code == 400, malformed.text
    assert "$" in violations(malformed)

    not_utf8 = await client.post("/api/v1/plans", content=b'{"name": "\xff"}', headers=headers)
    assert not_utf8.status_code == 400

    nan = await client.post("/api/v1/plans", content=b'{"tasks": NaN}', headers=headers)
    assert nan.status_code == 400

    empty = await client.post("/api/v1/plans", content=b"", headers=headers)
    assert empty.status_code == 400

    wrong_types = await flow.submit(
        {
            "plan_id": "types",
            "priority": 7,
            "tasks": [{"task_id": 5, "task_type": "echo", "depends_on": "a", "max_retries": "x"}],
        }
    )
    assert wrong_types.status_code == 400, wrong_types.text
    found = violations(wrong_types)
    for path in (
        "$.priority",
        "$.tasks[0].task_id",
        "$.tasks[0].depends_on",
        "$.tasks[0].max_retries",
    ):
        assert path in found, found

    not_a_list = await flow.submit({"tasks": "everything"})
    assert not_a_list.status_code == 400
    assert "$.tasks" in violations(not_a_list)

    cycle = await flow.submit(
        {"plan_id": "loop", "tasks": [task("a", "c"), task("b", "a"), task("c", "b")]}
    )
    assert cycle.status_code == 400, cycle.text
    described = " ".join(violations(cycle).values())
    assert "a -> c -> b -> a" in described

    duplicate = await flow.submit({"plan_id": "dup", "tasks": [task("a"), task("a")]})
    assert duplicate.status_code == 400
    assert "$.tasks[1].task_id" in violations(duplicate)

    unknown_dep = await flow.submit({"plan_id": "dangling", "tasks": [task("a", "ghost")]})
    assert unknown_dep.status_code == 400
    assert "$.tasks[0].depends_on[0]" in violations(unknown_dep)

    # Oversized: 64 KiB limit in the tests' settings; declared and streamed bodies.
    big = {"plan_id": "big", "tasks": [task("a") | {"description": "x" * 70_000}]}
    oversized = await flow.submit(big)
    assert oversized.status_code == 413, oversized.text
    assert oversized.json()["error"]["code"] == "RESOURCE_EXHAUSTED"

    async def chunks() -> Any:
        for _ in range(80):
            yield b" " * 1024

    streamed = await client.post("/api/v1/plans", content=chunks(), headers=headers)
    assert streamed.status_code == 413

    bad_query = await client.get("/api/v1/plans", params={"status": "DONE", "page_size": 5})
    assert bad_query.status_code == 400
    assert "query.status[0]" in violations(bad_query)

    await assert_nothing_stored(flow)


async def test_resubmission_is_idempotent_and_a_different_body_conflicts(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"])
    plan: dict[str, Any] = {"plan_id": "same", "name": "n", "tasks": [task("a"), task("b", "a")]}

    first = await flow.submit(plan)
    assert first.status_code == 202, first.text
    ticket_ids = first.json()["ticket_ids"]

    # Same content, other key order and whitespace, defaults spelt out.
    spelled = {
        "tasks": [
            {**t, "max_retries": 0, "description": ""} for t in reversed(plan["tasks"][::-1])
        ],
        "name": "n",
        "plan_id": "same",
        "priority": "NORMAL",
    }
    again = await flow.client().post(
        "/api/v1/plans",
        content=json.dumps(spelled, indent=3).encode(),
        headers={"content-type": "application/json"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["ticket_ids"] == ticket_ids
    assert again.headers["location"] == "/api/v1/plans/same"

    changed = await flow.submit({**plan, "name": "other"})
    assert changed.status_code == 409, changed.text
    assert changed.json()["error"]["code"] == "ALREADY_EXISTS"

    final = await flow.wait_settled("same")
    assert final["status"] == "COMPLETED"
    assert {t["ticket_id"] for t in flow.tasks(final).values()} == set(ticket_ids.values())

    # Still idempotent after the plan finished.
    late = await flow.submit(plan)
    assert late.status_code == 200
    assert late.json()["status"] == "COMPLETED"

    listed = (await flow.client().get("/api/v1/plans")).json()
    assert [p["plan_id"] for p in listed["plans"]] == ["same"]


async def test_listing_pages_and_unknown_plans(flow: Flow) -> None:
    await flow.start_orchestrator()
    for n in range(3):
        response = await flow.submit({"plan_id": f"p{n}", "tasks": [task("a")]})
        assert response.status_code == 202, response.text
    generated = await flow.submit({"tasks": [task("a")]})
    assert generated.status_code == 202
    generated_id = generated.json()["plan_id"]

    seen: list[str] = []
    token: str | None = None
    while True:
        params: dict[str, Any] = {"page_size": 2}
        if token:
            params["page_token"] = token
        page = (await flow.client().get("/api/v1/plans", params=params)).json()
        seen.extend(p["plan_id"] for p in page["plans"])
        token = page["next_page_token"]
        assert isinstance(token, str)  # "" on the last page, as the other two services
        if not token:
            break
    assert sorted(seen) == sorted(["p0", "p1", "p2", generated_id])

    pending = await flow.client().get("/api/v1/plans", params={"status": "PENDING"})
    assert {p["plan_id"] for p in pending.json()["plans"]} == set(seen)

    missing = await flow.client().get("/api/v1/plans/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    assert (await flow.client().post("/api/v1/plans/nope/cancel")).status_code == 404
    no_task = await flow.client().get("/api/v1/plans/p0/tasks/zzz/explain")
    assert no_task.status_code == 404
    # A 405 names every method of the path (it said POST only, or nothing at all).
    not_allowed = await flow.client().delete("/api/v1/plans")
    assert (not_allowed.status_code, not_allowed.headers["allow"]) == (405, "GET, HEAD, POST")


async def test_api_token_when_configured(flow: Flow) -> None:
    await flow.start_orchestrator(api_token="s3cret-token-for-tests")
    client = flow.client()
    refused = await client.get("/api/v1/plans")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
    wrong = await client.get("/api/v1/plans", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    twice = await client.get(
        "/api/v1/plans",
        headers=[
            ("authorization", "Bearer s3cret-token-for-tests"),
            ("authorization", "Bearer nope"),
        ],
    )
    assert twice.status_code == 401
    # The OpenAPI document says so, and shows what a plan looks like.
    document = (await client.get("/openapi.json")).json()
    submit = document["paths"]["/api/v1/plans"]["post"]
    assert submit["security"] == [{"bearerAuth": []}]
    example = submit["requestBody"]["content"]["application/json"]["example"]
    assert example["tasks"][0]["task_type"] == "echo"
    assert {"400", "401", "409", "413", "415"} <= set(submit["responses"])
    ok = await client.get(
        "/api/v1/plans", headers={"authorization": "Bearer s3cret-token-for-tests"}
    )
    assert ok.status_code == 200
    assert (await client.get("/health")).status_code == 200


async def test_ids_and_page_tokens_that_cannot_exist(flow: Flow) -> None:
    """PostgreSQL text cannot hold NUL: such an id is not found (it is not a valid id) and
    such a token is malformed, not a database error."""
    await flow.start_orchestrator()
    client = flow.client()
    assert (await flow.submit({"plan_id": "real", "tasks": [task("a")]})).status_code == 202
    for method, path in [
        ("GET", "/api/v1/plans/x%00y"),
        ("GET", "/api/v1/plans/x%00y/explain"),
        ("POST", "/api/v1/plans/x%00y/cancel"),
        ("GET", "/api/v1/plans/x%00y/tasks/a/explain"),
        ("GET", "/api/v1/plans/-dash"),
        ("GET", "/api/v1/plans/" + "a" * 10_000),
        ("GET", "/api/v1/plans/real/tasks/" + "b" * 10_000 + "/explain"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 404, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "NOT_FOUND"
        assert "not found" in error["message"] or "has no task" in error["message"]
        # The answer does not copy the id back whole.
        assert len(response.content) < 1000

    raw = json.dumps({"c": "2026-12-05T12:04:59+00:00", "p": "x\u0000"}).encode()
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    forged = await client.get("/api/v1/plans", params={"page_token": token})
    assert forged.status_code == 400, forged.text
    assert violations(forged) == {"query.page_token": "malformed or foreign page token"}
    assert [p["plan_id"] for p in (await client.get("/api/v1/plans")).json()["plans"]] == ["real"]


async def test_bodies_that_cannot_be_plans_are_refused_with_paths(flow: Flow) -> None:
    await flow.start_orchestrator()
    client = flow.client()
    json_type = {"content-type": "application/json"}
    plan_text = '{"plan_id": "ok", "tasks": [{"task_id": "a", "task_type": "echo"}]}'

    # Lone surrogates anywhere: 400 with the path (this used to be a 500 while hashing).
    for body, field in [
        ('{"name": "a\\ud800b", "tasks": [{"task_id": "a", "task_type": "echo"}]}', "$.name"),
        (
            '{"tasks": [{"task_id": "a", "task_type": "echo", "description": "\\udfff"}]}',
            "$.tasks[0].description",
        ),
        (
            '{"tasks": [{"task_id": "a", "task_type": "echo", "parameters": {"\\ud800": 1}}]}',
            '$.tasks[0].parameters["\\ud800"]',
        ),
        (
            '{"tasks": [{"task_id": "a", "task_type": "echo", "parameters": {"k": ["\\ud800"]}}]}',
            "$.tasks[0].parameters.k[0]",
        ),
    ]:
        response = await client.post("/api/v1/plans", content=body.encode(), headers=json_type)
        assert response.status_code == 400, response.text
        assert "contains an unpaired surrogate" in violations(response)[field]

    # Duplicate keys: the last one used to win silently.
    duplicated = await client.post(
        "/api/v1/plans",
        content=b'{"plan_id": "d1", "plan_id": "d2", "tasks": [{"task_id": "a", '
        b'"task_type": "echo"}], "tasks": [{"task_id": "b", "task_type": "echo"}]}',
        headers=json_type,
    )
    assert duplicated.status_code == 400, duplicated.text
    assert violations(duplicated) == {
        "$.plan_id": "duplicate key 'plan_id': a key may appear only once in an object",
        "$.tasks": "duplicate key 'tasks': a key may appear only once in an object",
    }

    # Anything but JSON: 415, whatever the body.
    for headers in (
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},  # curl -d without -H
        {},
    ):
        refused = await client.post("/api/v1/plans", content=plan_text.encode(), headers=headers)
        assert refused.status_code == 415, refused.text
        error = refused.json()["error"]
        assert error["code"] == "UNSUPPORTED_MEDIA_TYPE"
        assert "send Content-Type: application/json" in error["message"]
    # JSON in another charset was read as UTF-8 and refused as "not UTF-8 ... byte 62".
    for charset in ("latin-1", '"UTF-16"'):
        refused = await client.post(
            "/api/v1/plans",
            content=plan_text.encode(),
            headers={"content-type": f"application/json; charset={charset}"},
        )
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"]["message"] == (
            "request body must be UTF-8 JSON (RFC 8259), not "
            f"charset={charset.strip(chr(34)).lower()!r}"
        )

    await assert_nothing_stored(flow)
    accepted = await client.post(
        "/api/v1/plans",
        content=plan_text.encode(),
        headers={"content-type": "application/json; Charset=UTF-8"},
    )
    assert accepted.status_code == 202, accepted.text


async def test_whole_floats_in_parameters_are_the_same_plan(flow: Flow) -> None:
    await flow.start_orchestrator()
    as_int = {"plan_id": "floats", "tasks": [task("a") | {"parameters": {"n": 30, "l": [1]}}]}
    as_float = {"plan_id": "floats", "tasks": [task("a") | {"parameters": {"n": 30.0, "l": [1.0]}}]}
    first = await flow.submit(as_int)
    assert first.status_code == 202, first.text
    again = await flow.submit(as_float)
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False


def assert_documented(value: Any, schema: dict[str, Any], document: dict[str, Any]) -> None:
    """``value`` is what ``schema`` in the OpenAPI ``document`` says: an object has its
    properties in their order and no others, nulls only where allowed, enums kept."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        assert_documented(value, document["components"]["schemas"][name], document)
    elif "anyOf" in schema:
        others = [s for s in schema["anyOf"] if s != {"type": "null"}]
        if value is not None or len(others) == len(schema["anyOf"]):
            (other,) = others
            assert_documented(value, other, document)
    elif "enum" in schema:
        assert value in schema["enum"], (value, schema)
    elif "properties" in schema:
        assert list(value) == list(schema["properties"])
        for key, field in schema["properties"].items():
            assert_documented(value[key], field, document)
    elif schema.get("type") == "array":
        for item in value:
            assert_documented(item, schema["items"], document)
    elif schema.get("type") == "object":
        assert isinstance(value, dict)
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                assert_documented(item, schema["additionalProperties"], document)
    elif "type" in schema:
        kinds: dict[str, type | tuple[type, ...]] = {
            "string": str,
            "integer": int,
            "boolean": bool,
            "number": (int, float),
        }
        assert isinstance(value, kinds[schema["type"]]), (value, schema)


async def test_the_answers_are_what_the_openapi_document_says(flow: Flow) -> None:
    # The document had no response schemas, and left out the 200, 404 and 412 answers.
    await flow.start_orchestrator()
    client = flow.client()
    document = (await client.get("/openapi.json")).json()

    def check(method: str, path: str, response: httpx.Response) -> None:
        status = str(response.status_code)
        answer = document["paths"][path][method]["responses"].get(status)
        assert answer is not None, f"{method} {path} answered {status}, not documented"
        schema = answer["content"]["application/json"]["schema"]
        assert_documented(response.json(), schema, document)

    # No worker offers python: a warning, and the plan waits.
    plan = {"plan_id": "doc", "tasks": [task("a"), task("b", "a")]}
    submitted = await flow.submit(plan)
    assert submitted.status_code == 202
    assert submitted.json()["warnings"]
    check("post", "/api/v1/plans", submitted)
    check("post", "/api/v1/plans", await flow.submit(plan))  # 200
    check("post", "/api/v1/plans", await flow.submit({**plan, "name": "other"}))  # 409
    plan_path = "/api/v1/plans/{plan_id}"
    check("get", plan_path, await client.get("/api/v1/plans/doc"))
    check("get", plan_path, await client.get("/api/v1/plans/nope"))  # 404
    check("get", "/api/v1/plans", await client.get("/api/v1/plans"))
    explain = "/api/v1/plans/{plan_id}/explain"
    check("get", explain, await client.get("/api/v1/plans/doc/explain", params={"all": "true"}))
    check("get", explain, await client.get("/api/v1/plans/nope/explain"))
    explain_task = "/api/v1/plans/{plan_id}/tasks/{task_id}/explain"
    check("get", explain_task, await client.get("/api/v1/plans/doc/tasks/b/explain"))
    check("get", explain_task, await client.get("/api/v1/plans/doc/tasks/zz/explain"))
    cancel = "/api/v1/plans/{plan_id}/cancel"
    cancelled = await client.post("/api/v1/plans/doc/cancel")
    assert cancelled.json()["cancel_requested_at"] is not None
    check("post", cancel, cancelled)
    check("post", cancel, await client.post("/api/v1/plans/nope/cancel"))  # 404
    check("get", plan_path, await client.get("/api/v1/plans/doc"))

    await flow.start_worker("w1", ["python"])
    done = {"plan_id": "done", "tasks": [task("a")]}
    assert (await flow.submit(done)).status_code == 202
    await flow.wait_settled("done")
    check("post", cancel, await client.post("/api/v1/plans/done/cancel"))  # 412


async def test_a_bad_query_parameter_has_the_same_field_path_in_every_service(
    flow: Flow,
) -> None:
    # The ticket service said page_size, status[0] and page_token, the orchestrator
    # page_token, where the rest said query.page_size, query.status[0], query.page_token.
    app = await flow.start_orchestrator()
    assert flow.tickets.service is not None
    assert flow.registry.app is not None
    issuer = TokenIssuer(secret=flow.jwt_secret, issuer="hive-flow-c", audience="neuralhive")
    token, _ = issuer.issue_service_token(service="tests", ttl_seconds=600)
    listings = {
        f"{app.runtime.http_port}/api/v1/plans",
        f"{flow.tickets.service.runtime.http_port}/api/v1/tickets",
        f"{flow.registry.app.runtime.http_port}/api/v1/workers",
    }
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {token}"}) as client:
        for name, value, field in [
            ("page_size", "-1", "query.page_size"),
            ("status", "bogus", "query.status[0]"),
            ("page_token", "zz!", "query.page_token"),
        ]:
            for listing in listings:
                response = await client.get(f"http://127.0.0.1:{listing}", params={name: value})
                assert response.status_code == 400, (listing, response.text)
                violations = response.json()["error"]["details"]["field_violations"]
                assert [v["field"] for v in violations] == [field], listing
