"""Tables, detail blocks and JSON output."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx

from hive_cli.exit_codes import ExitCode
from hive_cli.progress import final_summary
from hive_cli.render import (
    cell,
    counts_text,
    explanations_text,
    plan_detail,
    submission_text,
    table,
    width,
)

from .conftest import FakeServices


def plan(status: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "plan_id": "p1",
        "intent_id": "",
        "name": "release",
        "priority": "NORMAL",
        "status": status,
        "error_message": None,
        "task_count": 2,
        "counts": {"COMPLETED": 1, "RUNNING": 1},
        "created_at": "2026-11-24T23:00:00.123456+00:00",
        "updated_at": "2026-11-24T23:00:01+00:00",
        "completed_at": None,
        "settled_at": None,
        "cancel_requested_at": None,
        "tickets": [
            {
                "task_id": "build",
                "ticket_id": "t-1",
                "status": "COMPLETED",
                "attempt": 1,
                "worker_id": "w-1",
                "error_message": None,
            },
            {
                "task_id": "test",
                "ticket_id": "t-2",
                "status": "RUNNING",
                "attempt": 2,
                "worker_id": "w-2",
                "error_message": "exit 1",
            },
        ],
    }
    body.update(extra)
    return body


def test_table_aligns_columns_without_trailing_spaces() -> None:
    text = table(["A", "LONGER"], [["xx", None], ["y", "z"]])
    assert text.splitlines() == ["A   LONGER", "xx  -", "y   z"]


def test_wide_characters_take_two_columns() -> None:
    assert width("日本語") == 6
    assert width("✓ ok") == 4
    assert width("e\u0301") == 1  # e and a combining acute accent
    assert width("🚀") == 2


def test_table_aligns_columns_with_wide_and_combining_characters() -> None:
    text = table(
        ["NAME", "NEXT"],
        [["日本語 name", "x"], ["plain", "y"], ["cafe\u0301", "z"], ["🚀 launch", "w"]],
    )
    lines = text.splitlines()
    # Every NEXT cell starts at the same terminal column (len() put them 3 apart).
    assert {width(line[:-1]) for line in lines[1:]} == {width(lines[0][:-4])}
    assert lines[1] == "日本語 name  x"
    assert lines[2] == "plain        y"


def test_a_long_wide_cell_is_cut_to_60_columns() -> None:
    long = cell("日本語" * 20)
    assert width(long) <= 60
    assert long == "日本語" * 9 + "日本" + "…"
    assert width(cell("日" * 30)) == 60
    assert cell("日" * 30) == "日" * 30  # fits exactly


def test_cells() -> None:
    assert cell(None) == cell("") == cell([]) == "-"
    assert cell(["python", "shell"]) == "python,shell"
    assert cell({"zone": "a"}) == "zone=a"
    assert cell(True) == "yes"
    assert cell("2026-11-24T23:00:00.5+01:00") == "2026-11-24 22:00:00Z"
    assert cell("line one\nline two") == "line one line two"
    long = cell("x" * 100)
    assert len(long) == 60
    assert long.endswith("…")


def test_counts_in_lifecycle_order_without_zeros() -> None:
    assert counts_text({"FAILED": 1, "PENDING": 2, "RUNNING": 0}) == "PENDING 2 · FAILED 1"
    assert counts_text({}) == "no tickets yet"


def test_plan_detail_shows_header_and_ticket_rows() -> None:
    text = plan_detail(plan("FAILED", error_message="task test failed"))
    lines = text.splitlines()
    assert lines[0] == "plan      p1  (release)"
    # FAILED with a ticket still running: being cancelled.
    assert "status    FAILED, settling: 1 running" in lines
    assert "tasks     2: RUNNING 1 · COMPLETED 1" in lines
    assert "error     task test failed" in lines
    assert any(line.split()[:4] == ["test", "RUNNING", "2", "w-2"] for line in lines)
    assert lines[-1].endswith("exit 1")


def test_plan_detail_of_a_settled_plan_says_when_its_last_ticket_ended() -> None:
    lines = plan_detail(
        plan(
            "CANCELLED",
            counts={"COMPLETED": 1, "CANCELLED": 1},
            completed_at="2026-11-24T23:00:02+00:00",
            settled_at="2026-11-24T23:00:30+00:00",
        )
    ).splitlines()
    assert "status    CANCELLED" in lines
    assert "finished  2026-11-24 23:00:02Z" in lines
    assert "settled   2026-11-24 23:00:30Z (its last ticket ended)" in lines
    at_once = plan("COMPLETED", completed_at="2026-11-24T23:00:02+00:00")
    at_once["settled_at"] = at_once["completed_at"]
    assert not any(line.startswith("settled") for line in plan_detail(at_once).splitlines())


def test_plan_detail_names_the_driving_replica_and_its_lease() -> None:
    now = datetime(2026, 11, 24, 23, 0, 10, tzinfo=UTC)
    driven = plan(owner_id="orch-a-1f2e", owner_lease_expires_at="2026-11-24T23:00:30+00:00")
    assert "driver    orch-a-1f2e (lease until 2026-11-24 23:00:30Z)" in (
        plan_detail(driven, now=now).splitlines()
    )
    later = datetime(2026, 11, 24, 23, 1, tzinfo=UTC)
    assert (
        "driver    orch-a-1f2e (lease expired 2026-11-24 23:00:30Z, not renewed:"
        " see hive plan explain)"
    ) in plan_detail(driven, now=later).splitlines()
    # No replica holds it (a settled plan, one released at shutdown): no line.
    for body in (plan(), plan(owner_id=None, owner_lease_expires_at=None)):
        assert not any(line.startswith("driver") for line in plan_detail(body).splitlines())


def test_submission_text_lists_ticket_ids_and_warnings() -> None:
    body = plan(
        "PENDING",
        created=True,
        tickets_created=True,
        ticket_ids={"build": "t-1", "test": None},
        warnings=[{"field": "tasks[1].required_capabilities[0]", "description": "no live worker"}],
    )
    text = submission_text(body)
    assert text.startswith("plan p1 submitted: PENDING, 2 tasks")
    assert "warning: tasks[1].required_capabilities[0]: no live worker" in text
    assert "build  t-1" in text
    assert "test   (not created yet)" in text
    again = submission_text({**body, "created": False, "tickets_created": False})
    assert "already submitted (identical plan)" in again
    assert "tickets are still being created" in again


def test_explanations() -> None:
    body = {
        "plan_id": "p1",
        "tasks": [
            {
                "task_id": "deploy",
                "ticket_id": "t-3",
                "status": "PENDING",
                "attempt": 1,
                "max_attempts": 3,
                "worker_id": None,
                "summary": "waiting for dependencies",
                "reasons": [
                    {
                        "code": "WAITING_FOR_DEPENDENCIES",
                        "message": "waiting for test",
                        "details": {"pending": ["test"]},
                    },
                ],
            }
        ],
    }
    text = explanations_text(body)
    assert text.splitlines() == [
        "deploy  PENDING  attempt 1/3",
        "  waiting for dependencies",
        "  - [WAITING_FOR_DEPENDENCIES] waiting for test",  # the list is in the message
    ]
    single = explanations_text({"plan_id": "p1", **body["tasks"][0]})  # type: ignore[dict-item]
    assert single == text
    assert "nothing is waiting" in explanations_text({"plan_id": "p1", "tasks": []})
    assert explanations_text({"plan_id": "p1", "stale_owner": None, **body}) == text


def test_an_expired_owner_lease_is_said_before_the_tasks() -> None:
    stale = {
        "code": "OWNER_LEASE_EXPIRED",
        "message": "replica orch-a, which drives this plan, has not renewed its lease",
        "details": {"owner_id": "orch-a"},
    }
    waiting = explained("b", "PENDING", (1, 1), "READY", "ready", {})
    lines = explanations_text({"plan_id": "p1", "stale_owner": stale, "tasks": [waiting]})
    assert lines.splitlines() == [
        "plan p1: [OWNER_LEASE_EXPIRED] replica orch-a, which drives this plan, has not"
        " renewed its lease",
        "",
        "b  PENDING  attempt 1/1",
        "  - [READY] ready",
    ]
    # Even when no task is waiting (the one task runs), and for one task.
    nothing = explanations_text({"plan_id": "p1", "stale_owner": stale, "tasks": []})
    assert nothing.splitlines()[0].startswith("plan p1: [OWNER_LEASE_EXPIRED] replica orch-a")
    assert nothing.splitlines()[-1].startswith("plan p1: nothing is waiting")
    one = explanations_text({"plan_id": "p1", "stale_owner": stale, **waiting})
    assert one == lines


def explained(
    task_id: str,
    status: str,
    attempts: tuple[int, int],
    code: str,
    message: str,
    details: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """One task of an explain answer, with one reason (its message the summary)."""
    attempt, max_attempts = attempts
    return {
        "task_id": task_id,
        "status": status,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "summary": message,
        "reasons": [{"code": code, "message": message, "details": details}],
        **fields,
    }


def explanations_lines(*tasks: dict[str, Any]) -> list[str]:
    return explanations_text({"plan_id": "p1", "tasks": list(tasks)}).splitlines()


def test_explanation_summary_and_details_are_not_repeated() -> None:
    finished = explained(
        "a",
        "FAILED",
        (3, 3),
        "FINISHED",
        "finished as FAILED after attempt 3: boom",
        {"status": "FAILED", "error_message": "boom", "lease": None, "n": 7},
        worker_id="w-1",
    )
    assert explanations_lines(finished) == [
        "a  FAILED  attempt 3/3  worker w-1",
        '  - [FINISHED] finished as FAILED after attempt 3: boom  {"n": 7}',
    ]


def test_an_explained_time_is_shown_once_as_the_tables_show_times() -> None:
    # The message says the time as tables do; the details' ISO form is the same time.
    waiting = explained(
        "a",
        "PENDING",
        (2, 3),
        "RETRY_BACKOFF",
        "retry backoff until 2026-12-06 03:23:31Z before attempt 2",
        {"backoff_until": "2026-12-06T03:23:31.354268+00:00", "attempt": 2},
    )
    assert explanations_lines(waiting) == [
        "a  PENDING  attempt 2/3",
        "  - [RETRY_BACKOFF] retry backoff until 2026-12-06 03:23:31Z before attempt 2",
    ]


def test_explained_details_the_message_spells_out_are_not_printed_again() -> None:
    waiting = explained(
        "b",
        "PENDING",
        (1, 1),
        "WAITING_ON_DEPENDENCIES",
        "waiting on a (RUNNING), f (PENDING)",
        {"dependencies": {"a": "RUNNING", "f": "PENDING"}, "extra": ["i"]},
    )
    assert explanations_lines(waiting)[1] == (
        # "i" is in "waiting", not said as a word of its own.
        '  - [WAITING_ON_DEPENDENCIES] waiting on a (RUNNING), f (PENDING)  {"extra": ["i"]}'
    )


def test_json_output_is_the_service_answer_verbatim() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/plans/p1", body=plan())
    run = services.run("plan", "status", "p1", "--output", "json")
    assert run.code == ExitCode.OK
    assert json.loads(run.out) == plan()
    assert run.err == ""


def test_list_pages_and_all() -> None:
    services = FakeServices()
    pages = {
        "": {"plans": [plan()], "next_page_token": "c1"},
        "c1": {"plans": [plan(plan_id="p2")], "next_page_token": ""},
    }
    services.routes[("GET", "/api/v1/plans")] = lambda r: httpx.Response(
        200, json=pages[r.url.params.get("page_token", "")]
    )
    one = services.run("plan", "list", "--limit", "1")
    assert one.code == ExitCode.OK
    assert one.out.splitlines()[0].split() == [
        "PLAN",
        "STATUS",
        "TASKS",
        "NAME",
        "COUNTS",
        "CREATED",
    ]
    assert len(one.out.splitlines()) == 2
    assert "--page-token c1" in one.err
    assert services.requests[-1].url.params["page_size"] == "1"
    every = services.run("plan", "list", "--all", "-o", "json")
    body = json.loads(every.out)
    assert [p["plan_id"] for p in body["plans"]] == ["p1", "p2"]
    assert body["next_page_token"] == ""


def test_empty_list_says_so_on_stderr() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/workers", body={"workers": [], "next_page_token": ""})
    run = services.run("workers", "list", "--capability", "gpu")
    assert run.code == ExitCode.OK
    assert run.out == ""
    assert "no workers found" in run.err
    assert services.requests[0].url.params["capability"] == "gpu"


HOSTILE = "x\x1b[2J\x1b]0;pwned\x07\nFAKE LINE\u202eevil\x9b"


def test_text_from_the_services_cannot_drive_the_terminal_or_forge_lines() -> None:
    # A plan's name and a task's error message are anyone's input: raw, they cleared the
    # screen, set the terminal title and added lines of output.
    failed = plan("FAILED", name=HOSTILE, error_message=HOSTILE)
    failed["tickets"][1]["error_message"] = HOSTILE
    explained = {
        "plan_id": "p1",
        "task_id": "deploy",
        "status": "FAILED",
        "attempt": 1,
        "max_attempts": 1,
        "summary": HOSTILE,
        "reasons": [{"code": "FAILED", "message": HOSTILE, "details": {"error": HOSTILE + "!"}}],
    }
    submitted = {
        "plan_id": "p1",
        "created": True,
        "status": "PENDING",
        "task_count": 1,
        "warnings": [{"field": "$.name", "description": HOSTILE}],
    }
    for text in (
        plan_detail(failed),
        explanations_text(explained),
        submission_text(submitted),
        final_summary(failed),
        table(["NAME"], [[HOSTILE]]),
    ):
        assert not any(ch in text for ch in "\x1b\x07\u202e\x9b"), text
        assert "FAKE LINE" not in {line.strip() for line in text.splitlines()}
        assert "\\x1b[2J" in text
        assert "\\u202e" in text


def test_a_hostile_error_message_from_a_service_is_escaped() -> None:
    services = FakeServices()
    services.on(
        "GET",
        "/api/v1/plans/p1",
        status=400,
        body={"error": {"code": "INVALID_ARGUMENT", "message": HOSTILE, "details": {}}},
    )
    run = services.run("plan", "status", "p1")
    assert run.code == ExitCode.USAGE
    assert "\x1b" not in run.err
    assert "\\x1b[2J" in run.err


TICKET_ID = "6f1f0a3e-8a47-4cf8-9a0f-3c1d1fbb7a11"


def ticket(**extra: Any) -> dict[str, Any]:
    return {
        "ticket_id": TICKET_ID,
        "plan_id": "p1",
        "task_id": "build",
        "task_type": "echo",
        "status": "COMPLETED",
        "attempt": 2,
        "max_retries": 1,
        "lost_runs": 1,
        "worker_id": "w-1",
        "error_message": "",
        "parameters": {"n": 3},
        "result": {"echo": {"n": 3}, "note": "line one\nline two"},
        "created_at": "2026-12-05T10:00:00+00:00",
        "started_at": "2026-12-05T10:00:01+00:00",
        "completed_at": "2026-12-05T10:00:02+00:00",
        **extra,
    }


def test_tickets_show_prints_where_a_ticket_stands_and_its_result() -> None:
    # Task results were only in `hive -o json tickets list --plan ...`.
    services = FakeServices()
    services.on("GET", f"/api/v1/tickets/{TICKET_ID}", body=ticket())
    run = services.run("tickets", "show", TICKET_ID)
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines() == [
        f"ticket      {TICKET_ID}",
        "plan        p1  task build (echo)",
        "status      COMPLETED, attempt 2 of 3, worker w-1",
        "created     2026-12-05 10:00:00Z",
        "started     2026-12-05 10:00:01Z",
        "finished    2026-12-05 10:00:02Z",
        "parameters:",
        "  {",
        '    "n": 3',
        "  }",
        "result:",
        "  {",
        '    "echo": {',
        '      "n": 3',
        "    },",
        '    "note": "line one\\nline two"',
        "  }",
    ]


def _with_history(status: str, events: list[dict[str, Any]], **history: Any) -> FakeServices:
    """Fake services answering a ticket in ``status`` and its audit history."""
    services = FakeServices()
    services.on("GET", f"/api/v1/tickets/{TICKET_ID}", body=ticket(status=status))
    services.on(
        "GET",
        f"/api/v1/tickets/{TICKET_ID}/events",
        body={"ticket_id": TICKET_ID, "events": events, **history},
    )
    return services


def _event(**fields: Any) -> dict[str, Any]:
    """A REQUEUED event (attempt 1 failed, attempt 2 next), or what ``fields`` say."""
    return {
        "type": "REQUEUED",
        "occurred_at": "2026-12-05T10:00:02+00:00",
        "previous_status": "RUNNING",
        "status": "PENDING",
        "attempt": 2,
        "actor": "worker:w-1",
        "details": {},
        **fields,
    }


def test_tickets_show_with_events_adds_the_audit_history() -> None:
    event = _event(type="STATUS_CHANGED", status="FAILED")
    services = _with_history("FAILED", [event])
    run = services.run("tickets", "show", TICKET_ID, "--events")
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines()[-2:] == [
        "OCCURRED              EVENT           STATUS             ATTEMPT  ACTOR       DETAILS",
        "2026-12-05 10:00:02Z  STATUS_CHANGED  RUNNING -> FAILED  2        worker:w-1  -",
    ]
    as_json = services.run("-o", "json", "tickets", "show", TICKET_ID, "--events")
    assert json.loads(as_json.out) == {
        **ticket(status="FAILED"),
        "events": [event],
        "truncated": False,
    }


def test_an_events_result_is_shown_as_json() -> None:
    # It read result={'other': True},worker_lost=False (Python's form, not the API's).
    details = {"failed_attempt": 1, "result": {"other": True, "n": None}, "worker_lost": False}
    run = _with_history("PENDING", [_event(details=details)]).run(
        "tickets", "show", TICKET_ID, "--events"
    )
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines()[-1].endswith(
        'failed_attempt=1,result={"other":true,"n":null},worker_lost=false'
    )


def test_tickets_show_says_when_the_history_goes_on() -> None:
    services = _with_history("RUNNING", [_event()] * 3, truncated=True)
    run = services.run("tickets", "show", TICKET_ID, "--events")
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines()[-1] == "(the first 3 events: more follow)"


def test_an_events_details_are_shown_whole() -> None:
    # They were cut at 60 columns: an earlier attempt's error (the one place to read it
    # without JSON) was lost.
    error = "connection reset by peer while reading the upstream answer " * 4
    details = {"failed_attempt": 1, "error_message": error.strip()}
    run = _with_history("PENDING", [_event(details=details)]).run(
        "tickets", "show", TICKET_ID, "--events"
    )
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines()[-1].endswith(f"error_message={error.strip()}")


WORKER_ID = "0b6c1c36-5d0e-4c55-8a57-3d7e6b1c0f42"


def worker(**extra: Any) -> dict[str, Any]:
    return {
        "worker_id": WORKER_ID,
        "name": "cli-w1",
        "namespace": "default",
        "capabilities": ["python", "shell"],
        "labels": {"zone": "a"},
        "max_concurrent": 4,
        "in_flight": 1,
        "spare_capacity": 3,
        "version": "0.1.0",
        "status": "HEALTHY",
        "registered_at": "2026-12-05T10:00:00+00:00",
        "last_heartbeat_at": "2026-12-05T10:05:00+00:00",
        "succeeded_total": 9,
        "failed_total": 1,
        "success_rate": 0.9,
        **extra,
    }


def test_workers_show_prints_one_worker() -> None:
    services = FakeServices()
    services.on("GET", f"/api/v1/workers/{WORKER_ID}", body=worker())
    run = services.run("workers", "show", WORKER_ID)
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines() == [
        f"worker        {WORKER_ID}",
        "name          cli-w1  namespace default  version 0.1.0",
        "status        HEALTHY",
        "capabilities  python,shell",
        "labels        zone=a",
        "load          1/4 in flight",
        "record        9 succeeded, 1 failed (90%)",
        "registered    2026-12-05 10:00:00Z",
        "heartbeat     2026-12-05 10:05:00Z",
    ]
    as_json = services.run("-o", "json", "workers", "show", WORKER_ID.upper())
    assert json.loads(as_json.out) == worker()
    assert services.requests[-1].url.path == f"/api/v1/workers/{WORKER_ID}"


def test_workers_show_of_an_unknown_worker_exits_3() -> None:
    services = FakeServices()
    services.on(
        "GET",
        f"/api/v1/workers/{WORKER_ID}",
        404,
        {"error": {"code": "NOT_FOUND", "message": f"worker {WORKER_ID} not found"}},
    )
    run = services.run("workers", "show", WORKER_ID)
    assert run.code == ExitCode.NOT_FOUND
    assert run.err == f"error: NOT_FOUND: worker {WORKER_ID} not found\n"
