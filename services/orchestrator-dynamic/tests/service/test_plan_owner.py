"""Which replica drives a plan: the plan answers name it (``owner_id``,
``owner_lease_expires_at``), a settled plan names none, and explain says when the owner let
its lease expire (the state shown is then as that replica left it) until a replica takes
the plan over."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


def task(task_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_type": "echo",
        "required_capabilities": ["python"],
        "depends_on": list(deps),
        **extra,
    }


async def listed(flow: Flow, plan_id: str) -> dict[str, Any]:
    response = await flow.client().get("/api/v1/plans")
    assert response.status_code == 200, response.text
    (item,) = [p for p in response.json()["plans"] if p["plan_id"] == plan_id]
    result: dict[str, Any] = item
    return result


async def get_json(flow: Flow, path: str) -> dict[str, Any]:
    response = await flow.client().get(path)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_driven_plan_names_its_replica_and_a_settled_one_none(flow: Flow) -> None:
    app = await flow.start_orchestrator()
    # No worker offers gpu: the plan waits, driven by the replica it was submitted to.
    waiting = {"plan_id": "waits", "tasks": [task("train", required_capabilities=["gpu"])]}
    assert (await flow.submit(waiting)).status_code == 202
    for body in (await flow.plan("waits"), await listed(flow, "waits")):
        assert body["owner_id"] == app.driver.owner_id
        assert datetime.fromisoformat(body["owner_lease_expires_at"]) > datetime.now(UTC)
    # Driven normally: explain says nothing about the owner.
    explained = await get_json(flow, "/api/v1/plans/waits/explain")
    assert explained["stale_owner"] is None
    assert (await get_json(flow, "/api/v1/plans/waits/tasks/train/explain"))["stale_owner"] is None

    # Finished plans (their lease released when settled) name no replica.
    await flow.start_worker("w1", ["python"])
    assert (await flow.submit({"plan_id": "done", "tasks": [task("a")]})).status_code == 202
    assert (await flow.wait_settled("done"))["status"] == "COMPLETED"
    assert (await flow.client().post("/api/v1/plans/waits/cancel")).status_code == 200
    assert (await flow.wait_settled("waits"))["status"] == "CANCELLED"
    for plan_id in ("done", "waits"):
        for body in (await flow.plan(plan_id), await listed(flow, plan_id)):
            assert (body["owner_id"], body["owner_lease_expires_at"]) == (None, None), body


async def test_a_plan_whose_owner_stopped_renewing_its_lease_is_explained_as_it_left_it(
    flow: Flow,
) -> None:
    # This replica claims unowned plans only every 600 s: the plan stays unclaimed.
    app = await flow.start_orchestrator(claim_interval_seconds=600)
    await flow.start_worker("w1", ["python"], max_concurrent=1)
    plan = {
        "plan_id": "orphan",
        "tasks": [
            task("long", task_type="sleep", parameters={"seconds": 120}),
            task("after", "long"),
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    await flow.wait_plan(
        "orphan", lambda b: flow.tasks(b)["long"]["status"] == "RUNNING", "the task running"
    )
    # The replica that drove it was killed: its lease ran out, nobody renewed it. (This
    # replica's renewal names itself, so it loses the plan and leaves the row alone.)
    async with await psycopg.AsyncConnection.connect(flow.orchestrator_dsn) as conn:
        await conn.execute(
            "UPDATE plans SET owner_id = 'replica-killed',"
            " owner_lease_expires_at = now() - interval '2 seconds' WHERE plan_id = 'orphan'"
        )
        await conn.commit()

    async def dropped() -> bool:
        return "orphan" not in app.driver.driven_plan_ids()

    await flow.wait_for(dropped, what="the replica losing the plan")

    body = await flow.plan("orphan")
    assert body["owner_id"] == "replica-killed"
    assert datetime.fromisoformat(body["owner_lease_expires_at"]) < datetime.now(UTC)

    for path in ("/api/v1/plans/orphan/explain", "/api/v1/plans/orphan/tasks/long/explain"):
        stale = (await get_json(flow, path))["stale_owner"]
        assert stale is not None, path
        assert stale["code"] == "OWNER_LEASE_EXPIRED"
        message = stale["message"]
        assert message.startswith("replica replica-killed has not renewed its lease on this")
        assert "status, counts and tickets are shown as replica-killed last wrote them" in message
        assert "takes the plan over at its next claim of unowned plans" in message
        assert "this one claims every 600 s, CLAIM_INTERVAL_SECONDS" in message
        assert stale["details"] == {
            "owner_id": "replica-killed",
            "owner_lease_expires_at": body["owner_lease_expires_at"],
            "last_changed_at": body["updated_at"],
            "claim_interval_seconds": 600.0,
        }
    # The tasks are still explained, as last written.
    explained = await get_json(flow, "/api/v1/plans/orphan/explain")
    assert [t["task_id"] for t in explained["tasks"]] == ["after"]

    # A replica claiming every 0.3 s takes the plan over: the statement goes away.
    other = await flow.start_orchestrator()  # flow.client() now talks to this one

    async def taken_over() -> bool:
        owner: str | None = (await flow.plan("orphan"))["owner_id"]
        return owner == other.driver.owner_id

    await flow.wait_for(taken_over, what="another replica taking the plan over")
    assert (await get_json(flow, "/api/v1/plans/orphan/explain"))["stale_owner"] is None
