"""The plan API's input handling: bad input is refused with paths and stores nothing;
resubmission is idempotent; listing pages; the optional API token."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

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
        if token is None:
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


async def test_api_token_when_configured(flow: Flow) -> None:
    await flow.start_orchestrator(api_token="s3cret-token-for-tests")
    client = flow.client()
    refused = await client.get("/api/v1/plans")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
    wrong = await client.get("/api/v1/plans", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = await client.get(
        "/api/v1/plans", headers={"authorization": "Bearer s3cret-token-for-tests"}
    )
    assert ok.status_code == 200
    assert (await client.get("/health")).status_code == 200
