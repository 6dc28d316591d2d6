"""``hive`` against the real orchestrator, ticket service, registry and reference workers."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from datetime import datetime
from typing import Any

import pytest

from hive_cli.cli import main
from hive_cli.exit_codes import ExitCode

from .conftest import EXAMPLES, WATCH_TIMEOUT_SECONDS, Stack

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

WATCH = ("--watch", "--interval", "0.2", "--timeout", str(WATCH_TIMEOUT_SECONDS))


def plan_id_of(out: str) -> str:
    """The id from the first line ``plan <id> submitted: ...``."""
    first = out.splitlines()[0].split()
    assert first[0] == "plan", out
    return first[1]


def echo_plan(plan_id: str | None = None, *tasks: str, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "name": "cli test",
        "tasks": [
            {
                "task_id": task,
                "task_type": "echo",
                "required_capabilities": ["python"],
                "parameters": {"task": task},
            }
            for task in (tasks or ("only",))
        ],
        **extra,
    }
    if plan_id is not None:
        body["plan_id"] = plan_id
    return json.dumps(body).encode()


async def test_wide_plan_is_watched_to_completed(stack: Stack) -> None:
    run = await stack.hive("plan", "submit", str(EXAMPLES / "wide.json"), *WATCH)
    assert run.code == ExitCode.OK, run.err + run.out
    plan_id = plan_id_of(run.out)
    lines = run.out.splitlines()
    assert lines[0] == f"plan {plan_id} submitted: PENDING, 14 tasks"
    printed_tickets = {
        parts[0]: parts[1]
        for parts in (line.split() for line in lines[1:])
        if len(parts) == 2 and (parts[0] in ("prepare", "collect") or parts[0].startswith("shard-"))
    }
    assert len(printed_tickets) == 14
    # Not a terminal: plain progress lines, the last one at 100%, then the summary.
    assert "\r" not in run.out
    progress = [line for line in lines if line.startswith(("PENDING ", "RUNNING ", "COMPLETED "))]
    assert progress
    assert progress[-1].startswith("COMPLETED [##")
    assert " 14/14 100%" in progress[-1]
    assert lines[-1].startswith(f"plan {plan_id} COMPLETED after ")
    assert lines[-1].endswith(": 14/14 tasks finished")

    status = await stack.hive("-o", "json", "plan", "status", plan_id)
    assert status.code == ExitCode.OK
    body = status.json()
    assert body["status"] == "COMPLETED"
    assert {s: n for s, n in body["counts"].items() if n} == {"COMPLETED": 14}
    assert {t["task_id"]: t["ticket_id"] for t in body["tickets"]} == printed_tickets

    tickets = await stack.hive("tickets", "list", "--plan", plan_id, "-o", "json", "--all")
    assert tickets.code == ExitCode.OK
    listed = tickets.json()["tickets"]
    assert {t["ticket_id"] for t in listed} == set(printed_tickets.values())
    assert {t["status"] for t in listed} == {"COMPLETED"}

    table = await stack.hive("tickets", "list", "--plan", plan_id, "--status", "completed")
    assert table.code == ExitCode.OK
    rows = table.out.splitlines()
    assert rows[0].split()[:5] == ["TICKET", "PLAN", "TASK", "TYPE", "STATUS"]
    assert len(rows) == 15
    assert all(row.split()[1] == plan_id and row.split()[4] == "COMPLETED" for row in rows[1:])


RETRY_FAILURES = [
    "retry   flaky attempt 1 failed: simulated transient error",
    "retry   flaky attempt 2 failed: simulated transient error",
    "FAILED  flaky (attempt 3): simulated transient error",
]


def failure_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("retry ", "FAILED  flaky"))]


async def test_failing_plan_exits_1_and_names_the_failed_task(stack: Stack) -> None:
    run = await stack.hive("plan", "submit", str(EXAMPLES / "retry.json"), *WATCH)
    assert run.code == ExitCode.PLAN_UNSUCCESSFUL, run.err + run.out
    plan_id = plan_id_of(run.out)
    # Every failed attempt once, in order, as it happens. (A failure seen only at the
    # last poll may miss its message: the audit trail lags the ticket by a moment.)
    assert [line.partition(":")[0] for line in failure_lines(run.out)] == [
        line.partition(":")[0] for line in RETRY_FAILURES
    ]
    assert failure_lines(run.out)[-1] == RETRY_FAILURES[-1]
    assert f"plan {plan_id} FAILED after " in run.out
    summary = run.out[run.out.index(f"plan {plan_id} FAILED after ") :].splitlines()
    assert any(line.startswith("  FAILED    flaky: ") for line in summary)

    explained = await stack.hive("plan", "explain", plan_id, "flaky")
    assert explained.code == ExitCode.OK
    assert explained.out.startswith("flaky  FAILED  attempt 3/3")

    # A task's result and a ticket's history, from the ticket service.
    ids = {
        t["task_id"]: t["ticket_id"]
        for t in (await stack.hive("-o", "json", "plan", "status", plan_id)).json()["tickets"]
    }
    setup = await stack.hive("tickets", "show", ids["setup"])
    assert setup.code == ExitCode.OK, setup.err
    assert "status      COMPLETED, attempt 1 of 1" in setup.out
    assert setup.out.endswith('result:\n  {\n    "step": "setup"\n  }\n'), setup.out
    for _ in range(50):  # the audit relay delivers the last event within about a second
        flaky = (await stack.hive("-o", "json", "tickets", "show", ids["flaky"], "--events")).json()
        if flaky["events"][-1]["status"] == "FAILED":
            break
        await asyncio.sleep(0.2)
    assert flaky["status"] == "FAILED"
    assert flaky["error_message"] == "simulated transient error"
    # Attempts 1 and 2 failed and were requeued; attempt 3 failed for good.
    ends = [(e["type"], e["attempt"]) for e in flaky["events"] if e["previous_status"] == "RUNNING"]
    assert ends == [("REQUEUED", 2), ("REQUEUED", 3), ("STATUS_CHANGED", 3)]
    assert flaky["events"][-1]["status"] == "FAILED"


async def test_failed_attempts_between_two_polls_come_from_the_ticket_events(
    stack: Stack,
) -> None:
    # The first poll comes right after the submission; the retries all happen before the
    # next one, so only the ticket's audit events can tell about attempts 1 and 2.
    slow_watch = ("--watch", "--interval", "5", "--timeout", str(WATCH_TIMEOUT_SECONDS))
    run = await stack.hive("plan", "submit", str(EXAMPLES / "retry.json"), *slow_watch)
    assert run.code == ExitCode.PLAN_UNSUCCESSFUL, run.err + run.out
    assert failure_lines(run.out) == RETRY_FAILURES
    plan_id = plan_id_of(run.out)
    # The plan's own run time, not the time spent watching (a multiple of 5 s here).
    status = (await stack.hive("-o", "json", "plan", "status", plan_id)).json()
    run_time = datetime.fromisoformat(status["completed_at"]) - datetime.fromisoformat(
        status["created_at"]
    )
    assert f"plan {plan_id} FAILED after {run_time.total_seconds():.1f}s: " in run.out


async def test_shell_example_runs_on_the_shell_worker(stack: Stack) -> None:
    run = await stack.hive("-o", "json", "plan", "submit", str(EXAMPLES / "shell.json"), *WATCH)
    assert run.code == ExitCode.OK, run.err + run.out
    final = run.json()
    assert final["status"] == "COMPLETED"
    assert final["created"] is True
    assert set(final["ticket_ids"]) == {"hello", "argv-form", "pause", "done"}
    # Progress went to stderr so stdout is one JSON document.
    assert "COMPLETED [" in run.err
    tickets = await stack.hive("-o", "json", "tickets", "list", "--plan", final["plan_id"])
    results = {t["task_id"]: t["result"] for t in tickets.json()["tickets"]}
    assert results["hello"]["stdout"] == "hello from hive\n"
    assert results["hello"]["exit_code"] == 0
    assert results["argv-form"]["stdout"] == "no shell: $HOME ; | stay as written\n"


async def test_invalid_plan_exits_2_with_every_json_path(stack: Stack) -> None:
    run = await stack.hive("plan", "submit", str(EXAMPLES / "invalid.json"), "--watch")
    assert run.code == ExitCode.USAGE
    assert run.out == ""
    assert run.err.startswith("error: INVALID_ARGUMENT: ")
    for line in (
        "  $.tasks[1].task_type: is required",
        "  $.tasks[3].task_id: task id 'a' is already used by $.tasks[0]",
        "  $.tasks[1].depends_on[1]: depends on 'missing', which is not a task of this plan",
        "  $.tasks[0].depends_on[0]: dependency cycle: a -> c -> b -> a",
    ):
        assert line in run.err, run.err
    as_json = await stack.hive("-o", "json", "plan", "submit", str(EXAMPLES / "invalid.json"))
    assert as_json.code == ExitCode.USAGE
    violations = json.loads(as_json.err)["error"]["details"]["field_violations"]
    assert {v["field"] for v in violations} >= {"$.tasks[1].task_type", "$.tasks[3].task_id"}


async def test_unserved_capability_strict_explain_and_cancel(stack: Stack) -> None:
    plan = json.dumps(
        {
            "name": "needs a gpu",
            "tasks": [
                {"task_id": "train", "task_type": "echo", "required_capabilities": ["gpu"]},
                {"task_id": "eval", "task_type": "echo", "depends_on": ["train"]},
            ],
        }
    ).encode()
    strict = await stack.hive("plan", "submit", "-", "--strict", stdin=plan)
    assert strict.code == ExitCode.USAGE
    assert "  $.tasks[0].required_capabilities[0]: " in strict.err

    lenient = await stack.hive("plan", "submit", "-", stdin=plan)
    assert lenient.code == ExitCode.OK, lenient.err
    plan_id = plan_id_of(lenient.out)
    assert "warning: $.tasks[0].required_capabilities[0]: " in lenient.out

    explained = await stack.hive("plan", "explain", plan_id)
    assert explained.code == ExitCode.OK
    blocks = explained.out.split("\n\n")
    assert [block.split()[0] for block in blocks] == ["train", "eval"]
    assert "gpu" in blocks[0]
    as_json = await stack.hive("-o", "json", "plan", "explain", plan_id, "eval")
    assert as_json.json()["task_id"] == "eval"

    cancelled = await stack.hive("plan", "cancel", plan_id)
    assert cancelled.code == ExitCode.OK, cancelled.err
    assert cancelled.out.startswith(f"plan {plan_id}: cancel requested")
    watched = await stack.hive("plan", "watch", plan_id, "--interval", "0.2")
    assert watched.code == ExitCode.PLAN_UNSUCCESSFUL
    assert f"plan {plan_id} CANCELLED" in watched.out
    again = await stack.hive("plan", "cancel", plan_id)
    assert again.code == ExitCode.OK
    assert again.out.strip() == f"plan {plan_id} was already cancelled"


async def test_unknown_plan_and_task_exit_3(stack: Stack) -> None:
    for argv in (
        ("plan", "status", "no-such-plan"),
        ("plan", "watch", "no-such-plan"),
        ("plan", "cancel", "no-such-plan"),
        ("plan", "explain", "no-such-plan"),
    ):
        run = await stack.hive(*argv)
        assert run.code == ExitCode.NOT_FOUND, (argv, run.err)
        assert run.err.startswith("error: NOT_FOUND: "), run.err
        assert "Traceback" not in run.err
    plan_id = f"cli-{uuid.uuid4().hex[:8]}"
    assert (await stack.hive("plan", "submit", "-", stdin=echo_plan(plan_id))).code == 0
    missing_task = await stack.hive("plan", "explain", plan_id, "no-such-task")
    assert missing_task.code == ExitCode.NOT_FOUND, missing_task.err


async def test_workers_show_and_unknown_tickets_and_workers(stack: Stack) -> None:
    workers = (await stack.hive("-o", "json", "workers", "list")).json()["workers"]
    listed = {w["name"]: w for w in workers}["cli-w1"]
    worker_id = listed["worker_id"]
    shown = await stack.hive("workers", "show", worker_id)
    assert shown.code == ExitCode.OK, shown.err
    assert shown.out.splitlines()[:3] == [
        f"worker        {worker_id}",
        f"name          cli-w1  namespace {listed['namespace']}  version {listed['version']}",
        "status        HEALTHY",
    ]
    as_json = await stack.hive("-o", "json", "workers", "show", worker_id.upper())
    assert as_json.json()["name"] == "cli-w1"
    unknown = str(uuid.uuid4())
    for argv in (("workers", "show", unknown), ("tickets", "show", unknown)):
        run = await stack.hive(*argv)
        assert run.code == ExitCode.NOT_FOUND, (argv, run.err)
        assert run.err.startswith("error: NOT_FOUND: "), run.err
        assert "hint" not in run.err
    # Not a UUID: refused before any request, JSON in JSON mode.
    dots = await stack.hive("-o", "json", "tickets", "show", "..")
    assert dots.code == ExitCode.USAGE
    assert json.loads(dots.err)["error"]["code"] == "USAGE"


async def test_resubmission_is_idempotent_and_a_different_body_conflicts(stack: Stack) -> None:
    plan_id = f"cli-{uuid.uuid4().hex[:8]}"
    first = await stack.hive("plan", "submit", "-", *WATCH, stdin=echo_plan(plan_id, "a", "b"))
    assert first.code == ExitCode.OK, first.err
    assert first.out.startswith(f"plan {plan_id} submitted: ")
    again = await stack.hive("plan", "submit", "-", stdin=echo_plan(plan_id, "a", "b"))
    assert again.code == ExitCode.OK
    assert again.out.startswith(f"plan {plan_id} already submitted (identical plan): COMPLETED")
    different = await stack.hive("plan", "submit", "-", stdin=echo_plan(plan_id, "a", "c"))
    assert different.code == ExitCode.CONFLICT, different.err
    # A finished plan cannot be cancelled.
    late_cancel = await stack.hive("plan", "cancel", plan_id)
    assert late_cancel.code == ExitCode.CONFLICT
    assert late_cancel.err.startswith("error: FAILED_PRECONDITION: ")


async def test_json_output_of_every_listing_is_valid_json(stack: Stack) -> None:
    plans = await stack.hive("-o", "json", "plan", "list", "--limit", "2")
    assert plans.code == ExitCode.OK
    page = plans.json()
    assert len(page["plans"]) == 2
    assert page["next_page_token"]
    every = await stack.hive("plan", "list", "--all", "-o", "json")
    assert len(every.json()["plans"]) >= 2

    workers = await stack.hive("workers", "list", "-o", "json", "--status", "healthy")
    assert workers.code == ExitCode.OK
    by_name = {w["name"]: w for w in workers.json()["workers"]}
    assert set(by_name) == {"cli-w1", "cli-w2"}
    shell = await stack.hive("-o", "json", "workers", "list", "--capability", "shell")
    assert [w["name"] for w in shell.json()["workers"]] == ["cli-w1"]
    table = await stack.hive("workers", "list")
    assert table.out.splitlines()[0].split()[:3] == ["WORKER", "NAME", "STATUS"]
    assert len(table.out.splitlines()) == 3

    worker_id = by_name["cli-w1"]["worker_id"]
    tickets = await stack.hive("-o", "json", "tickets", "list", "--worker", worker_id)
    assert tickets.code == ExitCode.OK
    assert all(t["worker_id"] == worker_id for t in tickets.json()["tickets"])


async def test_credentials_the_services_reject_exit_6(stack: Stack) -> None:
    wrong = {"HIVE_JWT_SECRET": "another-secret-that-is-long-enough-0123456789"}
    for argv in (("tickets", "list"), ("workers", "list")):
        run = await stack.hive(*argv, env=wrong)
        assert run.code == ExitCode.AUTH, (argv, run.err)
        assert run.err.startswith("error: UNAUTHENTICATED: "), run.err
        assert "hint: check that HIVE_JWT_SECRET matches" in run.err
    bad_status = await stack.hive("tickets", "list", "--status", "sleeping")
    assert bad_status.code == ExitCode.USAGE
    assert "status" in bad_status.err


async def test_unreachable_service_exits_5(stack: Stack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens once the socket is closed
    run = await stack.hive("plan", "list", "--orchestrator", f"http://127.0.0.1:{closed}")
    assert run.code == ExitCode.UNAVAILABLE
    assert f"orchestrator at http://127.0.0.1:{closed} is unreachable" in run.err


async def test_a_cancelled_plan_is_watched_until_its_last_ticket_ended(stack: Stack) -> None:
    # A plan is CANCELLED at once, its tickets in flight cancelled next: the watch ended at
    # the status ("CANCELLED ... 0/1 tasks finished") while the task ran on. The ticket
    # service stopped keeps the ticket RUNNING until it is back.
    plan = {
        "tasks": [
            {
                "task_id": "nap",
                "task_type": "sleep",
                "required_capabilities": ["python"],
                "parameters": {"seconds": 60},
            }
        ]
    }
    submitted = await stack.hive("plan", "submit", "-", stdin=json.dumps(plan).encode())
    assert submitted.code == ExitCode.OK, submitted.err
    plan_id = plan_id_of(submitted.out)

    for _ in range(600):  # the worker starts it within moments
        status = (await stack.hive("-o", "json", "plan", "status", plan_id)).json()
        if status["tickets"][0]["status"] == "RUNNING":
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"plan {plan_id}'s task never started")

    env = stack.env  # (stack.hive asks the stopped ticket service for its port)
    out, err = io.StringIO(), io.StringIO()

    def hive(*argv: str) -> int:
        return main(list(argv), stdout=out, stderr=err, stdin=io.BytesIO(b""), env=env)

    await stack.stop_ticket_service()
    try:
        assert await asyncio.to_thread(hive, "plan", "cancel", plan_id) == 0, err.getvalue()
        out.truncate(0)
        out.seek(0)
        watch = asyncio.create_task(
            asyncio.to_thread(hive, "plan", "watch", plan_id, "--interval", "0.1")
        )
        await asyncio.sleep(1.5)
        assert not watch.done(), out.getvalue()
    finally:
        await stack.start_ticket_service()
    async with asyncio.timeout(WATCH_TIMEOUT_SECONDS):
        code = await watch
    assert code == ExitCode.PLAN_UNSUCCESSFUL, err.getvalue()
    lines = out.getvalue().splitlines()
    assert any(line.startswith("CANCELLED, settling: 1 running [") for line in lines), lines
    (closing,) = [line for line in lines if line.startswith(f"plan {plan_id} CANCELLED")]
    assert " (settled after " in closing, lines
    assert closing.endswith(": 1/1 task finished"), lines
