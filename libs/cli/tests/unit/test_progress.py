"""Progress rendering from plan snapshots, failure reporting, and the watch loop."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
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

from .conftest import FakeServices, error_body


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


def requeued(attempt: int, message: str) -> dict[str, Any]:
    """A ticket's audit event: ``attempt`` failed and the ticket was re-queued."""
    return {
        "type": "REQUEUED",
        "attempt": attempt + 1,
        "status": "PENDING",
        "details": {"failed_attempt": attempt, "error_message": message},
    }


def history(*events: dict[str, Any]) -> JsonObject:
    """A ``GET /api/v1/tickets/{id}/events`` answer."""
    created = {"type": "CREATED", "attempt": 1, "status": "PENDING", "details": {}}
    return {"ticket_id": "t-flaky", "events": [created, *events]}


def plan_answers(services: FakeServices, *plans: JsonObject) -> None:
    """``GET /api/v1/plans/p1`` answers ``plans`` in turn, then the last one again."""
    answers = list(plans)

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answers.pop(0) if len(answers) > 1 else answers[0])

    services.routes[("GET", "/api/v1/plans/p1")] = answer


def failure_lines(out: str) -> list[str]:
    """The failure lines of a watch (not its progress lines, which may start FAILED)."""
    return [line for line in out.splitlines() if line.startswith(("retry ", "FAILED  flaky"))]


def ticket_reads(services: FakeServices) -> list[httpx.Request]:
    return [r for r in services.requests if r.url.path.startswith("/api/v1/tickets/")]


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


def no_event_reads(ticket_id: str) -> JsonObject:
    raise AssertionError(f"events of {ticket_id} read, though every failure was seen")


def test_an_attempt_that_lost_its_worker_is_not_called_a_retry() -> None:
    # Printed as "retry ... failed", though it used none of the task's retries.
    tracker = FailureTracker(no_event_reads)
    assert tracker.new_failures(snapshot("RUNNING", ticket("a", "RUNNING"))) == []
    lost = {**ticket("a", "PENDING", 2, "worker w1 was lost"), "lost_runs": 1}
    (rerun,) = tracker.new_failures(snapshot("RUNNING", lost))
    assert rerun.text() == "rerun   a attempt 1 lost its worker (no retry used): worker w1 was lost"
    failed = {**ticket("a", "PENDING", 3, "exit 1"), "lost_runs": 1}
    (retry,) = tracker.new_failures(snapshot("RUNNING", failed))
    assert retry.text() == "retry   a attempt 2 failed: exit 1"


def test_a_lost_worker_is_read_from_the_events_too() -> None:
    events = history(
        {
            "type": "REQUEUED",
            "details": {"failed_attempt": 1, "error_message": "gone", "worker_lost": True},
        },
        requeued(2, "exit 1"),
    )
    tracker = FailureTracker(lambda ticket_id: events)
    assert tracker.new_failures(snapshot("RUNNING", ticket("flaky", "RUNNING"))) == []
    lines = [
        f.text() for f in tracker.new_failures(snapshot("RUNNING", ticket("flaky", "RUNNING", 3)))
    ]
    assert lines == [
        "rerun   flaky attempt 1 lost its worker (no retry used): gone",
        "retry   flaky attempt 2 failed: exit 1",
    ]


def test_failures_are_reported_once_each() -> None:
    tracker = FailureTracker(no_event_reads)
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


SETUP = ticket("setup", "COMPLETED")
REPORT = ticket("report", "PENDING")


def watch_flaky(services: FakeServices, *polls: JsonObject) -> list[str]:
    """Watch a plan whose task ``flaky`` runs attempt 1 at the first poll, shows ``polls``
    then fails attempt 3 for good; the failure lines printed."""
    report_cancelled = ticket("report", "CANCELLED", 1, "dependency flaky failed")
    plan_answers(
        services,
        snapshot("RUNNING", SETUP, ticket("flaky", "RUNNING", 1), REPORT),
        *polls,
        snapshot("FAILED", SETUP, ticket("flaky", "FAILED", 3, "error 3"), report_cancelled),
    )
    run = services.run("plan", "watch", "p1", "--interval", "0.01")
    assert run.code == ExitCode.PLAN_UNSUCCESSFUL, run.err
    assert run.err == ""
    return failure_lines(run.out)


@pytest.mark.parametrize(
    "polls",
    [
        # Attempts 1 and 2 fail between two polls; attempt 3 waits for its backoff.
        [snapshot("RUNNING", SETUP, ticket("flaky", "PENDING", 3, "error 2"), REPORT)],
        # A poll sees attempt 2 (so attempt 1's error), then attempt 2 fails and attempt 3
        # fails for good before the next.
        [snapshot("RUNNING", SETUP, ticket("flaky", "RUNNING", 2, "error 1"), REPORT)],
        # Every retry happens between the first poll and the one that sees the end.
        [],
    ],
    ids=["attempt-jumped-by-two", "last-retry-unseen", "straight-to-the-end"],
)
def test_failed_attempts_between_two_polls_are_read_from_the_ticket_events(
    polls: list[JsonObject],
) -> None:
    services = FakeServices()
    events = history(requeued(1, "error 1"), requeued(2, "error 2"))
    services.on("GET", "/api/v1/tickets/t-flaky/events", body=events)
    assert watch_flaky(services, *polls) == [
        "retry   flaky attempt 1 failed: error 1",
        "retry   flaky attempt 2 failed: error 2",
        "FAILED  flaky (attempt 3): error 3",
    ]
    # Only the ticket whose attempts were missed, with the CLI's service token.
    (read,) = ticket_reads(services)
    assert read.url.path == "/api/v1/tickets/t-flaky/events"
    assert read.headers["authorization"].startswith("Bearer ey")


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


@pytest.mark.parametrize(
    "events",
    [
        lambda _r: httpx.Response(403, json=error_body("PERMISSION_DENIED", "not for you")),
        lambda _r: httpx.Response(401, json=error_body("UNAUTHENTICATED", "bad token")),
        lambda _r: httpx.Response(503, json=error_body("UNAVAILABLE", "MongoDB unavailable")),
        refuse,
    ],
    ids=["403", "401", "503", "unreachable"],
)
def test_unreadable_events_still_give_a_line_per_failed_attempt(
    events: Callable[[httpx.Request], httpx.Response],
) -> None:
    services = FakeServices()
    services.routes[("GET", "/api/v1/tickets/t-flaky/events")] = events
    jumped = snapshot("RUNNING", SETUP, ticket("flaky", "PENDING", 3, "error 2"), REPORT)
    assert watch_flaky(services, jumped) == [
        "retry   flaky attempt 1 failed",
        "retry   flaky attempt 2 failed: error 2",  # the ticket still shows it
        "FAILED  flaky (attempt 3): error 3",
    ]
    assert [r.url.path for r in ticket_reads(services)] == ["/api/v1/tickets/t-flaky/events"]


def test_unreadable_events_are_noted_once() -> None:
    # The lines without their messages used to come with no word about why.
    notes: list[str] = []

    def refused(_ticket_id: str) -> JsonObject:
        raise ApiError("tickets", 401, "UNAUTHENTICATED", "token has expired")

    tracker = FailureTracker(refused, note=notes.append)
    tracker.new_failures(snapshot("RUNNING", ticket("a", "PENDING", 3), ticket("b", "RUNNING")))
    assert notes == [
        "cannot read ticket histories (tickets: UNAUTHENTICATED (401): token has expired): "
        "failed attempts no poll saw are shown without their error message"
    ]
    later = snapshot("RUNNING", ticket("a", "PENDING", 3), ticket("b", "COMPLETED", 3))
    assert [f.text() for f in tracker.new_failures(later)] == [
        "retry   b attempt 1 failed",
        "retry   b attempt 2 failed",
    ]
    assert len(notes) == 1


def test_a_watch_notes_unreadable_events_on_its_display() -> None:
    services = FakeServices()
    services.on(
        "GET", "/api/v1/tickets/t-flaky/events", 401, error_body("UNAUTHENTICATED", "expired")
    )
    jumped = snapshot("RUNNING", SETUP, ticket("flaky", "PENDING", 3, "error 2"), REPORT)
    plan_answers(services, jumped, snapshot("FAILED", SETUP, ticket("flaky", "FAILED", 3), REPORT))
    run = services.run("-o", "json", "plan", "watch", "p1", "--interval", "0.01")
    assert run.code == ExitCode.PLAN_UNSUCCESSFUL
    assert "cannot read ticket histories (tickets: UNAUTHENTICATED (401): expired)" in run.err
    assert run.err.count("cannot read ticket histories") == 1


class EventReads:
    """A ticket's events as the audit trail has them at each read."""

    def __init__(self, *answers: JsonObject) -> None:
        self._answers = list(answers)
        self.reads: list[str] = []

    def __call__(self, ticket_id: str) -> JsonObject:
        self.reads.append(ticket_id)
        return self._answers[min(len(self.reads), len(self._answers)) - 1]


def test_a_failure_the_audit_trail_does_not_list_yet_waits_one_poll() -> None:
    events = EventReads(history(), history(requeued(1, "error 1")))
    tracker = FailureTracker(events)
    assert tracker.new_failures(snapshot("RUNNING", ticket("a", "RUNNING"))) == []
    # Attempt 1 failed and attempt 2 completed between two polls; the audit trail lags.
    done = snapshot("RUNNING", ticket("a", "COMPLETED", 2), ticket("b", "RUNNING"))
    assert tracker.new_failures(done) == []
    assert [f.text() for f in tracker.new_failures(done)] == ["retry   a attempt 1 failed: error 1"]
    assert tracker.new_failures(done) == []
    assert events.reads == ["t-a", "t-a"]


def test_a_failure_the_audit_trail_never_lists_is_reported_without_its_message() -> None:
    events = EventReads(history())
    tracker = FailureTracker(events)
    done = snapshot("RUNNING", ticket("a", "COMPLETED", 2), ticket("b", "RUNNING"))
    assert tracker.new_failures(done) == []
    assert [f.text() for f in tracker.new_failures(done)] == ["retry   a attempt 1 failed"]
    assert tracker.new_failures(done) == []
    assert events.reads == ["t-a", "t-a"]
    # A finished plan has no next poll to wait for.
    finished = FailureTracker(EventReads(history()))
    (failure,) = finished.new_failures(snapshot("COMPLETED", ticket("a", "COMPLETED", 2)))
    assert failure.text() == "retry   a attempt 1 failed"


def test_an_expired_lease_is_a_failed_attempt() -> None:
    expired = {
        "type": "LEASE_EXPIRED",
        "attempt": 2,
        "status": "PENDING",
        "details": {"expired_attempt": 1, "requeued": True},
    }
    tracker = FailureTracker(EventReads(history(expired)))
    # A re-queue after an expired lease leaves no error message on the ticket.
    (failure,) = tracker.new_failures(snapshot("RUNNING", ticket("a", "PENDING", 2)))
    assert failure.text() == "retry   a attempt 1 failed: timed out"  # an event of before
    never = "not started: worker w1 did not start it within its assignment lease"
    expired["details"] = {"expired_attempt": 1, "requeued": True, "error_message": never}
    tracker = FailureTracker(EventReads(history(expired)))
    (failure,) = tracker.new_failures(snapshot("RUNNING", ticket("a", "PENDING", 2)))
    assert failure.text() == f"retry   a attempt 1 failed: {never}"


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


FINISHED_AT = {
    "created_at": "2026-11-24T23:00:00.500000+00:00",
    "completed_at": "2026-11-24T23:00:03.710000+00:00",
}


def test_final_summary_lists_tasks_that_did_not_complete() -> None:
    plan = snapshot(
        "FAILED",
        ticket("a", "COMPLETED"),
        ticket("b", "FAILED", 3, "exit 1"),
        ticket("c", "CANCELLED"),
        error_message="task b failed",
        **FINISHED_AT,
    )
    assert final_summary(plan, elapsed=60.0).splitlines() == [
        "plan p1 FAILED after 3.2s: 3/3 tasks finished",
        "  reason: task b failed",
        "  FAILED    b: exit 1",
        "  CANCELLED c",
    ]


def test_final_summary_without_the_plan_times_says_how_long_it_was_watched() -> None:
    plan = snapshot("COMPLETED", ticket("a", "COMPLETED"))
    assert final_summary(plan, elapsed=3.21) == (
        "plan p1 COMPLETED (watched for 3.2s): 1/1 task finished"
    )
    assert final_summary(plan) == "plan p1 COMPLETED: 1/1 task finished"


def test_watching_a_finished_plan_prints_its_run_time() -> None:
    services = FakeServices()
    finished = snapshot("COMPLETED", ticket("a", "COMPLETED"), **FINISHED_AT)
    services.on("GET", "/api/v1/plans/p1", body=finished)
    run = services.run("plan", "watch", "p1")
    assert run.code == ExitCode.OK, run.err
    assert run.out.splitlines()[-1] == "plan p1 COMPLETED after 3.2s: 1/1 task finished"


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

    def ticket_events(self, ticket_id: str) -> JsonObject:
        return no_event_reads(ticket_id)


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


def test_watch_rides_out_an_orchestrator_answering_unavailable() -> None:
    # Its database down: the orchestrator answers 503; the watch ended at once (exit 5)
    # while the plan went on to complete.
    busy = ApiError("orchestrator", 503, "UNAVAILABLE", "orchestrator database unavailable")
    clock = FakeClock()
    display = io.StringIO()
    api = ScriptedApi(
        [
            snapshot("RUNNING", ticket("a", "RUNNING")),
            busy,
            snapshot("COMPLETED", ticket("a", "COMPLETED")),
        ]
    )
    plain = watcher(api, clock, unreachable_grace=5.0)
    plain.display = PlainDisplay(display)
    assert plain.watch("p1")["status"] == "COMPLETED"
    assert (
        "orchestrator unreachable (503 UNAVAILABLE: orchestrator database unavailable); "
        "retrying" in display.getvalue()
    )
    # A definite answer still ends the watch.
    gone = ApiError("orchestrator", 404, "NOT_FOUND", "no plan p1")
    api = ScriptedApi([snapshot("RUNNING", ticket("a", "RUNNING")), gone])
    with pytest.raises(ApiError):
        watcher(api, FakeClock()).watch("p1")


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


def test_in_json_mode_ctrl_c_is_json_on_stderr() -> None:
    def interrupt(_request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    services = FakeServices()
    services.routes[("GET", "/api/v1/plans/p1")] = interrupt
    run = services.run("plan", "watch", "p1", env={"HIVE_OUTPUT": "json"})
    assert run.code == 130
    assert json.loads(run.err)["error"] == {
        "code": "INTERRUPTED",
        "message": "interrupted; plan p1 keeps running (hive plan watch p1)",
        "details": {"plan_id": "p1"},
    }


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
    assert lines[0] == "plan p1 submitted: PENDING, 1 task"
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


SETTLING_AT: dict[str, Any] = {
    "created_at": "2026-11-24T23:00:00.500000+00:00",
    "completed_at": "2026-11-24T23:00:03.710000+00:00",
    "settled_at": None,
}
SETTLED_AT: dict[str, Any] = {**SETTLING_AT, "settled_at": "2026-11-24T23:00:31.900000+00:00"}


def cancelled_while_running() -> list[JsonObject]:
    """A plan cancelled (through another replica) with a ticket still running: CANCELLED at
    once, settled once that ticket ended too."""
    return [
        snapshot("RUNNING", ticket("a", "RUNNING"), ticket("b", "PENDING"), settled_at=None),
        snapshot("CANCELLED", ticket("a", "RUNNING"), ticket("b", "PENDING"), **SETTLING_AT),
        snapshot("CANCELLED", ticket("a", "RUNNING"), ticket("b", "CANCELLED"), **SETTLING_AT),
        snapshot("CANCELLED", ticket("a", "CANCELLED"), ticket("b", "CANCELLED"), **SETTLED_AT),
    ]


def test_watch_goes_on_until_a_cancelled_plan_is_settled() -> None:
    # It exited at the first CANCELLED snapshot, "0/2 tasks finished", while the task ran
    # on for 28 s.
    clock = FakeClock()
    display = io.StringIO()
    snaps = cancelled_while_running()
    api = ScriptedApi([*snaps, snaps[-1]])
    plain = watcher(api, clock)
    plain.display = PlainDisplay(display, bar_width=4)

    final = plain.watch("p1")

    assert final["settled_at"] is not None
    assert api.calls == 4
    assert display.getvalue().splitlines() == [
        "RUNNING   [----] 0/2   0%  PENDING 1 · RUNNING 1  0s",
        "CANCELLED, settling: 1 pending, 1 running [----] 0/2   0%  PENDING 1 · RUNNING 1  0s",
        "CANCELLED, settling: 1 running [##--] 1/2  50%  RUNNING 1 · CANCELLED 1  1s",
        "CANCELLED [####] 2/2 100%  CANCELLED 2  2s",
    ]


def test_a_terminal_and_settled_plan_ends_the_watch_at_once() -> None:
    for answer in (
        snapshot("FAILED", ticket("a", "FAILED"), **SETTLED_AT),
        # An answer that does not carry settled_at ends at its terminal status.
        snapshot("COMPLETED", ticket("a", "COMPLETED")),
    ):
        api = ScriptedApi([answer])
        assert watcher(api, FakeClock()).watch("p1") is answer
        assert api.calls == 1


def test_progress_line_of_a_plan_settling_with_no_ticket_in_flight_left() -> None:
    # Every ticket terminal, the plan not marked settled yet (the next poll sees it).
    plan = snapshot("FAILED", ticket("a", "FAILED"), **SETTLING_AT)
    assert progress_line(plan, bar_width=4, unicode=False) == (
        "FAILED, settling [####] 1/1 100%  FAILED 1"
    )


def test_final_summary_of_a_plan_that_settled_later_says_when() -> None:
    plan = snapshot("CANCELLED", ticket("a", "CANCELLED"), **SETTLED_AT)
    assert final_summary(plan).splitlines()[0] == (
        "plan p1 CANCELLED after 3.2s (settled after 31.4s): 1/1 task finished"
    )
    at_once = snapshot(
        "COMPLETED", ticket("a", "COMPLETED"), **FINISHED_AT, settled_at=FINISHED_AT["completed_at"]
    )
    assert final_summary(at_once) == "plan p1 COMPLETED after 3.2s: 1/1 task finished"


def test_plan_watch_of_a_cancelled_plan_exits_1_once_settled() -> None:
    services = FakeServices()
    plan_answers(services, *cancelled_while_running())
    run = services.run("plan", "watch", "p1", "--interval", "0.01")
    assert run.code == ExitCode.PLAN_UNSUCCESSFUL, run.err
    lines = run.out.splitlines()
    assert any(line.startswith("CANCELLED, settling: 1 running [") for line in lines), lines
    assert lines[-3] == "plan p1 CANCELLED after 3.2s (settled after 31.4s): 2/2 tasks finished"
