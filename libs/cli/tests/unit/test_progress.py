"""Progress rendering from plan snapshots, failure reporting, and the watch loop."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hive_cli.api import ApiError, JsonObject, ServiceUnreachable
from hive_cli.exit_codes import ExitCode
from hive_cli.progress import (
    FailureTracker,
    LiveDisplay,
    PlainDisplay,
    bar,
    display_for,
    final_summary,
    progress_line,
)
from hive_cli.watch import PlanWatcher, WatchTimeout

from .conftest import FakeServices


def ticket(task: str, status: str, attempt: int = 1, error: str | None = None) -> dict[str, Any]:
    return {
        "task_id": task,
        "ticket_id": f"t-{task}",
        "status": status,
        "attempt": attempt,
        "worker_id": None,
        "error_message": error,
    }


def snapshot(
    status: str, *tickets: dict[str, Any], plan_id: str = "p1", **extra: Any
) -> JsonObject:
    counts: dict[str, int] = {}
    for t in tickets:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return {
        "plan_id": plan_id,
        "status": status,
        "task_count": len(tickets),
        "counts": counts,
        "error_message": None,
        "tickets": list(tickets),
        **extra,
    }


def test_bar() -> None:
    assert bar(0.0, 4, unicode=False) == "[----]"
    assert bar(0.5, 4, unicode=False) == "[##--]"
    assert bar(1.0, 4, unicode=True) == "[████]"
    assert bar(7.0, 4, unicode=False) == "[####]"


def test_progress_line_counts_terminal_tickets_as_done() -> None:
    plan = snapshot(
        "RUNNING",
        ticket("a", "COMPLETED"),
        ticket("b", "FAILED"),
        ticket("c", "RUNNING"),
        ticket("d", "PENDING"),
    )
    line = progress_line(plan, bar_width=8, unicode=False, elapsed=12.4)
    assert (
        line == "RUNNING   [####----] 2/4  50%  PENDING 1 · RUNNING 1 · COMPLETED 1 · FAILED 1  12s"
    )


def test_progress_line_before_any_ticket_exists() -> None:
    plan = {"plan_id": "p1", "status": "PENDING", "task_count": 3, "counts": {}, "tickets": []}
    assert progress_line(plan, bar_width=4, unicode=False) == "PENDING   [----] 0/3   0%"


def test_failures_are_reported_once_each() -> None:
    tracker = FailureTracker()
    running = snapshot("RUNNING", ticket("a", "RUNNING"))
    assert tracker.new_failures(running) == []
    # Attempt 1 failed and the ticket was re-queued as attempt 2 (message kept).
    requeued = snapshot("RUNNING", ticket("a", "PENDING", 2, "exit 1"))
    (retry,) = tracker.new_failures(requeued)
    assert (retry.task_id, retry.attempt, retry.final) == ("a", 1, False)
    assert retry.text() == "retry   a attempt 1 failed: exit 1"
    # Same state seen again, and the same attempt now running: nothing new.
    assert tracker.new_failures(requeued) == []
    assert tracker.new_failures(snapshot("RUNNING", ticket("a", "RUNNING", 2, "exit 1"))) == []
    # The last attempt fails for good.
    final = snapshot("FAILED", ticket("a", "FAILED", 2, "exit 2"))
    (failed,) = tracker.new_failures(final)
    assert (failed.attempt, failed.final) == (2, True)
    assert failed.text() == "FAILED  a (attempt 2): exit 2"
    # Cancelled tickets are not failures.
    assert (
        tracker.new_failures(snapshot("CANCELLED", ticket("b", "CANCELLED", 1, "plan failed")))
        == []
    )


def test_plain_display_prints_a_line_per_change_and_each_failure() -> None:
    stream = io.StringIO()
    display = PlainDisplay(stream, bar_width=4)
    tracker = FailureTracker()
    snaps = [
        snapshot("RUNNING", ticket("a", "RUNNING"), ticket("b", "PENDING")),
        snapshot("RUNNING", ticket("a", "RUNNING"), ticket("b", "PENDING")),  # no change
        snapshot("RUNNING", ticket("a", "PENDING", 2, "boom"), ticket("b", "PENDING")),
        snapshot("COMPLETED", ticket("a", "COMPLETED", 2, "boom"), ticket("b", "COMPLETED")),
    ]
    for i, snap in enumerate(snaps):
        display.update(snap, tracker.new_failures(snap), float(i))
    display.close()
    assert stream.getvalue().splitlines() == [
        "RUNNING   [----] 0/2   0%  PENDING 1 · RUNNING 1  0s",
        "retry   a attempt 1 failed: boom",
        "RUNNING   [----] 0/2   0%  PENDING 2  2s",
        "COMPLETED [####] 2/2 100%  COMPLETED 2  3s",
    ]
    assert "\r" not in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


class Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_live_display_redraws_one_line_and_prints_failures_above_it() -> None:
    stream = Tty()
    display = LiveDisplay(stream, columns=200)
    tracker = FailureTracker()
    first = snapshot("RUNNING", ticket("a", "RUNNING"))
    second = snapshot("FAILED", ticket("a", "FAILED", 1, "bad"))
    display.update(first, tracker.new_failures(first), 1.0)
    display.update(second, tracker.new_failures(second), 2.0)
    display.close()
    text = stream.getvalue()
    erase = "\r\x1b[2K"
    line1 = "RUNNING   [░░░░░░░░░░░░░░░░░░░░░░░░] 0/1   0%  RUNNING 1  1s"
    line2 = "FAILED    [████████████████████████] 1/1 100%  FAILED 1  2s"
    assert text == (
        erase + line1 + erase + "✗ FAILED  a (attempt 1): bad\n" + line1 + erase + line2 + "\n"
    )


def test_live_line_is_cut_to_the_terminal_width() -> None:
    stream = Tty()
    display = LiveDisplay(stream, bar_width=10, columns=30)
    plan = snapshot("RUNNING", ticket("a", "RUNNING"), ticket("b", "PENDING"))
    display.update(plan, [], 1.0)
    drawn = stream.getvalue().removeprefix("\r\x1b[2K")
    assert drawn == "RUNNING   [░░░░░░░░░░] 0/2  …"
    assert len(drawn) == 29


def test_a_tty_gets_the_live_display_anything_else_plain_lines() -> None:
    assert isinstance(display_for(Tty()), LiveDisplay)
    assert isinstance(display_for(io.StringIO()), PlainDisplay)


def test_final_summary_lists_tasks_that_did_not_complete() -> None:
    plan = snapshot(
        "FAILED",
        ticket("a", "COMPLETED"),
        ticket("b", "FAILED", 3, "exit 1"),
        ticket("c", "CANCELLED"),
        error_message="task b failed",
    )
    assert final_summary(plan, elapsed=3.21).splitlines() == [
        "plan p1 FAILED after 3.2s: 3/3 tasks finished",
        "  reason: task b failed",
        "  FAILED    b: exit 1",
        "  CANCELLED c",
    ]


class ScriptedApi:
    """``get_plan`` answers from a script; an exception in the script is raised."""

    def __init__(self, answers: list[JsonObject | Exception]) -> None:
        self._answers: Iterator[JsonObject | Exception] = iter(answers)
        self.calls = 0

    def get_plan(self, plan_id: str) -> JsonObject:
        self.calls += 1
        answer = next(self._answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def watcher(api: ScriptedApi, clock: FakeClock, **kwargs: Any) -> PlanWatcher:
    return PlanWatcher(
        api=api,  # type: ignore[arg-type]
        display=PlainDisplay(io.StringIO()),
        interval=0.5,
        sleep=clock.sleep,
        clock=clock,
        **kwargs,
    )


def test_watch_polls_until_terminal() -> None:
    clock = FakeClock()
    api = ScriptedApi(
        [
            snapshot("PENDING", ticket("a", "PENDING")),
            snapshot("RUNNING", ticket("a", "RUNNING")),
            snapshot("COMPLETED", ticket("a", "COMPLETED")),
            snapshot("COMPLETED", ticket("a", "COMPLETED")),
        ]
    )
    final = watcher(api, clock).watch("p1")
    assert final["status"] == "COMPLETED"
    assert api.calls == 3
    assert clock.sleeps == [0.5, 0.5]


def test_watch_timeout_carries_the_last_snapshot() -> None:
    clock = FakeClock()
    api = ScriptedApi([snapshot("RUNNING", ticket("a", "RUNNING"))] * 10)
    with pytest.raises(WatchTimeout) as caught:
        watcher(api, clock, timeout=1.0).watch("p1")
    assert caught.value.plan["status"] == "RUNNING"
    assert api.calls == 3  # at 0, 0.5, 1.0


def test_watch_rides_out_a_short_outage_but_not_a_long_one() -> None:
    down = ServiceUnreachable("orchestrator", "http://x", "refused")
    clock = FakeClock()
    display = io.StringIO()
    api = ScriptedApi(
        [
            snapshot("RUNNING", ticket("a", "RUNNING")),
            down,
            down,
            snapshot("COMPLETED", ticket("a", "COMPLETED")),
        ]
    )
    plain = watcher(api, clock, unreachable_grace=5.0)
    plain.display = PlainDisplay(display)
    assert plain.watch("p1")["status"] == "COMPLETED"
    notes = [line for line in display.getvalue().splitlines() if "orchestrator" in line]
    assert notes == ["orchestrator unreachable (refused); retrying", "orchestrator reachable again"]

    clock = FakeClock()
    api = ScriptedApi([snapshot("RUNNING", ticket("a", "RUNNING"))] + [down] * 20)
    with pytest.raises(ServiceUnreachable):
        watcher(api, clock, unreachable_grace=2.0).watch("p1")
    assert clock.now <= 3.0


def test_watch_fails_at_once_if_the_orchestrator_was_never_reached() -> None:
    api = ScriptedApi([ServiceUnreachable("orchestrator", "http://x", "refused")])
    with pytest.raises(ServiceUnreachable):
        watcher(api, FakeClock()).watch("p1")
    assert api.calls == 1


def test_ctrl_c_stops_the_watch_and_says_how_to_reattach() -> None:
    def interrupt(_request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    services = FakeServices()
    services.routes[("GET", "/api/v1/plans/p1")] = interrupt
    run = services.run("plan", "watch", "p1")
    assert run.code == 130
    assert "interrupted; plan p1 keeps running (hive plan watch p1)" in run.err


def test_watch_does_not_retry_api_errors() -> None:
    api = ScriptedApi([ApiError("orchestrator", 404, "NOT_FOUND", "no plan")])
    with pytest.raises(ApiError):
        watcher(api, FakeClock()).watch("p1")
    assert api.calls == 1


@pytest.mark.parametrize(
    ("final_status", "exit_code"),
    [
        ("COMPLETED", ExitCode.OK),
        ("FAILED", ExitCode.PLAN_UNSUCCESSFUL),
        ("CANCELLED", ExitCode.PLAN_UNSUCCESSFUL),
    ],
)
def test_submit_watch_exit_code_follows_the_plan(final_status: str, exit_code: ExitCode) -> None:
    services = FakeServices()
    services.on(
        "POST",
        "/api/v1/plans",
        202,
        {
            **snapshot("PENDING", ticket("a", "PENDING")),
            "created": True,
            "tickets_created": True,
            "ticket_ids": {"a": "t-a"},
            "warnings": [],
        },
    )
    answers = iter(
        [
            snapshot("RUNNING", ticket("a", "RUNNING")),
            snapshot(final_status, ticket("a", final_status)),
        ]
    )
    services.routes[("GET", "/api/v1/plans/p1")] = lambda _r: httpx.Response(
        200, json=next(answers)
    )
    run = services.run("plan", "submit", "-", "--watch", "--interval", "0.01", stdin=b"{}")
    assert run.code == exit_code
    lines = run.out.splitlines()
    assert lines[0] == "plan p1 submitted: PENDING, 1 tasks"
    assert any(line.startswith("RUNNING   [") for line in lines)
    assert lines[-1 if final_status == "COMPLETED" else -2].startswith(f"plan p1 {final_status}")


def test_submit_watch_json_prints_one_document_and_progress_on_stderr() -> None:
    services = FakeServices()
    services.on(
        "POST",
        "/api/v1/plans",
        202,
        {
            **snapshot("PENDING", ticket("a", "PENDING")),
            "created": True,
            "tickets_created": True,
            "ticket_ids": {"a": "t-a"},
            "warnings": [{"field": "tasks[0]", "description": "w", "code": "X"}],
        },
    )
    services.on("GET", "/api/v1/plans/p1", body=snapshot("COMPLETED", ticket("a", "COMPLETED")))
    run = services.run("-o", "json", "plan", "submit", "-", "--watch", stdin=b"{}")
    assert run.code == ExitCode.OK
    body = json.loads(run.out)
    assert body["status"] == "COMPLETED"
    assert body["ticket_ids"] == {"a": "t-a"}
    assert body["created"] is True
    assert body["warnings"][0]["field"] == "tasks[0]"
    assert "COMPLETED [" in run.err


def test_watch_timeout_exit_8() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/plans/p1", body=snapshot("RUNNING", ticket("a", "RUNNING")))
    run = services.run("plan", "watch", "p1", "--interval", "0.01", "--timeout", "0.05")
    assert run.code == 8
    assert "timed out: plan p1 is still RUNNING" in run.err
    assert "hive plan watch p1" in run.err
