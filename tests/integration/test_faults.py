"""Faults injected into the running system: a worker killed with SIGKILL mid-task, the ticket
service restarted mid-plan, MongoDB stopped mid-plan, the orchestrator killed with SIGKILL
mid-plan. Every plan must still complete, with no duplicate ticket and a complete audit
trail."""

from __future__ import annotations

from typing import Any

import pytest

from hive_testsupport.databases import MongoServer

from .conftest import (
    FlowStack,
    diamond_plan,
    new_plan_id,
    task,
    wait_audit_complete,
    wait_for,
)

pytestmark = pytest.mark.integration


def submit(stack: FlowStack, plan: dict[str, Any]) -> dict[str, str]:
    response = stack.submit(plan)
    assert response.status_code == 202, response.text
    ticket_ids: dict[str, str] = response.json()["ticket_ids"]
    assert sorted(ticket_ids) == sorted(t["task_id"] for t in plan["tasks"])
    return ticket_ids


def wait_running(stack: FlowStack, ticket_id: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        ticket = stack.ticket(ticket_id)
        return ticket if ticket["status"] == "RUNNING" else None

    return wait_for(running, what=f"ticket {ticket_id} to be RUNNING")


def assert_no_duplicates(stack: FlowStack, plan_id: str, ticket_ids: dict[str, str]) -> None:
    tickets = stack.tickets(plan_id)
    assert sorted(t["ticket_id"] for t in tickets) == sorted(ticket_ids.values())
    assert {t["task_id"]: t["ticket_id"] for t in tickets} == ticket_ids
    plan = stack.plan(plan_id)
    assert {t["task_id"]: t["ticket_id"] for t in plan["tickets"]} == ticket_ids


def test_a_worker_killed_mid_task_loses_its_ticket_to_the_other_worker(stack: FlowStack) -> None:
    plan_id = new_plan_id("kill")
    plan = {
        "plan_id": plan_id,
        "tasks": [
            # Long enough to be caught running even on a busy machine; a short timeout, so the
            # RUNNING lease of the dead worker's attempt ends soon.
            task("slow", "sleep", parameters={"seconds": 2.0}, timeout_seconds=4, max_retries=3),
            task("after", depends_on=("slow",)),
        ],
    }
    ticket_ids = submit(stack, plan)
    running = wait_running(stack, ticket_ids["slow"])
    victim_id = running["worker_id"]
    (victim,) = [w["name"] for w in stack.workers() if w["worker_id"] == victim_id]
    assert stack.processes[victim].kill() == -9

    settled = stack.wait_plan_settled(plan_id)
    assert settled["status"] == "COMPLETED", settled
    slow = stack.ticket(ticket_ids["slow"])
    assert slow["status"] == "COMPLETED"
    assert slow["attempt"] >= 2
    survivor_ids = {w["worker_id"] for w in stack.workers() if w["name"] != victim}
    assert slow["worker_id"] in survivor_ids
    assert_no_duplicates(stack, plan_id, ticket_ids)

    wait_audit_complete(stack, plan_id)
    changes = stack.audit("status_change_events", plan_id)[ticket_ids["slow"]]
    statuses = [(e["previous_status"], e["status"], e["attempt"]) for e in changes]
    # The dead worker's attempt went back to PENDING as a new attempt.
    assert ("RUNNING", "PENDING", 2) in statuses, statuses
    assert statuses[-1] == ("RUNNING", "COMPLETED", slow["attempt"]), statuses


def test_the_ticket_service_restarted_mid_plan(stack: FlowStack) -> None:
    plan_id = new_plan_id("restart")
    plan = diamond_plan(plan_id)
    plan["tasks"][0] = task("a", "sleep", parameters={"seconds": 1.0})
    ticket_ids = submit(stack, plan)
    wait_running(stack, ticket_ids["a"])

    tickets_service = stack.processes["execution-ticket-service"]
    assert tickets_service.stop() == 0  # SIGTERM: drained, not killed
    tickets_service.start()
    tickets_service.wait_ready()

    settled = stack.wait_plan_settled(plan_id)
    assert settled["status"] == "COMPLETED", settled
    assert_no_duplicates(stack, plan_id, ticket_ids)
    assert all(t["status"] == "COMPLETED" for t in stack.tickets(plan_id))
    wait_audit_complete(stack, plan_id)


def test_mongodb_stopped_mid_plan(stack: FlowStack, mongo_server: MongoServer) -> None:
    plan_id = new_plan_id("mongo")
    plan = diamond_plan(plan_id)
    plan["tasks"][0] = task("a", "sleep", parameters={"seconds": 1.0})
    ticket_ids = submit(stack, plan)
    wait_running(stack, ticket_ids["a"])
    mongo_server.stop()

    # Ticket operations never wait for the audit: the plan completes during the outage.
    settled = stack.wait_plan_settled(plan_id)
    assert settled["status"] == "COMPLETED", settled
    assert not mongo_server.is_running

    def degraded() -> dict[str, Any] | None:
        response = stack.http.get(f"{stack.tickets_url}/ready")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and "degraded" in response.text else None

    wait_for(degraded, what="the ticket service to report MongoDB degraded")

    mongo_server.start()
    tickets = wait_audit_complete(stack, plan_id)
    assert sorted(t["ticket_id"] for t in tickets) == sorted(ticket_ids.values())
    assert all(t["status"] == "COMPLETED" for t in tickets)


def test_the_orchestrator_killed_mid_plan_and_started_again(stack: FlowStack) -> None:
    plan_id = new_plan_id("crash")
    plan = diamond_plan(plan_id)
    plan["tasks"][0] = task("a", "sleep", parameters={"seconds": 1.0})
    ticket_ids = submit(stack, plan)
    wait_running(stack, ticket_ids["a"])

    orchestrator = stack.processes["orchestrator-dynamic"]
    assert orchestrator.kill() == -9  # no chance to release its plan lease
    orchestrator.start()
    orchestrator.wait_ready()

    # The new process takes the plan over once the dead owner's lease expires.
    settled = stack.wait_plan_settled(plan_id)
    assert settled["status"] == "COMPLETED", settled
    assert_no_duplicates(stack, plan_id, ticket_ids)
    wait_audit_complete(stack, plan_id)
