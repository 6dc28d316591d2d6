"""Plans through the whole system: the services and two workers as separate processes."""

from __future__ import annotations

import pytest

from .conftest import FlowStack, diamond_plan, new_plan_id, task, wait_audit_complete

pytestmark = pytest.mark.integration


def test_a_diamond_plan_completes_with_every_status_change_audited_in_order(
    stack: FlowStack,
) -> None:
    plan_id = new_plan_id("diamond")
    response = stack.submit(diamond_plan(plan_id))
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["created"] is True
    assert sorted(submitted["ticket_ids"]) == ["a", "b", "c", "d"]

    plan = stack.wait_plan_settled(plan_id)
    assert plan["status"] == "COMPLETED", plan
    assert plan["counts"].get("COMPLETED") == 4, plan["counts"]
    assert {t["task_id"]: t["ticket_id"] for t in plan["tickets"]} == submitted["ticket_ids"]

    tickets = {t["task_id"]: t for t in stack.tickets(plan_id)}
    assert sorted(tickets) == ["a", "b", "c", "d"]
    assert all(t["status"] == "COMPLETED" for t in tickets.values()), tickets
    # Dependencies ran first: each dependent started after its dependencies finished.
    for dependent, dependencies in {"b": "a", "c": "a", "d": "bc"}.items():
        for dependency in dependencies:
            assert tickets[dependency]["completed_at"] <= tickets[dependent]["started_at"]
    assert tickets["b"]["result"] == {"slept_seconds": 0.2}
    assert tickets["d"]["result"] == {"task": "d"}
    # Both workers are registered; the work was done by registered workers only.
    worker_ids = {w["worker_id"] for w in stack.workers()}
    assert {t["worker_id"] for t in tickets.values()} <= worker_ids

    audited = wait_audit_complete(stack, plan_id)
    changes = stack.audit("status_change_events", plan_id)
    trail = stack.audit("audit_trail", plan_id)
    for ticket in audited:
        statuses = [e["status"] for e in changes[ticket["ticket_id"]]]
        # One attempt each, no fault: exactly the happy path.
        assert statuses == ["ASSIGNED", "RUNNING", "COMPLETED"], (
            ticket["task_id"],
            statuses,
        )
        assert trail[ticket["ticket_id"]][0]["type"] == "CREATED"


def test_resubmitting_the_same_plan_creates_nothing_new(stack: FlowStack) -> None:
    plan_id = new_plan_id("again")
    plan = diamond_plan(plan_id)
    first = stack.submit(plan)
    assert first.status_code == 202, first.text
    ticket_ids = first.json()["ticket_ids"]
    assert len(ticket_ids) == 4

    again = stack.submit(plan)  # while the plan runs
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    assert again.json()["ticket_ids"] == ticket_ids

    assert stack.wait_plan_settled(plan_id)["status"] == "COMPLETED"
    after = stack.submit(plan)  # and once it is done
    assert after.status_code == 200, after.text
    assert after.json()["ticket_ids"] == ticket_ids
    assert after.json()["status"] == "COMPLETED"

    tickets = stack.tickets(plan_id)
    assert sorted(t["ticket_id"] for t in tickets) == sorted(ticket_ids.values())
    # The same plan id with a different body is a conflict, and changes nothing either.
    changed = diamond_plan(plan_id)
    changed["tasks"].append(task("e", depends_on=("d",)))
    conflict = stack.submit(changed)
    assert conflict.status_code == 409, conflict.text
    assert len(stack.tickets(plan_id)) == 4
    assert len(stack.plan(plan_id)["tickets"]) == 4


def test_an_invalid_plan_is_rejected_with_json_paths(stack: FlowStack) -> None:
    plan_id = new_plan_id("invalid")
    plan = {
        "plan_id": plan_id,
        "tasks": [
            task("a", depends_on=("c",)),
            task("b", depends_on=("a", "ghost")),
            task("c", depends_on=("b",)),
            {"task_id": "a", "task_type": "echo", "max_retries": "three"},
        ],
    }
    response = stack.submit(plan)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    fields = {v["field"]: v["description"] for v in error["details"]["field_violations"]}
    assert "$.tasks[1].depends_on[1]" in fields  # "ghost" does not exist
    assert "$.tasks[3].task_id" in fields  # duplicate "a"
    assert "$.tasks[3].max_retries" in fields  # wrong type
    cycle = [d for d in fields.values() if "a -> " in d or "-> a" in d]
    assert cycle, fields  # the cycle a -> c -> b -> a is reported with its path

    missing = stack.http.get(f"{stack.orchestrator_url}/api/v1/plans/{plan_id}")
    assert missing.status_code == 404
    assert stack.tickets(plan_id) == []
