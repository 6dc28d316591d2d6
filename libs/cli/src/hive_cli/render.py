"""Rendering of the services' JSON answers as text tables, detail blocks and errors."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from hive_cli.api import ApiError, JsonObject, ServiceUnreachable
from hive_common.text import escape_controls

STATUS_ORDER = ("PENDING", "ASSIGNED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
TERMINAL_PLAN_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
TERMINAL_TICKET_STATUSES = ("COMPLETED", "FAILED", "CANCELLED")
MAX_CELL = 60


def plan_settled(plan: Mapping[str, Any]) -> bool:
    """Whether a plan is over: its status terminal and every ticket terminal
    (``settled_at`` set). A plan is CANCELLED or FAILED as soon as that is decided, while
    its tickets in flight are still being cancelled (and may run on until then); the
    orchestrator's WatchPlan stream ends at ``settled_at`` too. An answer that does not
    carry ``settled_at`` is over at its terminal status."""
    if plan.get("status") not in TERMINAL_PLAN_STATUSES:
        return False
    return "settled_at" not in plan or plan["settled_at"] is not None


def status_label(plan: Mapping[str, Any]) -> str:
    """The plan's status; for one whose status is terminal while tickets are still in
    flight (being cancelled), what it waits for: ``CANCELLED, settling: 1 running``."""
    status = str(plan.get("status"))
    if status not in TERMINAL_PLAN_STATUSES or plan_settled(plan):
        return status
    counts = plan.get("counts")
    counts = counts if isinstance(counts, Mapping) else {}
    in_flight = [
        f"{counts[s]} {s.lower()}"
        for s in STATUS_ORDER
        if s not in TERMINAL_TICKET_STATUSES and isinstance(counts.get(s), int) and counts[s]
    ]
    return f"{status}, settling" + (": " + ", ".join(in_flight) if in_flight else "")


def inline(value: object) -> str:
    """``value`` as text for one line of a terminal: a plan's name or a task's error
    message is anyone's input, and must not drive the terminal or forge lines."""
    return escape_controls(str(value))


def plural(count: object, noun: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def to_json(value: object) -> str:
    """Pretty JSON, as printed by ``--output json``."""
    return json.dumps(value, indent=2, ensure_ascii=False)


EVENT_DETAILS_LIMIT = 4200
"""An event's details in ``tickets show --events``: room for a whole error message (the
services keep 4,000 characters of one)."""


def cell(value: object, *, limit: int = MAX_CELL) -> str:
    """One table cell: ``-`` for nothing, timestamps shortened, one line, bounded."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list):
        text = ",".join(_item(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}={_item(v)}" for k, v in value.items())
    elif isinstance(value, str):
        text = short_time(value)
    else:
        text = str(value)
    text = inline(" ".join(text.split()))
    return text if width(text) <= limit else truncated(text, limit)


def _item(value: object) -> str:
    """An item of a list or object in a cell: text as it is, anything else as JSON (an
    event's result, ``true``; not Python's ``{'a': True}``)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def char_width(char: str) -> int:
    """Terminal columns of one character: 2 for East Asian wide and fullwidth ones (CJK,
    most emoji), 0 for combining marks and invisible format characters, else 1."""
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def width(text: str) -> int:
    """Terminal columns of ``text`` (not ``len``: a CJK character takes two)."""
    return sum(char_width(c) for c in text)


def truncated(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` terminal columns, the last one an ellipsis."""
    kept: list[str] = []
    used = 0
    for char in text:
        used += char_width(char)
        if used > limit - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def short_time(value: str) -> str:
    """An ISO-8601 timestamp as ``YYYY-MM-DD HH:MM:SSZ`` (UTC); any other text unchanged."""
    if len(value) < 19 or value[4] != "-" or value[10] != "T":
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, last_limit: int = MAX_CELL
) -> str:
    """A plain, left-aligned text table (no trailing spaces); ``last_limit``: the width
    the last column's cells are cut at (nothing is aligned after it)."""
    cells = [[cell(v) for v in row[:-1]] + [cell(row[-1], limit=last_limit)] for row in rows]
    widths = [width(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], width(text))
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(t + " " * (w - width(t)) for t, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def counts_text(counts: Mapping[str, Any]) -> str:
    """``COMPLETED 3 · RUNNING 1`` in lifecycle order, zeros left out."""
    parts = [f"{s} {counts[s]}" for s in STATUS_ORDER if counts.get(s)]
    parts += [f"{s} {n}" for s, n in counts.items() if s not in STATUS_ORDER and n]
    return " · ".join(parts) if parts else "no tickets yet"


def plans_table(plans: Sequence[JsonObject]) -> str:
    return table(
        ["PLAN", "STATUS", "TASKS", "NAME", "COUNTS", "CREATED"],
        [
            [
                p.get("plan_id"),
                p.get("status"),
                p.get("task_count"),
                p.get("name"),
                counts_text(p.get("counts") or {}),
                p.get("created_at"),
            ]
            for p in plans
        ],
    )


def plan_detail(plan: JsonObject, *, now: datetime | None = None) -> str:
    """Header lines and the per-ticket table of one plan; ``now`` (default: the clock)
    tells whether the driving replica's lease has expired."""
    lines = [
        f"plan      {plan.get('plan_id')}"
        + (f"  ({inline(plan['name'])})" if plan.get("name") else ""),
        f"status    {status_label(plan)}",
        f"tasks     {plan.get('task_count')}: {counts_text(plan.get('counts') or {})}",
        f"priority  {plan.get('priority')}",
        f"created   {cell(plan.get('created_at'))}",
    ]
    if plan.get("intent_id"):
        lines.append(f"intent    {inline(plan['intent_id'])}")
    if plan.get("completed_at"):
        lines.append(f"finished  {cell(plan.get('completed_at'))}")
    if plan.get("settled_at") and plan.get("settled_at") != plan.get("completed_at"):
        lines.append(f"settled   {cell(plan.get('settled_at'))} (its last ticket ended)")
    if plan.get("cancel_requested_at"):
        lines.append(f"cancelled {cell(plan.get('cancel_requested_at'))} (requested)")
    if plan.get("owner_id"):
        lease = _lease_text(plan.get("owner_lease_expires_at"), now or datetime.now(UTC))
        lines.append(f"driver    {inline(plan['owner_id'])}{lease}")
    if plan.get("error_message"):
        lines.append(f"error     {inline(plan['error_message'])}")
    tickets = plan.get("tickets") or []
    if tickets:
        lines.append("")
        lines.append(tickets_of_plan_table(tickets))
    return "\n".join(lines)


def _lease_text(expires_at: object, now: datetime) -> str:
    """`` (lease until T)``, or that it expired (the replica stopped renewing it)."""
    if not isinstance(expires_at, str):
        return ""
    try:
        expired = datetime.fromisoformat(expires_at) <= now
    except (ValueError, TypeError):  # not a time, or one without a zone
        expired = False
    shown = cell(expires_at)
    if expired:
        return f" (lease expired {shown}, not renewed: see hive plan explain)"
    return f" (lease until {shown})"


def tickets_of_plan_table(tickets: Sequence[JsonObject]) -> str:
    return table(
        ["TASK", "STATUS", "ATTEMPT", "WORKER", "TICKET", "ERROR"],
        [
            [
                t.get("task_id"),
                t.get("status"),
                t.get("attempt"),
                t.get("worker_id"),
                t.get("ticket_id"),
                t.get("error_message"),
            ]
            for t in tickets
        ],
    )


def submission_text(body: JsonObject) -> str:
    """What ``plan submit`` prints: plan id, whether it is new, warnings, ticket ids."""
    plan_id = body.get("plan_id")
    state = "submitted" if body.get("created") else "already submitted (identical plan)"
    tasks = plural(body.get("task_count"), "task")
    lines = [f"plan {plan_id} {state}: {body.get('status')}, {tasks}"]
    for warning in body.get("warnings") or []:
        if isinstance(warning, Mapping):
            lines.append(
                f"warning: {inline(warning.get('field'))}: {inline(warning.get('description'))}"
            )
    ticket_ids = body.get("ticket_ids") or {}
    if ticket_ids:
        rows = [[task, ticket or "(not created yet)"] for task, ticket in ticket_ids.items()]
        lines.append("")
        lines.append(table(["TASK", "TICKET"], rows))
    if body.get("tickets_created") is False:
        lines.append("")
        lines.append("tickets are still being created; `hive plan status` shows them later")
    return "\n".join(lines)


def tickets_table(tickets: Sequence[JsonObject]) -> str:
    return table(
        ["TICKET", "PLAN", "TASK", "TYPE", "STATUS", "ATTEMPT", "WORKER", "UPDATED"],
        [
            [
                t.get("ticket_id"),
                t.get("plan_id"),
                t.get("task_id"),
                t.get("task_type"),
                t.get("status"),
                t.get("attempt"),
                t.get("worker_id"),
                t.get("updated_at"),
            ]
            for t in tickets
        ],
    )


def ticket_detail(
    ticket: JsonObject, events: Sequence[JsonObject] | None = None, *, truncated: bool = False
) -> str:
    """One ticket: where it stands, its error and result (indented JSON), and with
    ``events`` its audit history (``truncated``: more events follow them)."""
    # Attempts that ended with their worker (lost runs) used no retry.
    attempts = 1 + int(ticket.get("max_retries") or 0) + int(ticket.get("lost_runs") or 0)
    lines = [
        f"ticket      {ticket.get('ticket_id')}",
        f"plan        {inline(ticket.get('plan_id'))}  task {inline(ticket.get('task_id'))}"
        f" ({inline(ticket.get('task_type'))})",
        f"status      {ticket.get('status')}, attempt {ticket.get('attempt')} of {attempts}"
        + (f", worker {ticket['worker_id']}" if ticket.get("worker_id") else ""),
        f"created     {cell(ticket.get('created_at'))}",
    ]
    for label, key in (("started", "started_at"), ("finished", "completed_at")):
        if ticket.get(key):
            lines.append(f"{label:<11} {cell(ticket[key])}")
    if ticket.get("error_message"):
        lines.append(f"error       {inline(ticket['error_message'])}")
    for label in ("parameters", "result"):
        if ticket.get(label):
            indented = "\n  ".join(inline(x) for x in to_json(ticket[label]).splitlines())
            lines.append(f"{label}:\n  {indented}")
    if events is not None:
        lines.append("")
        lines.append(
            table(
                ["OCCURRED", "EVENT", "STATUS", "ATTEMPT", "ACTOR", "DETAILS"],
                [
                    [
                        e.get("occurred_at"),
                        e.get("type"),
                        f"{e.get('previous_status') or '-'} -> {e.get('status')}",
                        e.get("attempt"),
                        e.get("actor"),
                        e.get("details"),
                    ]
                    for e in events
                ],
                # The details hold an earlier attempt's error: the one place to read it.
                last_limit=EVENT_DETAILS_LIMIT,
            )
            if events
            else "no audit events yet (the relay delivers them within about a second)"
        )
        if truncated:
            lines.append(f"(the first {len(events)} events: more follow)")
    return "\n".join(lines)


def workers_table(workers: Sequence[JsonObject]) -> str:
    return table(
        ["WORKER", "NAME", "STATUS", "CAPABILITIES", "LOAD", "SUCCESS", "LAST HEARTBEAT"],
        [
            [
                w.get("worker_id"),
                w.get("name"),
                w.get("status"),
                w.get("capabilities"),
                f"{w.get('in_flight')}/{w.get('max_concurrent')}",
                _rate(w.get("success_rate")),
                w.get("last_heartbeat_at"),
            ]
            for w in workers
        ],
    )


def worker_detail(worker: JsonObject) -> str:
    """One worker: identity, status, capabilities and labels, load and its record."""
    lines = [
        f"worker        {worker.get('worker_id')}",
        f"name          {inline(worker.get('name'))}  namespace {inline(worker.get('namespace'))}"
        + (f"  version {inline(worker['version'])}" if worker.get("version") else ""),
        f"status        {worker.get('status')}",
        f"capabilities  {cell(worker.get('capabilities'), limit=10_000)}",
        f"labels        {cell(worker.get('labels'), limit=10_000)}",
        f"load          {worker.get('in_flight')}/{worker.get('max_concurrent')} in flight",
        f"record        {worker.get('succeeded_total')} succeeded, {worker.get('failed_total')}"
        f" failed ({_rate(worker.get('success_rate'))})",
        f"registered    {cell(worker.get('registered_at'))}",
        f"heartbeat     {cell(worker.get('last_heartbeat_at'))}",
    ]
    return "\n".join(lines)


def _rate(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.0%}"
    return "-"


def explanations_text(body: JsonObject) -> str:
    """``plan explain``: one block per task: status, summary and every reason."""
    tasks = body.get("tasks")
    if tasks is None:  # a single task's explanation
        tasks = [body]
    blocks = []
    # The plan's owner let its lease expire: what follows is as it left it.
    stale = body.get("stale_owner")
    if isinstance(stale, Mapping):
        code, message = stale.get("code"), inline(stale.get("message"))
        blocks.append(f"plan {body.get('plan_id')}: [{code}] {message}")
    if not tasks:
        blocks.append(
            f"plan {body.get('plan_id')}: nothing is waiting (use --all to see every task)"
        )
    for task in tasks:
        head = (
            f"{task.get('task_id')}  {task.get('status')}  "
            f"attempt {task.get('attempt')}/{task.get('max_attempts')}"
        )
        if task.get("worker_id"):
            head += f"  worker {task['worker_id']}"
        reasons = [r for r in task.get("reasons") or [] if isinstance(r, Mapping)]
        lines = [head]
        # The summary is the first reason's message; print it once.
        if not reasons or reasons[0].get("message") != task.get("summary"):
            lines.append(f"  {inline(task.get('summary'))}")
        for reason in reasons:
            message = str(reason.get("message"))
            line = f"  - [{reason.get('code')}] {inline(message)}"
            details = _new_details(reason.get("details"), message)
            if details:
                line += "  " + inline(json.dumps(details, ensure_ascii=False, sort_keys=True))
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _new_details(details: object, message: str) -> dict[str, Any]:
    """Details worth printing: not null and not already spelled out in the message."""
    if not isinstance(details, Mapping):
        return {}
    return {k: v for k, v in details.items() if v is not None and not _said(v, message)}


def _said(value: object, message: str) -> bool:
    """Whether ``message`` spells ``value`` out already: a scalar (a time as the tables show
    times), or every key and value of a mapping / item of a list (``{"f": "PENDING"}`` in
    "waiting on f (PENDING)")."""
    if isinstance(value, Mapping):
        return all(_said(k, message) and _said(v, message) for k, v in value.items())
    if isinstance(value, list):
        return all(_said(item, message) for item in value)
    if not isinstance(value, str | int):
        return False
    # As a word of its own: a task "a" is not said by "waiting".
    text = re.escape(short_time(str(value)))
    return re.search(rf"(?<![\w.-]){text}(?![\w.-])", message) is not None


def error_text(error: ApiError | ServiceUnreachable, *, hint: str | None = None) -> str:
    """An error for humans: code, message, every field violation with its JSON path."""
    if isinstance(error, ServiceUnreachable):
        lines = [f"error: {error}"]
        lines.append(f"hint: {error.hint}")
        return "\n".join(lines)
    lines = [f"error: {inline(error.code)}: {inline(error.message)}"]
    violations = error.field_violations
    for path, description in violations:
        lines.append(f"  {inline(path)}: {inline(description)}")
    extra = {k: v for k, v in error.details.items() if k != "field_violations"}
    if extra:
        details = json.dumps(extra, ensure_ascii=False, sort_keys=True)
        lines.append("  details: " + inline(details))
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)


def error_json(error: ApiError | ServiceUnreachable) -> JsonObject:
    """The same error as JSON for ``--output json`` (the services' shape, plus context)."""
    if isinstance(error, ServiceUnreachable):
        return {
            "error": {
                "code": "TIMED_OUT" if error.sent else "UNREACHABLE",
                "message": str(error),
                "details": {"service": error.service, "url": error.url},
            }
        }
    return {
        "error": {
            "code": error.code,
            "message": error.message,
            "details": error.details,
            "http_status": error.status,
            "service": error.service,
        }
    }
