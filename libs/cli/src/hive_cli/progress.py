"""Progress of a plan from successive snapshots (``GET /api/v1/plans/{id}`` bodies).

The pure part (:func:`progress_line`, :class:`FailureTracker`) is what the unit tests
check; the displays only decide where the text goes: a live, redrawn line on a terminal,
plain appended lines anywhere else (CI logs, pipes).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from hive_cli.api import JsonObject
from hive_cli.render import STATUS_ORDER, inline

TERMINAL_TICKET_STATUSES = ("COMPLETED", "FAILED", "CANCELLED")
_ERASE_LINE = "\r\x1b[2K"


@dataclass(frozen=True)
class Failure:
    """One failed attempt seen in a snapshot."""

    task_id: str
    attempt: int
    message: str
    final: bool

    def text(self) -> str:
        message = inline(self.message)
        if self.final:
            return f"FAILED  {self.task_id} (attempt {self.attempt}): {message}"
        return f"retry   {self.task_id} attempt {self.attempt} failed: {message}"


class FailureTracker:
    """Reports each failed attempt once, however many snapshots show it.

    The ticket keeps the last failure's ``error_message`` when it is re-queued with
    ``attempt + 1``: a non-terminal ticket with an error means attempt ``attempt - 1``
    failed; a FAILED ticket means its current attempt failed for good.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, int, bool, str]] = set()

    def new_failures(self, plan: Mapping[str, Any]) -> list[Failure]:
        failures = []
        for ticket in plan.get("tickets") or []:
            if not isinstance(ticket, Mapping):
                continue
            message = ticket.get("error_message") or ""
            status = ticket.get("status")
            attempt = ticket.get("attempt") or 0
            if not message or status == "CANCELLED" or not isinstance(attempt, int):
                continue
            final = status == "FAILED"
            failed_attempt = attempt if final else attempt - 1
            if failed_attempt < 1:
                continue
            key = (str(ticket.get("task_id")), failed_attempt, final, message)
            if key in self._seen:
                continue
            self._seen.add(key)
            failures.append(Failure(key[0], failed_attempt, message, final))
        return failures


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
        f"{progress.status:<9}",
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


def final_summary(plan: Mapping[str, Any], *, elapsed: float | None = None) -> str:
    """The closing lines of a watch: outcome, then every task that did not complete."""
    progress = progress_of(plan)
    took = f" after {elapsed:.1f}s" if elapsed is not None else ""
    finished = f"{progress.done}/{progress.total} tasks finished"
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
        key = (progress.status, tuple(sorted(progress.counts.items())))
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
