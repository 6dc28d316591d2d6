"""Outages and replicas: an outage of the ticket service or the registry delays work and
loses nothing; two orchestrator replicas never drive one plan at once and take over each
other's plans."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from hive_common.grpc_client import create_channel
from neuralhive.orchestrator.v1 import orchestrator_service_pb2 as pb
from neuralhive.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from orchestrator_dynamic.domain.records import PlanOwnershipLost

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


def chain(plan_id: str, *, sleep_first: float = 0.0, length: int = 3) -> dict[str, Any]:
    tasks: list[dict[str, Any]] = []
    for n in range(length):
        body: dict[str, Any] = {
            "task_id": f"t{n}",
            "task_type": "echo",
            "required_capabilities": ["python"],
            "depends_on": [f"t{n - 1}"] if n else [],
            "parameters": {"n": n},
        }
        if n == 0 and sleep_first:
            body |= {"task_type": "sleep", "parameters": {"seconds": sleep_first}}
        tasks.append(body)
    return {"plan_id": plan_id, "tasks": tasks}


async def readiness(flow: Flow) -> dict[str, Any]:
    response = await flow.client().get("/ready")
    body: dict[str, Any] = response.json()
    return body


async def test_ticket_service_outage_delays_and_loses_nothing(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"])
    assert (await flow.submit(chain("outage", sleep_first=1.0))).status_code == 202
    await flow.wait_plan(
        "outage", lambda b: flow.tasks(b)["t0"]["status"] == "RUNNING", "t0 running"
    )

    await flow.stop_ticket_service()

    async def degraded() -> bool:
        body = await readiness(flow)
        return bool(body["checks"]["ticket_service"]["status"] == "degraded")

    await flow.wait_for(degraded, what="readiness reporting the ticket service degraded")
    ready = await flow.client().get("/ready")
    assert ready.status_code == 200  # degraded, not down: the orchestrator still serves
    # Submissions are still accepted and stored; their tickets follow later.
    late = await flow.submit(chain("submitted-during-outage"))
    assert late.status_code == 202, late.text
    assert late.json()["tickets_created"] is False
    assert all(t is None for t in late.json()["ticket_ids"].values())
    # Explain says why its tickets wait (it said "not created yet", nothing more).
    explained = await flow.client().get("/api/v1/plans/submitted-during-outage/explain")
    first = explained.json()["tasks"][0]["reasons"]
    assert [r["code"] for r in first[:2]] == ["TICKET_SERVICE_UNREACHABLE", "TICKET_NOT_CREATED"]
    assert first[0]["details"]["error"]

    await flow.start_ticket_service()

    for plan_id in ("outage", "submitted-during-outage"):
        final = await flow.wait_settled(plan_id)
        assert final["status"] == "COMPLETED", final
    assert (await readiness(flow))["checks"]["ticket_service"]["status"] == "ok"


async def test_registry_outage_delays_dispatch(flow: Flow) -> None:
    app = await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"])
    await flow.stop_registry()

    response = await flow.submit(chain("no-registry"))
    assert response.status_code == 202, response.text
    warnings = response.json()["warnings"]
    assert any("could not be asked" in w["description"] for w in warnings), warnings
    # Not capability_unavailable: that one says no worker offers a capability.
    assert [w["code"] for w in warnings] == ["feasibility_unchecked"]
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        task = pb.TaskSpec(task_id="a", task_type="echo", required_capabilities=["python"])
        over_grpc = await pb_grpc.OrchestratorServiceStub(channel).SubmitPlan(
            pb.SubmitPlanRequest(plan=pb.PlanSpec(plan_id="no-registry-grpc", tasks=[task]))
        )
    finally:
        await channel.close()
    assert [w.split(": ", 1)[0] for w in over_grpc.warnings] == ["feasibility_unchecked"]
    explained = await flow.client().get("/api/v1/plans/no-registry/tasks/t0/explain")
    assert explained.status_code == 200
    codes = [r["code"] for r in explained.json()["reasons"]]
    assert "WORKERS_UNKNOWN" in codes

    async def degraded() -> bool:
        return bool((await readiness(flow))["checks"]["registry"]["status"] == "degraded")

    await flow.wait_for(degraded, what="readiness reporting the registry degraded")
    body = await flow.plan("no-registry")
    assert flow.tasks(body)["t0"]["status"] == "PENDING"

    await flow.start_registry()
    final = await flow.wait_settled("no-registry")
    assert final["status"] == "COMPLETED"


async def test_two_replicas_share_plans_and_take_over(flow: Flow) -> None:
    first = await flow.start_orchestrator()
    second = await flow.start_orchestrator()  # flow.client() now talks to the second
    await flow.start_worker("w1", ["python"], max_concurrent=4)
    plan_ids = [f"shared-{n}" for n in range(6)]
    for plan_id in plan_ids:
        assert (await flow.submit(chain(plan_id, sleep_first=0.5))).status_code == 202

    # Every unsettled plan has at most one owner, and it is one of the two replicas.
    owners = {first.driver.owner_id, second.driver.owner_id}
    async with await psycopg.AsyncConnection.connect(flow.orchestrator_dsn) as conn:
        cur = await conn.execute("SELECT plan_id, owner_id FROM plans WHERE settled_at IS NULL")
        for _, owner in await cur.fetchall():
            assert owner is None or owner in owners
    assert not set(first.driver.driven_plan_ids()) & set(second.driver.driven_plan_ids())

    # The second replica goes away; its plans are released and the first finishes them.
    await flow.stop_orchestrator(second)
    third_view = await flow.start_orchestrator()  # only for reading over HTTP
    for plan_id in plan_ids:
        final = await flow.wait_settled(plan_id)
        assert final["status"] == "COMPLETED", final
        assert {t["attempt"] for t in final["tickets"]} == {1}
    assert third_view.driver.owner_id not in {first.driver.owner_id, second.driver.owner_id}


async def run_a_long_task(flow: Flow, plan_id: str) -> None:
    """Submit a plan of one 120 s task on a new worker; return once it runs."""
    await flow.start_worker("w1", ["python"], max_concurrent=1)
    task = {
        "task_id": "long",
        "task_type": "sleep",
        "required_capabilities": ["python"],
        "parameters": {"seconds": 120},
    }
    assert (await flow.submit({"plan_id": plan_id, "tasks": [task]})).status_code == 202
    await flow.wait_plan(
        plan_id, lambda b: flow.tasks(b)["long"]["status"] == "RUNNING", "the task running"
    )


async def test_a_cancel_through_another_replica_reaches_the_tickets_soon(flow: Flow) -> None:
    # The driving replica saw such a cancel at its next resync of the plan (30 s by
    # default), and the plan's tasks ran on meanwhile.
    driving = await flow.start_orchestrator(resync_interval_seconds=600)
    await run_a_long_task(flow, "cancelled-elsewhere")
    other = await flow.start_orchestrator()  # flow.client() now talks to this one
    assert "cancelled-elsewhere" in driving.driver.driven_plan_ids()
    assert "cancelled-elsewhere" not in other.driver.driven_plan_ids()
    response = await flow.client().post("/api/v1/plans/cancelled-elsewhere/cancel")
    assert response.status_code == 200, response.text
    async with asyncio.timeout(20):
        final = await flow.wait_settled("cancelled-elsewhere")
    assert flow.tasks(final)["long"]["status"] == "CANCELLED"


async def test_a_stale_round_of_a_plan_claimed_again_leaves_the_new_claim_alone(
    flow: Flow,
) -> None:
    # A database outage longer than the lease: the replica claims its own plan again
    # (a new epoch, a new copy), then a round of the old copy still in flight ends with
    # ownership lost and dropped the plan by id, the new copy with it; the plan then
    # waited for its lease to expire once more.
    app = await flow.start_orchestrator()
    await run_a_long_task(flow, "claimed-again")
    old = app.driver._plans["claimed-again"]
    async with await psycopg.AsyncConnection.connect(flow.orchestrator_dsn) as conn:
        await conn.execute(
            "UPDATE plans SET owner_lease_expires_at = now() - interval '1 second'"
            " WHERE plan_id = 'claimed-again'"
        )
        await conn.commit()

    async def claimed_again() -> bool:
        current = app.driver._plans.get("claimed-again")
        return current is not None and current is not old

    await flow.wait_for(claimed_again, what="the plan claimed again")

    async def stale_round() -> None:
        raise PlanOwnershipLost("the old copy's lease")

    await app.driver._guarded(old, stale_round())
    assert "claimed-again" in app.driver.driven_plan_ids()


async def test_no_task_is_assigned_after_a_cancel_through_another_replica(flow: Flow) -> None:
    # The driving replica learned of such a cancel at its next claim (5 s) and assigned
    # the plan's next tasks meanwhile: a plan could end CANCELLED with every task run.
    driving = await flow.start_orchestrator(claim_interval_seconds=600, resync_interval_seconds=600)
    await flow.start_worker("w1", ["python"], max_concurrent=1)
    plan = {
        "plan_id": "chain-cancelled-elsewhere",
        "tasks": [
            {
                "task_id": "first",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 2},
            },
            *(
                {
                    "task_id": task_id,
                    "task_type": "echo",
                    "required_capabilities": ["python"],
                    "depends_on": [after],
                }
                for task_id, after in (("second", "first"), ("third", "second"))
            ),
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    await flow.wait_plan(
        "chain-cancelled-elsewhere",
        lambda b: flow.tasks(b)["first"]["status"] == "RUNNING",
        "the first task running",
    )
    await flow.start_orchestrator()  # flow.client() now talks to this one
    response = await flow.client().post("/api/v1/plans/chain-cancelled-elsewhere/cancel")
    assert response.status_code == 200, response.text
    assert "chain-cancelled-elsewhere" in driving.driver.driven_plan_ids()
    async with asyncio.timeout(20):
        final = await flow.wait_settled("chain-cancelled-elsewhere")
    assert final["status"] == "CANCELLED"
    for task_id in ("second", "third"):
        ticket = flow.tasks(final)[task_id]
        assert (ticket["status"], ticket["worker_id"]) == ("CANCELLED", None), ticket


async def test_a_ticket_of_a_lost_worker_runs_elsewhere(flow: Flow) -> None:
    # Short leases so the lost worker's ticket comes back quickly.
    await flow.start_orchestrator(assign_lease_seconds=2)
    doomed = await flow.start_worker("doomed", ["python"])
    started = asyncio.Event()

    async def hang(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()  # never finishes: the worker dies first
        return {}

    doomed.add_task("job", hang)
    plan = {
        "plan_id": "orphan",
        "tasks": [
            {
                "task_id": "job",
                "task_type": "job",
                "required_capabilities": ["python"],
                "timeout_seconds": 2,
                "max_retries": 5,
            },
            {
                "task_id": "after",
                "task_type": "echo",
                "required_capabilities": ["python"],
                "depends_on": ["job"],
                # The dead worker looks alive until it misses its heartbeats, so this
                # ticket may be leased to it once too.
                "max_retries": 5,
            },
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    async with asyncio.timeout(60):
        await started.wait()

    await flow.kill_worker(doomed)

    survivor = await flow.start_worker("survivor", ["python"])

    async def done(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"ran_on": "survivor", "attempt": ctx.attempt}

    survivor.add_task("job", done)
    final = await flow.wait_settled("orphan")
    assert final["status"] == "COMPLETED", final
    job = flow.tasks(final)["job"]
    assert job["attempt"] >= 2
    assert job["worker_id"] == survivor.worker_id


async def test_a_plan_whose_assignments_are_refused_says_so_and_recovers(flow: Flow) -> None:
    # An assignment lease the ticket service does not allow: every assignment refused,
    # the round retried every second for ever, explain saying "ready" while the plan
    # stayed PENDING.
    allowed = flow.ticket_settings
    await flow.stop_ticket_service()
    flow.ticket_settings = allowed.model_copy(update={"max_lease_seconds": 60})
    await flow.start_ticket_service()
    app = await flow.start_orchestrator(assign_lease_seconds=120)
    await flow.start_worker("w1", ["python"])
    assert (await flow.submit(chain("refused", length=1))).status_code == 202

    async def failing_reason() -> dict[str, Any] | None:
        explained = await flow.client().get("/api/v1/plans/refused/tasks/t0/explain")
        reasons = explained.json()["reasons"]
        return reasons[0] if reasons[0]["code"] == "ROUNDS_FAILING" else None

    reason = await flow.wait_for(failing_reason, what="explain saying the rounds fail")
    assert "lease_seconds" in reason["details"]["error"]
    assert "lease_seconds" in reason["message"]
    assert (await flow.plan("refused"))["status"] == "PENDING"

    await flow.stop_ticket_service()
    flow.ticket_settings = allowed
    await flow.start_ticket_service()
    assert (await flow.wait_settled("refused"))["status"] == "COMPLETED"

    async def cleared() -> bool:
        return await app.repository.round_error("refused") is None

    await flow.wait_for(cleared, what="the failed rounds forgotten")


async def test_a_plan_whose_tickets_are_refused_for_its_token_says_why(flow: Flow) -> None:
    # An orchestrator with another JWT secret than the ticket service's: every ticket
    # creation refused (UNAUTHENTICATED, tried again with a back-off), while explain said
    # "its ticket has not been created yet" for ever.
    shared = flow.jwt_secret
    flow.jwt_secret = "not-the-secret-the-ticket-service-knows-0123456789"
    try:
        await flow.start_orchestrator(submit_wait_seconds=0.5)
    finally:
        flow.jwt_secret = shared
    submitted = await flow.submit(chain("unsigned", length=1))
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["tickets_created"] is False

    async def failing_reason() -> dict[str, Any] | None:
        explained = await flow.client().get("/api/v1/plans/unsigned/tasks/t0/explain")
        reasons = explained.json()["reasons"]
        return reasons[0] if reasons[0]["code"] == "ROUNDS_FAILING" else None

    reason = await flow.wait_for(failing_reason, what="explain saying the rounds fail")
    assert "Unauthenticated" in reason["details"]["error"], reason
    assert reason["message"].startswith("its ticket has not been created: "), reason
    explained = await flow.client().get("/api/v1/plans/unsigned/explain")
    assert [r["code"] for r in explained.json()["tasks"][0]["reasons"]][:2] == [
        "ROUNDS_FAILING",
        "TICKET_NOT_CREATED",
    ]
