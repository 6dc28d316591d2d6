"""C1 to C5 end to end: real ticket service, registry, orchestrator and reference workers."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import TYPE_CHECKING, Any, cast

import httpx
import psycopg
import pytest
from structlog.testing import capture_logs

from hive_common.clients.registry import RegistryClient
from hive_common.logging import configure_logging
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.domain.json_input import decode_json
from orchestrator_dynamic.domain.plan import plan_body_hash
from orchestrator_dynamic.engine import driver as driver_module
from orchestrator_dynamic.engine import plans as plans_module
from orchestrator_dynamic.transport.http import routes as routes_module

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


def echo(
    task_id: str, *deps: str, caps: tuple[str, ...] = ("python",), **extra: Any
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_type": "echo",
        "required_capabilities": list(caps),
        "depends_on": list(deps),
        "parameters": {"task": task_id},
        **extra,
    }


async def test_three_level_dag_completes(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"], max_concurrent=2)
    await flow.start_worker("w2", ["python", "shell"], max_concurrent=2)
    plan: dict[str, Any] = {
        "plan_id": "release-1",
        "name": "three levels",
        "tasks": [
            echo("build"),
            echo("unit", "build"),
            echo("lint", "build"),
            echo("package", "unit", "lint"),
        ],
    }
    response = await flow.submit(plan)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == "/api/v1/plans/release-1"
    body = response.json()
    assert body["created"] is True
    assert body["tickets_created"] is True
    assert set(body["ticket_ids"]) == {"build", "unit", "lint", "package"}
    assert all(body["ticket_ids"].values())

    final = await flow.wait_settled("release-1")
    assert final["status"] == "COMPLETED"
    assert final["error_message"] is None
    assert final["completed_at"] is not None
    assert final["counts"]["COMPLETED"] == 4
    tickets = flow.tasks(final)
    assert {t["status"] for t in tickets.values()} == {"COMPLETED"}
    assert {t["attempt"] for t in tickets.values()} == {1}

    # The ticket service agrees, and dependencies ran before their dependents.
    async with flow.ticket_client() as client:
        listed = await client.list_tickets(plan_id="release-1")
    by_task = {t.task_id: t for t in listed.tickets}
    assert {t.status for t in listed.tickets} == {ticket_pb.TICKET_STATUS_COMPLETED}
    for task in plan["tasks"]:
        for dep in task["depends_on"]:
            assert (
                by_task[dep].completed_at.ToDatetime()
                <= by_task[task["task_id"]].started_at.ToDatetime()
            )
    assert by_task["package"].result["task"] == "package"

    metrics = (await flow.client().get("/metrics")).text
    assert 'hive_orchestrator_plans_settled_total{status="COMPLETED"} 1.0' in metrics
    assert 'hive_orchestrator_plan_duration_seconds_count{status="COMPLETED"} 1.0' in metrics
    # Submission to settlement took more than nothing and less than the test's own run.
    duration = re.search(r'plan_duration_seconds_sum\{status="COMPLETED"\} (\S+)', metrics)
    assert duration is not None
    assert 0 < float(duration[1]) < 60
    assert 'hive_orchestrator_assignments_total{outcome="assigned"} 4.0' in metrics
    assert 'hive_orchestrator_plan_submissions_total{result="created"} 1.0' in metrics
    assert "hive_orchestrator_plans_driven 0.0" in metrics

    # A finished plan cannot be cancelled.
    response = await flow.client().post("/api/v1/plans/release-1/cancel")
    assert response.status_code == 412, response.text
    assert response.json()["error"]["code"] == "FAILED_PRECONDITION"


async def test_failing_task_is_retried_then_fails_the_plan(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"], max_concurrent=4)
    plan: dict[str, Any] = {
        "plan_id": "fails",
        "tasks": [
            echo("prepare"),
            {
                "task_id": "flaky",
                "task_type": "fail",
                "required_capabilities": ["python"],
                "depends_on": ["prepare"],
                "parameters": {"message": "boom"},
                "max_retries": 2,
            },
            echo("after", "flaky"),
            echo("last", "after"),
        ],
    }
    configure_logging(level="INFO", fmt="json")  # an earlier test may have left WARNING
    with capture_logs() as logs:
        response = await flow.submit(plan)
        assert response.status_code == 202, response.text
        final = await flow.wait_settled("fails")
    assert final["status"] == "FAILED"
    assert "flaky" in final["error_message"]
    assert "3 attempts" in final["error_message"]
    # The log says why, not only that it failed.
    failed = [
        (e["event"], e.get("error"))
        for e in logs
        if e["event"] in ("plan status", "plan settled") and e["status"] == "FAILED"
    ]
    assert failed == [
        ("plan status", final["error_message"]),
        ("plan settled", final["error_message"]),
    ]
    tickets = flow.tasks(final)
    assert tickets["prepare"]["status"] == "COMPLETED"
    assert tickets["flaky"]["status"] == "FAILED"
    assert tickets["flaky"]["attempt"] == 3  # 1 + max_retries
    assert "boom" in tickets["flaky"]["error_message"]
    assert tickets["after"]["status"] == "CANCELLED"
    assert tickets["last"]["status"] == "CANCELLED"
    # Each cancelled ticket says why it will never run.
    assert tickets["after"]["error_message"] == (
        f"cancelled by the orchestrator: {final['error_message']}"
    )

    explained = await flow.client().get("/api/v1/plans/fails/tasks/after/explain")
    assert explained.status_code == 200, explained.text
    assert explained.json()["status"] == "CANCELLED"


async def test_a_retry_backoff_is_stored_with_its_attempt(flow: Flow, postgres_dsn: str) -> None:
    # The backoff used to be written before the re-queue's new attempt was stored, so its
    # UPDATE matched no row: backoff_until stayed null in the API, explain's "no later
    # than" moved on with every call, and a restart would start the wait over.
    await flow.start_orchestrator(backoff_base_seconds=60.0, backoff_cap_seconds=60.0)
    await flow.start_worker("w1", ["python"], max_concurrent=1)
    plan: dict[str, Any] = {
        "plan_id": "backs-off",
        "tasks": [
            {
                "task_id": "flaky",
                "task_type": "fail",
                "required_capabilities": ["python"],
                "parameters": {"message": "boom"},
                "max_retries": 1,
            }
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    body = await flow.wait_plan(
        "backs-off", lambda b: flow.tasks(b)["flaky"]["backoff_until"] is not None, "a backoff"
    )
    flaky = flow.tasks(body)["flaky"]
    assert flaky["attempt"] == 2
    assert flaky["status"] == "PENDING"
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute(
            "SELECT backoff_attempt, backoff_until FROM plan_tasks"
            " WHERE plan_id = 'backs-off' AND task_id = 'flaky'"
        )
        attempt, until = await cur.fetchone() or (None, None)
    assert attempt == 2
    assert until is not None
    assert until.isoformat() == flaky["backoff_until"]
    explained = (await flow.client().get("/api/v1/plans/backs-off/tasks/flaky/explain")).json()
    [backoff] = [r for r in explained["reasons"] if r["code"] == "RETRY_BACKOFF"]
    assert backoff["details"]["backoff_until"] == flaky["backoff_until"]
    assert (await flow.client().post("/api/v1/plans/backs-off/cancel")).status_code == 200


async def test_cancel_stops_everything_in_flight(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"], max_concurrent=2)
    plan: dict[str, Any] = {
        "plan_id": "to-cancel",
        "tasks": [
            {
                "task_id": "long",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 120},
            },
            echo("next", "long"),
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    await flow.wait_plan(
        "to-cancel",
        lambda b: flow.tasks(b)["long"]["status"] == "RUNNING",
        "the long task running",
    )
    explained = await flow.client().get("/api/v1/plans/to-cancel/explain")
    assert explained.status_code == 200
    waiting = {t["task_id"]: t for t in explained.json()["tasks"]}
    assert set(waiting) == {"next"}  # the running ticket is not listed
    assert waiting["next"]["reasons"][0]["code"] == "WAITING_ON_DEPENDENCIES"

    response = await flow.client().post("/api/v1/plans/to-cancel/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "CANCELLED"
    assert response.json()["cancel_requested"] is True

    final = await flow.wait_settled("to-cancel")
    assert final["status"] == "CANCELLED"
    assert {t["status"] for t in final["tickets"]} == {"CANCELLED"}

    again = await flow.client().post("/api/v1/plans/to-cancel/cancel")
    assert again.status_code == 200
    assert again.json()["cancel_requested"] is False


async def ticket_service_calls(flow: Flow, method: str) -> float:
    """How many calls of ``method`` the ticket service has handled (any status)."""
    assert flow.tickets.service is not None
    port = flow.tickets.service.runtime.metrics_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as metrics:
        text = (await metrics.get("/metrics")).text
    pattern = rf'grpc_server_handled_total{{[^}}]*grpc_method="{method}"[^}}]*}} (\S+)'
    return sum(float(count) for count in re.findall(pattern, text))


async def test_a_cancel_reports_its_tickets_in_batches(flow: Flow) -> None:
    # One UpdateTicketStatus call per ticket, one after the other: cancelling a plan of
    # 2,000 tickets held up every other plan of the replica for 7 s.
    await flow.start_orchestrator(ticket_batch_size=25)
    tasks = [
        {"task_id": f"t{i}", "task_type": "echo", "required_capabilities": ["nobody-has-it"]}
        for i in range(60)
    ]
    assert (await flow.submit({"plan_id": "many", "tasks": tasks})).status_code == 202
    await flow.wait_plan(
        "many", lambda b: all(t["ticket_id"] for t in b["tickets"]), "every ticket created"
    )
    singles = await ticket_service_calls(flow, "UpdateTicketStatus")
    batches = await ticket_service_calls(flow, "UpdateTicketStatuses")
    assert (await flow.client().post("/api/v1/plans/many/cancel")).status_code == 200
    final = await flow.wait_settled("many")
    assert {t["status"] for t in final["tickets"]} == {"CANCELLED"}
    assert {t["error_message"] for t in final["tickets"]} == {
        "cancelled by the orchestrator: cancelled on request"
    }
    assert await ticket_service_calls(flow, "UpdateTicketStatus") == singles
    assert await ticket_service_calls(flow, "UpdateTicketStatuses") == batches + 3  # 25+25+10


async def test_orchestrator_restart_mid_plan_still_finishes(flow: Flow) -> None:
    first = await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"], max_concurrent=2)
    plan: dict[str, Any] = {
        "plan_id": "survives",
        "tasks": [
            {
                "task_id": "first",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 1},
            },
            echo("second", "first"),
            echo("third", "second"),
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    await flow.wait_plan(
        "survives",
        lambda b: flow.tasks(b)["first"]["status"] == "RUNNING",
        "the first task running",
    )
    await flow.stop_orchestrator(first)

    # While no orchestrator runs, the first task finishes; nobody dispatches the second.
    async with flow.ticket_client() as client:

        async def first_done() -> bool:
            listed = await client.list_tickets(plan_id="survives")
            by_task = {t.task_id: t for t in listed.tickets}
            return bool(by_task["first"].status == ticket_pb.TICKET_STATUS_COMPLETED)

        await flow.wait_for(first_done, what="the first task completing")
        listed = await client.list_tickets(plan_id="survives")
        assert {t.task_id: t.status for t in listed.tickets}["second"] == (
            ticket_pb.TICKET_STATUS_PENDING
        )

    # A new process (new owner id) on the same database resumes and finishes the plan.
    second = await flow.start_orchestrator()
    assert second.driver.owner_id != first.driver.owner_id
    final = await flow.wait_settled("survives")
    assert final["status"] == "COMPLETED"
    assert {t["status"] for t in final["tickets"]} == {"COMPLETED"}
    assert {t["attempt"] for t in final["tickets"]} == {1}


async def test_plan_waits_for_a_missing_capability(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("cpu", ["python"])
    plan: dict[str, Any] = {
        "plan_id": "needs-gpu",
        "tasks": [echo("prep"), echo("train", "prep", caps=("gpu",))],
    }
    response = await flow.submit(plan)
    assert response.status_code == 202, response.text
    warnings = response.json()["warnings"]
    assert [w["field"] for w in warnings] == ["$.tasks[1].required_capabilities[0]"]
    assert warnings[0]["code"] == "capability_unavailable"

    await flow.wait_plan(
        "needs-gpu", lambda b: flow.tasks(b)["prep"]["status"] == "COMPLETED", "prep done"
    )
    explained = await flow.client().get("/api/v1/plans/needs-gpu/tasks/train/explain")
    assert explained.status_code == 200, explained.text
    reasons = explained.json()["reasons"]
    assert reasons[0]["code"] == "NO_CAPABLE_WORKER"
    assert reasons[0]["details"]["missing_capabilities"] == ["gpu"]
    assert flow.tasks(await flow.plan("needs-gpu"))["train"]["status"] == "PENDING"

    await flow.start_worker("gpu-box", ["python", "gpu"])
    final = await flow.wait_settled("needs-gpu")
    assert final["status"] == "COMPLETED"


async def test_tickets_waiting_for_workers_are_no_longer_counted_once_their_plan_is_cancelled(
    flow: Flow,
) -> None:
    # The gauge was only set by a dispatch round: it kept counting a cancelled plan's
    # tickets until some other plan had tickets to dispatch.
    await flow.start_orchestrator()
    plan = {"plan_id": "waits", "tasks": [echo("a", caps=("gpu",)), echo("b", caps=("gpu",))]}
    assert (await flow.submit(plan)).status_code == 202

    async def waiting(expected: float) -> bool:
        metrics = (await flow.client().get("/metrics")).text
        found = re.search(r"^hive_orchestrator_tickets_waiting_for_workers (\S+)$", metrics, re.M)
        return found is not None and float(found.group(1)) == expected

    await flow.wait_for(lambda: waiting(2.0), what="two tickets waiting for a worker")
    assert (await flow.client().post("/api/v1/plans/waits/cancel")).status_code == 200
    assert (await flow.wait_settled("waits"))["status"] == "CANCELLED"
    await flow.wait_for(lambda: waiting(0.0), what="no ticket waiting for a worker")


@pytest.mark.parametrize("sets", [3, 40], ids=["asks-per-set", "reads-the-workers"])
async def test_feasibility_asks_the_registry_about_the_plans_capability_sets(
    flow: Flow, sets: int
) -> None:
    # Up to 32 distinct sets the registry is asked about each (DiscoverWorkers); beyond,
    # the live workers are read. Same answers either way.
    await flow.start_orchestrator()
    await flow.start_worker("cpu", ["python", "shell"], max_concurrent=8)
    await flow.start_worker("gpu", ["gpu"])
    tasks = [
        echo("both", caps=("python", "shell")),  # one worker has both
        echo("split", caps=("python", "gpu")),  # offered, but not by one worker
        echo("rare", caps=("gpu", "quantum")),  # gpu offered, quantum by nobody
    ]
    tasks += [echo(f"x{i}", caps=("python", f"x{i}")) for i in range(sets - 3)]
    plan: dict[str, Any] = {"plan_id": f"feasibility-{sets}", "tasks": tasks}

    response = await flow.submit(plan)

    assert response.status_code == 202, response.text
    fields = [w["field"] for w in response.json()["warnings"]]
    assert fields == [
        "$.tasks[1].required_capabilities",
        "$.tasks[2].required_capabilities[1]",
        *(f"$.tasks[{i}].required_capabilities[1]" for i in range(3, sets)),
    ]
    strict = await flow.submit({**plan, "plan_id": f"strict-{sets}"}, strict="true")
    assert strict.status_code == 400, strict.text
    violations = strict.json()["error"]["details"]["field_violations"]
    assert [v["field"] for v in violations] == fields


async def test_more_workers_than_are_read_are_never_taken_for_gone(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading at most one worker, a page at a time, with two registered.
    monkeypatch.setattr(plans_module, "_WORKERS_PAGE", 1)
    monkeypatch.setattr(plans_module, "_MAX_WORKERS_READ", 1)
    await flow.start_orchestrator()
    await flow.start_worker("w1", ["python"])
    await flow.start_worker("w2", ["python"])
    tasks = [echo(f"x{i}", caps=("python", f"x{i}")) for i in range(40)]

    response = await flow.submit({"plan_id": "many-sets", "tasks": tasks})

    assert response.status_code == 202, response.text
    [warning] = response.json()["warnings"]
    assert warning["description"] == (
        "capability feasibility not checked: the plan requires more than 32 distinct"
        " capability sets and more than 1 workers are live"
    )
    explained = await flow.client().get("/api/v1/plans/many-sets/tasks/x0/explain")
    assert explained.status_code == 200, explained.text
    reasons = explained.json()["reasons"]
    assert "WORKERS_UNKNOWN" in [r["code"] for r in reasons]
    assert "NO_CAPABLE_WORKER" not in [r["code"] for r in reasons]


async def test_strict_mode_rejects_an_infeasible_plan(flow: Flow) -> None:
    await flow.start_orchestrator()
    await flow.start_worker("cpu", ["python"])
    plan: dict[str, Any] = {"plan_id": "strict", "tasks": [echo("a", caps=("quantum",))]}
    response = await flow.submit(plan, strict="true")
    assert response.status_code == 400, response.text
    violations = response.json()["error"]["details"]["field_violations"]
    assert violations[0]["field"] == "$.tasks[0].required_capabilities[0]"
    assert (await flow.client().get("/api/v1/plans/strict")).status_code == 404


async def test_a_stored_plan_resubmitted_is_not_checked_for_workers_again(flow: Flow) -> None:
    # A strict resubmission was a 400 ("nothing stored") for a plan that existed and ran,
    # once its workers were gone; any resubmission repeated the capability warnings.
    await flow.start_orchestrator()
    await flow.start_worker("gpu", ["gpu"])
    plan: dict[str, Any] = {"plan_id": "on-gpu", "tasks": [echo("a", caps=("gpu",))]}
    first = await flow.submit(plan, strict="true")
    assert first.status_code == 202, first.text
    await flow.wait_settled("on-gpu")
    await flow.stop_workers()
    again = await flow.submit(plan, strict="true")
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["warnings"] == []
    other = await flow.submit({**plan, "name": "another body"}, strict="true")
    assert other.status_code == 409, other.text


async def test_a_plan_is_decoded_validated_and_hashed_off_the_event_loop(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plan within the limits (5,000 tasks, a million dependencies) took seconds of CPU
    # on the event loop: every request and plan round of the replica waited (/health 4 s).
    app = await flow.start_orchestrator()
    threads: dict[str, bool] = {}

    def spy(name: str, work: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            threads[name] = threading.current_thread() is threading.main_thread()
            return work(*args, **kwargs)

        return run

    validator = app.plans._validator
    monkeypatch.setattr(validator, "validate", spy("validate", validator.validate))
    monkeypatch.setattr(plans_module, "plan_body_hash", spy("hash", plan_body_hash))
    monkeypatch.setattr(routes_module, "decode_json", spy("decode", decode_json))
    response = await flow.submit({"plan_id": "off-loop", "tasks": [echo("a")]})
    assert response.status_code == 202, response.text
    assert threads == {"decode": False, "validate": False, "hash": False}


async def test_huge_plans_create_tickets_in_chunks(flow: Flow, tickets_dsn: str) -> None:
    await flow.start_orchestrator(ticket_batch_size=3)
    await flow.start_worker("w1", ["python"], max_concurrent=8)
    leaves = [echo(f"leaf{n}") for n in range(10)]
    plan = {"plan_id": "wide", "tasks": [*leaves, echo("join", *(t["task_id"] for t in leaves))]}
    response = await flow.submit(plan)
    assert response.status_code == 202, response.text
    ticket_ids = response.json()["ticket_ids"]
    assert len(set(ticket_ids.values())) == 11
    assert None not in ticket_ids.values()
    final = await flow.wait_settled("wide")
    assert final["status"] == "COMPLETED"
    async with flow.ticket_client() as client:
        listed = await client.list_tickets(plan_id="wide", page_size=100)
    assert {t.ticket_id for t in listed.tickets} == set(ticket_ids.values())
    # One chunk per scheduling round: the first tickets were assigned before the last
    # ones were created (in the ticket service's event log).
    async with await psycopg.AsyncConnection.connect(tickets_dsn) as conn:
        cur = await conn.execute(
            "SELECT min(seq) FILTER (WHERE event_type = 'ASSIGNED'),"
            " max(seq) FILTER (WHERE event_type = 'CREATED')"
            " FROM ticket_events WHERE plan_id = 'wide'"
        )
        first_assigned, last_created = await cur.fetchone() or (None, None)
    assert first_assigned is not None
    assert last_created is not None
    assert first_assigned < last_created


def large_plan(plan_id: str) -> dict[str, Any]:
    """90 tasks with 50 KB of parameters each: ~4.5 MB, more than one gRPC message holds
    (4 MiB), so no call may carry all of their tickets."""
    tasks = [echo(f"t{n:02}", parameters={"blob": "x" * 50_000, "n": n}) for n in range(90)]
    return {"plan_id": plan_id, "tasks": tasks}


async def test_a_plan_whose_tickets_exceed_one_grpc_message_completes(flow: Flow) -> None:
    # Re-read often: every listing of the plan's tickets (parameters and results) is
    # larger than one message too.
    await flow.start_orchestrator(max_request_bytes=8 * 1024 * 1024, resync_interval_seconds=0.5)
    await flow.start_worker("w1", ["python"], max_concurrent=8)
    await flow.start_worker("w2", ["python"], max_concurrent=8)
    response = await flow.submit(large_plan("big"))
    assert response.status_code == 202, response.text
    assert response.json()["tickets_created"] is True
    assert None not in response.json()["ticket_ids"].values()
    final = await flow.wait_settled("big")
    assert final["status"] == "COMPLETED", final["error_message"]
    assert final["counts"]["COMPLETED"] == 90
    async with flow.ticket_client() as client:
        results = [cast(float, t.result["n"]) async for t in client.iter_tickets(plan_id="big")]
    assert sorted(results) == list(range(90))


async def test_tickets_the_ticket_service_cannot_receive_fail_the_plan_visibly(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the orchestrator's byte bound were above the ticket service's message limit:
    # one BatchCreateTickets call carries every ticket and is refused (RESOURCE_EXHAUSTED).
    monkeypatch.setattr(driver_module, "TICKET_CALL_BYTES", 64 * 1024 * 1024)
    await flow.start_orchestrator(max_request_bytes=8 * 1024 * 1024)
    response = await flow.submit(large_plan("too-big"))
    assert response.status_code == 202, response.text
    final = await flow.wait_settled("too-big")
    assert final["status"] == "FAILED"
    assert "the ticket service refused the plan's tickets" in final["error_message"]


async def test_a_failed_attempt_is_retried_on_another_worker(flow: Flow) -> None:
    # The retry went back to the worker the attempt failed on (a frozen one included)
    # whenever the registry ranked it first.
    await flow.start_orchestrator()
    ran_on: list[tuple[int, str]] = []
    for name in ("w1", "w2"):
        worker = await flow.start_worker(name, ["python"], max_concurrent=1)

        async def flaky(params: dict[str, Any], ctx: Any, name: str = name) -> dict[str, Any]:
            ran_on.append((ctx.attempt, name))
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            return {}

        worker.add_task("flaky", flaky)
    task = {"task_id": "f", "task_type": "flaky", "required_capabilities": ["python"]}
    response = await flow.submit({"plan_id": "elsewhere", "tasks": [task | {"max_retries": 1}]})
    assert response.status_code == 202, response.text
    final = await flow.wait_settled("elsewhere")
    assert final["status"] == "COMPLETED", final
    assert [attempt for attempt, _ in ran_on] == [1, 2]
    assert ran_on[0][1] != ran_on[1][1], ran_on


async def test_without_fail_fast_independent_branches_finish(flow: Flow) -> None:
    await flow.start_orchestrator(fail_fast=False)
    await flow.start_worker("w1", ["python"], max_concurrent=4)
    plan: dict[str, Any] = {
        "plan_id": "partial",
        "tasks": [
            {
                "task_id": "broken",
                "task_type": "fail",
                "required_capabilities": ["python"],
                "parameters": {"message": "nope", "permanent": True},
                "max_retries": 3,
            },
            echo("needs-broken", "broken"),
            {
                "task_id": "independent",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 1},
            },
            echo("after-independent", "independent"),
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    final = await flow.wait_settled("partial")
    assert final["status"] == "FAILED"
    tickets = flow.tasks(final)
    assert tickets["broken"]["status"] == "FAILED"
    assert tickets["broken"]["attempt"] == 1  # a permanent failure is not retried
    assert tickets["needs-broken"]["status"] == "CANCELLED"
    assert tickets["independent"]["status"] == "COMPLETED"
    assert tickets["after-independent"]["status"] == "COMPLETED"


async def test_tickets_the_ticket_service_refuses_fail_the_plan(flow: Flow) -> None:
    # Misconfiguration: the ticket service takes smaller parameters than the orchestrator.
    flow.ticket_settings = flow.ticket_settings.model_copy(update={"max_parameters_bytes": 1024})
    await flow.stop_ticket_service()
    await flow.start_ticket_service()
    await flow.start_orchestrator(ticket_batch_size=1)
    plan = {
        "plan_id": "refused",
        "tasks": [echo("small"), echo("big", "small") | {"parameters": {"blob": "x" * 2000}}],
    }
    response = await flow.submit(plan)
    assert response.status_code == 202, response.text
    final = await flow.wait_settled("refused")
    assert final["status"] == "FAILED"
    assert "refused the plan's tickets" in final["error_message"]
    tickets = flow.tasks(final)
    assert tickets["small"]["status"] == "CANCELLED"  # created in the first chunk
    assert tickets["big"]["ticket_id"] is None


async def test_a_slot_freed_by_one_plan_serves_a_plan_waiting_for_a_worker(flow: Flow) -> None:
    # No periodic retry or resync within the test's bounds: only the completion of the
    # first plan's ticket (a freed slot) can get the second plan's ticket assigned.
    await flow.start_orchestrator(dispatch_retry_seconds=3600, resync_interval_seconds=3600)
    worker = await flow.start_worker("only", ["python"], max_concurrent=1)
    first: dict[str, Any] = {
        "plan_id": "first",
        "tasks": [
            {
                "task_id": "hold",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 2},
            }
        ],
    }
    assert (await flow.submit(first)).status_code == 202
    await flow.wait_plan(
        "first", lambda b: flow.tasks(b)["hold"]["status"] == "RUNNING", "the slot taken"
    )
    # Submitted while the only slot is held (for 2 s), so it must wait for a worker.
    assert (await flow.submit({"plan_id": "second", "tasks": [echo("next")]})).status_code == 202

    final = await flow.wait_settled("second")
    assert final["status"] == "COMPLETED"
    done_first = await flow.wait_settled("first")
    assert done_first["status"] == "COMPLETED"
    async with flow.ticket_client() as client:
        held = (await client.list_tickets(plan_id="first")).tickets[0]
        waited = (await client.list_tickets(plan_id="second")).tickets[0]
    assert held.worker_id == waited.worker_id == worker.worker_id
    # The one slot was used in turn: the second ticket started after the first finished.
    assert held.completed_at.ToDatetime() <= waited.started_at.ToDatetime()


async def test_a_freed_slot_goes_to_the_highest_priority_plan_waiting(flow: Flow) -> None:
    # The slot a LOW plan's ticket frees goes to the CRITICAL plan waiting for a worker,
    # not to the LOW plan's next ticket: the completing plan used to take it first (its
    # round ran; the waiting plan, earlier in priority order, had been passed over).
    await flow.start_orchestrator(dispatch_retry_seconds=3600, resync_interval_seconds=3600)
    worker = await flow.start_worker("only", ["python"], max_concurrent=1)
    release = asyncio.Event()

    async def hold(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await release.wait()
        return {}

    worker.add_task("hold", hold)
    low = {
        "plan_id": "low",
        "priority": "LOW",
        "tasks": [
            {"task_id": f"l{n}", "task_type": "hold", "required_capabilities": ["python"]}
            for n in range(4)
        ],
    }
    assert (await flow.submit(low)).status_code == 202
    await flow.wait_plan(
        "low",
        lambda b: any(t["status"] == "RUNNING" for t in b["tickets"]),
        "the slot taken",
    )
    critical = {"plan_id": "critical", "priority": "CRITICAL", "tasks": [echo("c")]}
    assert (await flow.submit(critical)).status_code == 202

    async def waiting_for_capacity() -> bool:
        explained = await flow.client().get("/api/v1/plans/critical/tasks/c/explain")
        return any(r["code"] == "NO_WORKER_CAPACITY" for r in explained.json()["reasons"])

    await flow.wait_for(waiting_for_capacity, what="the CRITICAL plan waiting for the slot")
    release.set()
    await flow.wait_settled("critical")
    await flow.wait_settled("low")
    async with flow.ticket_client() as client:
        tickets = [
            *(await client.list_tickets(plan_id="low")).tickets,
            *(await client.list_tickets(plan_id="critical")).tickets,
        ]
    started = sorted(tickets, key=lambda t: t.started_at.ToDatetime())
    assert [t.plan_id for t in started[:2]] == ["low", "critical"]


async def test_a_worker_full_with_another_replicas_tickets_gets_no_more(flow: Flow) -> None:
    # Each replica counted only its own assignments, and the registry the worker's last
    # heartbeat: two replicas filled a 4-slot worker with 8 tickets. The ticket service
    # now checks each assignment against the worker's max_concurrent.
    await flow.start_orchestrator(dispatch_retry_seconds=0.3)
    async with RegistryClient.connect(flow.registry_target) as registry:
        # A worker that holds a ticket the registry does not know of yet (no heartbeat
        # since: its in_flight says 0).
        registered = await registry.register(
            name="one-slot",
            capabilities=["solo"],
            max_concurrent=1,
            token=flow.registration_secret,
            instance_id="i-1",
        )
    worker_id = registered.worker.worker_id
    async with flow.ticket_client() as client:
        foreign = (
            await client.create_ticket(
                spec=ticket_pb.TicketSpec(plan_id="elsewhere", task_id="held", task_type="echo")
            )
        ).ticket
        await client.assign_ticket(ticket_id=foreign.ticket_id, worker_id=worker_id, attempt=1)
        plan = {"plan_id": "waits-for-the-slot", "tasks": [echo("next", caps=("solo",))]}
        assert (await flow.submit(plan)).status_code == 202

        async def refused_as_full() -> bool:
            metrics = (await flow.client().get("/metrics")).text
            return 'hive_orchestrator_assignments_total{outcome="worker_full"}' in metrics

        await flow.wait_for(refused_as_full, what="an assignment refused for a full worker")
        body = await flow.plan("waits-for-the-slot")
        assert flow.tasks(body)["next"]["status"] == "PENDING"
        # The slot frees: the task gets it.
        await client.update_ticket_status(
            ticket_id=foreign.ticket_id, status=ticket_pb.TICKET_STATUS_CANCELLED, attempt=0
        )
        await flow.wait_plan(
            "waits-for-the-slot",
            lambda b: flow.tasks(b)["next"]["worker_id"] == worker_id,
            "the task assigned to the freed slot",
        )


async def test_a_worker_with_a_free_slot_ranked_below_a_hundred_full_ones_is_used(
    flow: Flow,
) -> None:
    # Discovery asks for 100 workers, full ones included: 100 full workers with good
    # records filled the answer, and the one with a free slot was never offered.
    await flow.start_orchestrator()
    async with RegistryClient.connect(flow.registry_target) as registry:

        async def worker(
            name: str,
            *,
            max_concurrent: int,
            in_flight: int,
            succeeded_total: int | None = None,
            failed_total: int | None = None,
        ) -> str:
            registered = await registry.register(
                name=name,
                capabilities=["crowd"],
                max_concurrent=max_concurrent,
                token=flow.registration_secret,
                instance_id=name,
            )
            await registry.heartbeat(
                worker_id=registered.worker.worker_id,
                token=registered.token,
                in_flight=in_flight,
                succeeded_total=succeeded_total,
                failed_total=failed_total,
            )
            return registered.worker.worker_id

        # Ranked below every full one: one slot in ten free, a poor record, older.
        spare = await worker(
            "spare", max_concurrent=10, in_flight=9, succeeded_total=0, failed_total=20
        )
        for n in range(100):
            await worker(f"full-{n}", max_concurrent=1, in_flight=1, succeeded_total=50)
        plan = {"plan_id": "finds-the-spare-slot", "tasks": [echo("only", caps=("crowd",))]}
        assert (await flow.submit(plan)).status_code == 202
        await flow.wait_plan(
            "finds-the-spare-slot",
            lambda b: flow.tasks(b)["only"]["worker_id"] == spare,
            "the task assigned to the worker with a free slot",
        )
