"""Progress of a plan from successive snapshots (``GET /api/v1/plans/{id}`` bodies).

The pure part (:func:`progress_line`, :class:`FailureTracker`) is what the unit tests
check; the displays only decide where the text goes: a live, redrawn line on a terminal,
plain appended lines anywhere else (CI logs, pipes).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TextIO

from hive_cli.api import ApiError, JsonObject, ServiceUnreachable
from hive_cli.render import (
    STATUS_ORDER,
    TERMINAL_TICKET_STATUSES,
    inline,
    plan_settled,
    plural,
    status_label,
)

# A ticket in one of these after a failure is retrying it.
RETRYING = ("PENDING", "ASSIGNED", "RUNNING")
_ERASE_LINE = "\r\x1b[2K"


@dataclass(frozen=True)
class Failure:
    """One failed attempt; ``message`` is empty when it is not known. ``lost``: the attempt
    ended with its worker (stopped, lost), not with the task: a run again that used none of
    the task's retries."""

    task_id: str
    attempt: int
    message: str
    final: bool
    lost: bool = False

    def text(self) -> str:
        message = f": {inline(self.message)}" if self.message else ""
        if self.final:
            return f"FAILED  {self.task_id} (attempt {self.attempt}){message}"
        if self.lost:
            return (
                f"rerun   {self.task_id} attempt {self.attempt} lost its worker "
                f"(no retry used){message}"
            )
        return f"retry   {self.task_id} attempt {self.attempt} failed{message}"


@dataclass(frozen=True)
class FailedAttempt:
    """What a ticket's audit events say of one of its re-queued attempts."""

    message: str
    lost: bool = False


# The message of a ticket whose lease ran out, in audit events written before the events
# carried it (worker gone or slow).
LEASE_EXPIRED_MESSAGE = "timed out"

EventsReader = Callable[[str], JsonObject]


def failed_attempts(history: Mapping[str, Any]) -> dict[int, FailedAttempt]:
    """Re-queued attempts, their error messages and whether they lost their worker, from a
    ticket's audit events (``GET /api/v1/tickets/{id}/events``): REQUEUED after a failure,
    or LEASE_EXPIRED with ``requeued``."""
    attempts: dict[int, FailedAttempt] = {}
    for event in history.get("events") or []:
        details = event.get("details") if isinstance(event, Mapping) else None
        if not isinstance(details, Mapping):
            continue
        if event.get("type") == "REQUEUED":
            attempt, message = details.get("failed_attempt"), details.get("error_message")
        elif event.get("type") == "LEASE_EXPIRED" and details.get("requeued"):
            attempt = details.get("expired_attempt")
            message = details.get("error_message") or LEASE_EXPIRED_MESSAGE
        else:
            continue
        if isinstance(attempt, int):
            attempts[attempt] = FailedAttempt(
                str(message or ""), details.get("worker_lost") is True
            )
    return attempts


class FailureTracker:
    """Reports each failed attempt of every ticket once, in order, however the polls fall.

    Every attempt below a ticket's current one failed (it was re-queued); a FAILED
    ticket's current attempt failed for good. A snapshot shows only the latest error (a
    re-queued ticket keeps it until its next attempt ends), so it tells only the previous
    attempt's; attempts that failed unseen between two polls are read from the ticket's
    audit events (``events``, asked only for such tickets). The audit trail lags a moment
    behind: an attempt it does not list yet waits for the next poll, once, while the plan
    runs. One it cannot tell (not readable, or still not listed) comes without a message;
    the first time the events cannot be read, ``note`` says so (once per watch).
    """

    def __init__(
        self, events: EventsReader | None = None, *, note: Callable[[str], None] | None = None
    ) -> None:
        self._events = events
        self._note = note
        self._noted = False
        self._reported: dict[str, int] = {}  # task -> last re-queued attempt reported
        self._lost_runs: dict[str, int] = {}  # task -> its lost runs at the last poll
        self._final: set[str] = set()
        self._waited: set[tuple[str, int]] = set()

    def new_failures(self, plan: Mapping[str, Any]) -> list[Failure]:
        # Once the plan is over there is no next poll to wait for.
        can_wait = not plan_settled(plan)
        failures: list[Failure] = []
        for ticket in plan.get("tickets") or []:
            if isinstance(ticket, Mapping):
                failures += self._ticket_failures(ticket, can_wait=can_wait)
        return failures

    def _ticket_failures(self, ticket: Mapping[str, Any], *, can_wait: bool) -> list[Failure]:
        attempt = ticket.get("attempt")
        if not isinstance(attempt, int):
            return []
        task_id = str(ticket.get("task_id"))
        message = str(ticket.get("error_message") or "")
        status = ticket.get("status")
        missed = range(self._reported.get(task_id, 0) + 1, attempt)
        failures: list[Failure] = []
        lost_runs = ticket.get("lost_runs")
        lost_runs = lost_runs if isinstance(lost_runs, int) else 0
        if missed:
            # A re-queued ticket shows its previous attempt's error until the next one ends
            # (and, the only attempt that ended since the last poll, lost its worker if the
            # ticket's lost runs grew meanwhile).
            lost = len(missed) == 1 and lost_runs > self._lost_runs.get(task_id, 0)
            shown = (
                {attempt - 1: FailedAttempt(message, lost)}
                if message and status in RETRYING
                else {}
            )
            events = None if missed[0] in shown else self._failed_attempts(ticket)
            for failed in missed:
                seen = (events or {}).get(failed, shown.get(failed))
                waiting = seen is None and events is not None and can_wait
                if waiting and (task_id, failed) not in self._waited:
                    self._waited.add((task_id, failed))
                    return failures  # the next poll reads the events again
                failures.append(
                    Failure(
                        task_id,
                        failed,
                        seen.message if seen else "",
                        final=False,
                        lost=seen.lost if seen else False,
                    )
                )
                self._reported[task_id] = failed
        self._lost_runs[task_id] = lost_runs
        if status == "FAILED" and task_id not in self._final:
            self._final.add(task_id)
            failures.append(Failure(task_id, attempt, message, final=True))
        return failures

    def _failed_attempts(self, ticket: Mapping[str, Any]) -> dict[int, FailedAttempt] | None:
        """The ticket's re-queued attempts from its events; None if they cannot be read."""
        ticket_id = ticket.get("ticket_id")
        if self._events is None or not ticket_id:
            return None
        try:
            return failed_attempts(self._events(str(ticket_id)))
        except (ApiError, ServiceUnreachable) as exc:
            if self._note is not None and not self._noted:
                self._noted = True
                self._note(
                    f"cannot read ticket histories ({inline(exc)}): failed attempts no poll "
                    "saw are shown without their error message"
                )
            return None


@dataclass(frozen=True)
class Progress:
    """Counts of one snapshot."""

    status: str
    total: int
    done: int
    counts: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def progress_of(plan: Mapping[str, Any]) -> Progress:
    """Counts per status from the snapshot's ``counts``; ``done`` = terminal tickets."""
    raw = plan.get("counts") or {}
    counts = {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}
    total = plan.get("task_count")
    if not isinstance(total, int):
        total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in TERMINAL_TICKET_STATUSES)
    return Progress(str(plan.get("status")), total, done, counts)


def bar(fraction: float, width: int, *, unicode: bool) -> str:
    """``[████░░░░]``; ``[####----]`` when the stream cannot print block characters."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    full, empty = ("█", "░") if unicode else ("#", "-")
    return "[" + full * filled + empty * (width - filled) + "]"


def progress_line(
    plan: Mapping[str, Any],
    *,
    bar_width: int = 24,
    unicode: bool = True,
    elapsed: float | None = None,
) -> str:
    """``RUNNING [███░░░] 3/6 50%  COMPLETED 3 · RUNNING 2 · PENDING 1  12s``."""
    progress = progress_of(plan)
    parts = [
        f"{status_label(plan):<9}",
        bar(progress.fraction, bar_width, unicode=unicode),
        f"{progress.done}/{progress.total}",
        f"{progress.fraction:4.0%}",
    ]
    counts = [f"{s} {progress.counts[s]}" for s in STATUS_ORDER if progress.counts.get(s)]
    line = " ".join(parts)
    if counts:
        line += "  " + " · ".join(counts)
    if elapsed is not None:
        line += f"  {elapsed:.0f}s"
    return line


def run_time(plan: Mapping[str, Any], until: str = "completed_at") -> float | None:
    """Seconds from the plan's creation to its terminal status (``created_at`` to
    ``completed_at``), or to another of its times (``settled_at``: its last ticket
    ended); None if the plan does not say."""
    try:
        started = datetime.fromisoformat(plan["created_at"])
        return (datetime.fromisoformat(plan[until]) - started).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def final_summary(plan: Mapping[str, Any], *, elapsed: float | None = None) -> str:
    """The closing lines of a watch: outcome, then every task that did not complete.

    The time is the plan's own run time, and when its last ticket ended later (tickets
    in flight cancelled), that time too; only a plan without its timestamps gets the
    time spent watching (``elapsed``), labelled as such.
    """
    progress = progress_of(plan)
    took = ""
    if (seconds := run_time(plan)) is not None:
        took = f" after {seconds:.1f}s"
        settled = run_time(plan, "settled_at")
        if settled is not None and f"{settled:.1f}" != f"{seconds:.1f}":
            took += f" (settled after {settled:.1f}s)"
    elif elapsed is not None:
        took = f" (watched for {elapsed:.1f}s)"
    finished = f"{progress.done}/{plural(progress.total, 'task')} finished"
    lines = [f"plan {plan.get('plan_id')} {progress.status}{took}: {finished}"]
    if plan.get("error_message"):
        lines.append(f"  reason: {inline(plan['error_message'])}")
    for ticket in plan.get("tickets") or []:
        if isinstance(ticket, Mapping) and ticket.get("status") in ("FAILED", "CANCELLED"):
            message = ticket.get("error_message") or ""
            lines.append(
                f"  {ticket.get('status'):<9} {ticket.get('task_id')}"
                + (f": {inline(message)}" if message else "")
            )
    return "\n".join(lines)


class ProgressDisplay(Protocol):
    """Where a watch shows snapshots, failures and notes."""

    def update(self, plan: JsonObject, failures: list[Failure], elapsed: float) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def _can_print_unicode(stream: TextIO) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


class LiveDisplay:
    """A terminal: one progress line redrawn in place; failures scroll above it."""

    def __init__(self, stream: TextIO, *, bar_width: int = 24, columns: int | None = None) -> None:
        self._stream = stream
        self._bar_width = bar_width
        self._unicode = _can_print_unicode(stream)
        # A line wider than the terminal wraps, and "\r" then redraws only its last row.
        self._columns = columns or shutil.get_terminal_size().columns
        # A narrower bar leaves room for the counts on an 80-column terminal.
        self._bar_width = min(bar_width, max(10, self._columns // 5))
        self._line = ""

    def update(self, plan: JsonObject, failures: list[Failure], elapsed: float) -> None:
        for failure in failures:
            self._print_above(("✗ " if self._unicode else "x ") + failure.text())
        line = progress_line(
            plan, bar_width=self._bar_width, unicode=self._unicode, elapsed=elapsed
        )
        self._line = line if len(line) < self._columns else line[: max(self._columns - 2, 1)] + "…"
        self._stream.write(_ERASE_LINE + self._line)
        self._stream.flush()

    def note(self, text: str) -> None:
        self._print_above(text)

    def _print_above(self, text: str) -> None:
        self._stream.write(_ERASE_LINE + text + "\n" + self._line)
        self._stream.flush()

    def close(self) -> None:
        if self._line:
            self._stream.write("\n")
            self._stream.flush()
        self._line = ""


class PlainDisplay:
    """Not a terminal: a line whenever the status or the counts change, and each failure."""

    def __init__(self, stream: TextIO, *, bar_width: int = 24) -> None:
        self._stream = stream
        self._bar_width = bar_width
        self._last: tuple[str, tuple[tuple[str, int], ...]] | None = None

    def update(self, plan: JsonObject, failures: list[Failure], elapsed: float) -> None:
        for failure in failures:
            self._stream.write(failure.text() + "\n")
        progress = progress_of(plan)
        key = (status_label(plan), tuple(sorted(progress.counts.items())))
        if key != self._last:
            self._last = key
            line = progress_line(plan, bar_width=self._bar_width, unicode=False, elapsed=elapsed)
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


def display_for(stream: TextIO) -> ProgressDisplay:
    """A live display on a terminal, plain lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return LiveDisplay(stream)
    return PlainDisplay(stream)
