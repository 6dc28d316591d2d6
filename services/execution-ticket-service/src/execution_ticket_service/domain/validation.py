"""Input validation: every problem is reported at once as a FieldViolation."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from execution_ticket_service.domain.ids import canonical_if_uuid
from execution_ticket_service.domain.models import (
    Assignment,
    JsonObject,
    Priority,
    StatusUpdate,
    Ticket,
    TicketEvent,
    TicketFilter,
    TicketSpec,
    TicketStatus,
)
from execution_ticket_service.domain.state_machine import UPDATE_TARGETS
from hive_common.errors import FieldViolation, InvalidArgument
from hive_common.text import shown

MAX_ID_LENGTH = 200
MAX_TEXT_LENGTH = 4000
MAX_LIST_ITEMS = 200
# Objects and arrays inside ``parameters`` / ``result``, the value itself being level 1 (as
# the orchestrator counts). Protobuf decoders refuse messages nested over 100 levels and a
# Struct object costs three: 32 levels still fit the deepest message that carries a ticket
# (a WatchTicketsResponse); one more could be stored but never delivered to a watcher.
MAX_JSON_NESTING = 32


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds and defaults for requests (configurable through the service settings)."""

    max_parameters_bytes: int = 64 * 1024
    max_result_bytes: int = 1024 * 1024
    max_batch_size: int = 10_000
    default_timeout_seconds: int = 3600
    max_timeout_seconds: int = 7 * 24 * 3600
    max_retries: int = 100
    default_lease_seconds: int = 60
    max_lease_seconds: int = 24 * 3600
    default_page_size: int = 100
    max_page_size: int = 1000
    default_token_ttl_seconds: int = 3600
    max_token_ttl_seconds: int = 24 * 3600


@dataclass(frozen=True, slots=True)
class RawTicketSpec:
    """A TicketSpec as it arrives, enums by name ("" = unspecified), nothing checked yet."""

    plan_id: str = ""
    task_id: str = ""
    task_type: str = ""
    intent_id: str = ""
    description: str = ""
    parameters: JsonObject = field(default_factory=dict)
    required_capabilities: Sequence[str] = ()
    depends_on: Sequence[str] = ()
    priority: str = ""
    max_retries: int = 0
    timeout_seconds: int = 0


class Violations:
    """Collects violations; :meth:`raise_if_any` ends validation with one error."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, path: str, description: str) -> None:
        self.items.append(FieldViolation(field=path, description=description))

    def raise_if_any(self, message: str = "invalid request") -> None:
        if self.items:
            raise InvalidArgument(message, violations=self.items)


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _has_control_chars(value: str) -> bool:
    return _CONTROL_CHARS.search(value) is not None


def check_identifier(value: str, path: str, errors: Violations, *, required: bool = True) -> None:
    """A client-chosen id (plan, task, worker, capability): non-blank, bounded, printable."""
    if not value.strip():
        if required:
            errors.add(path, "is required")
        elif value:
            errors.add(path, "must not be blank")
        return
    if len(value) > MAX_ID_LENGTH:
        errors.add(path, f"must be at most {MAX_ID_LENGTH} characters")
    if _has_control_chars(value) or value != value.strip():
        errors.add(path, "must not contain control characters or surrounding whitespace")


def check_uuid(value: str, path: str, errors: Violations) -> str:
    """Returns the canonical (lower-case, hyphenated) form, or ``value`` if it is invalid."""
    if not value:
        errors.add(path, "is required")
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        errors.add(path, "must be a UUID")
        return value


NUL = "\x00"
_NUL_MESSAGE = "must not contain NUL (\\u0000) characters"


def check_no_nul(value: str, path: str, errors: Violations) -> None:
    """PostgreSQL text and jsonb cannot store NUL: refuse it as bad input, not a DB error."""
    if NUL in value:
        errors.add(path, _NUL_MESSAGE)


def check_json(value: Any, path: str, errors: Violations, *, nesting: int = 1) -> None:
    """What a JSON value (``parameters``, ``result``) may hold beyond the JSON grammar:
    no NUL in any string (keys too: PostgreSQL cannot store it), only finite numbers, and
    objects and arrays nested at most :data:`MAX_JSON_NESTING` deep (``value`` itself is
    level ``nesting``).

    A bad string is named by its path (``result.foo.bar[1]``); a bad key by the object
    that holds it (the key itself cannot be echoed back safely).
    """
    if isinstance(value, str):
        check_no_nul(value, path, errors)
    elif isinstance(value, float):
        if not math.isfinite(value):
            errors.add(path, f"{value} is not a JSON number (only finite numbers are)")
    elif isinstance(value, dict | list | tuple) and nesting > MAX_JSON_NESTING:
        errors.add(path, f"nests more than {MAX_JSON_NESTING} levels deep")
    elif isinstance(value, dict):
        for key, item in value.items():
            if NUL in key:
                errors.add(path, f"key {key!r} {_NUL_MESSAGE}")
                continue
            check_json(item, f"{path}.{key}", errors, nesting=nesting + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]", errors, nesting=nesting + 1)


def _check_text(value: str, path: str, errors: Violations) -> None:
    if len(value) > MAX_TEXT_LENGTH:
        errors.add(path, f"must be at most {MAX_TEXT_LENGTH} characters")
    check_no_nul(value, path, errors)


_ESCAPED_NUL = "\\u0000"


# One encoder for every call: json.dumps with options builds a new one each time (~40 %
# of a small document's encoding time). Sizes are of the UTF-8 JSON text, non-ASCII
# characters as themselves (ensure_ascii would count "é" as the 6 bytes of \u00e9: a
# 400 KB result in Portuguese measured 1.2 MB); as fast on ASCII, ~15 % slower on a 1 KB
# object with accents, 3x faster on mostly non-ASCII text.
_json_text = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _utf8_size(text: str) -> int:
    # surrogatepass: a lone surrogate (which no protobuf string can hold) is measured, not
    # an exception.
    return len(text.encode("utf-8", "surrogatepass"))


def _may_need_checking(encoded: str) -> bool:
    """Whether :func:`check_json` could find anything in the value ``encoded`` is the JSON
    text of (walking every value costs more than these scans): json.dumps writes every
    NUL (in keys too) as \\u0000 (also with ensure_ascii off: control characters are always
    escaped) and non-finite numbers as NaN / Infinity, and a value
    nested deeper than the limit has more opening brackets than that."""
    return (
        _ESCAPED_NUL in encoded
        or "NaN" in encoded
        or "Infinity" in encoded
        or encoded.count("{") + encoded.count("[") > MAX_JSON_NESTING
    )


def json_size(value: Any) -> int:
    """``value``'s size as compact UTF-8 JSON: what the limits and the memory budgets count."""
    return _utf8_size(_json_text(value))


def _too_large(size: int, limit: int) -> str:
    return f"is {size:,} bytes as JSON, at most {limit:,}"


def payload_bytes(ticket: Ticket) -> int:
    """About what a ticket holds in memory beyond its fixed fields: its parameters and
    result as JSON (the unbounded part; the rest is a few hundred bytes)."""
    size = json_size(ticket.spec.parameters) if ticket.spec.parameters else 0
    return size + (json_size(ticket.result) if ticket.result else 0)


def event_payload_bytes(event: TicketEvent) -> int:
    """:func:`payload_bytes` of the event's ticket plus the result its details hold (a
    re-queue keeps the failed attempt's, a late result the refused one: up to a result's
    size each)."""
    result = event.details.get("result")
    return payload_bytes(event.ticket) + (json_size(result) if result else 0)


def _check_id_list(values: Sequence[str], path: str, errors: Violations) -> tuple[str, ...]:
    if len(values) > MAX_LIST_ITEMS:
        errors.add(path, f"must have at most {MAX_LIST_ITEMS} items")
    seen: set[str] = set()
    for index, value in enumerate(values):
        check_identifier(value, f"{path}[{index}]", errors)
        if value in seen:
            errors.add(f"{path}[{index}]", f"duplicate value {value!r}")
        seen.add(value)
    return tuple(values)


def parse_priority(value: str, path: str, errors: Violations) -> Priority:
    if value in ("", "UNSPECIFIED"):
        return Priority.NORMAL
    try:
        return Priority(value)
    except ValueError:
        errors.add(path, f"unknown priority {value!r}")
        return Priority.NORMAL


_STATUS_NAMES = ", ".join(s.value for s in TicketStatus)


def parse_status(value: str, path: str, errors: Violations) -> TicketStatus | None:
    """A status name in any case (``pending``, as the other services' filters take it)."""
    try:
        return TicketStatus(value.upper())
    except ValueError:
        problem = f"unknown status {shown(value)!r}" if value else "no status (unspecified)"
        errors.add(path, f"{problem}; use one of {_STATUS_NAMES}")
        return None


def validate_spec(
    raw: RawTicketSpec, limits: Limits, errors: Violations, prefix: str = "ticket"
) -> TicketSpec:
    """Check one spec, adding violations under ``prefix``; returns it with defaults resolved."""
    check_identifier(raw.plan_id, f"{prefix}.plan_id", errors)
    check_identifier(raw.task_id, f"{prefix}.task_id", errors)
    check_identifier(raw.task_type, f"{prefix}.task_type", errors)
    check_identifier(raw.intent_id, f"{prefix}.intent_id", errors, required=False)
    _check_text(raw.description, f"{prefix}.description", errors)
    encoded = _json_text(raw.parameters)
    size = _utf8_size(encoded)
    if size > limits.max_parameters_bytes:
        errors.add(f"{prefix}.parameters", _too_large(size, limits.max_parameters_bytes))
    elif _may_need_checking(encoded):
        check_json(raw.parameters, f"{prefix}.parameters", errors)
    capabilities = _check_id_list(
        raw.required_capabilities, f"{prefix}.required_capabilities", errors
    )
    depends_on = _check_id_list(raw.depends_on, f"{prefix}.depends_on", errors)
    if raw.task_id and raw.task_id in depends_on:
        errors.add(f"{prefix}.depends_on", "a task cannot depend on itself")
    priority = parse_priority(raw.priority, f"{prefix}.priority", errors)
    if not 0 <= raw.max_retries <= limits.max_retries:
        errors.add(f"{prefix}.max_retries", f"must be between 0 and {limits.max_retries}")
    timeout = raw.timeout_seconds or limits.default_timeout_seconds
    if not 0 < timeout <= limits.max_timeout_seconds:
        errors.add(
            f"{prefix}.timeout_seconds",
            f"must be between 1 and {limits.max_timeout_seconds} (0 = default)",
        )
    return TicketSpec(
        plan_id=raw.plan_id,
        task_id=raw.task_id,
        task_type=raw.task_type,
        intent_id=raw.intent_id,
        description=raw.description,
        parameters=dict(raw.parameters),
        required_capabilities=capabilities,
        depends_on=depends_on,
        priority=priority,
        max_retries=raw.max_retries,
        timeout_seconds=timeout,
    )


def validate_create(raw: RawTicketSpec, limits: Limits) -> TicketSpec:
    errors = Violations()
    spec = validate_spec(raw, limits, errors)
    errors.raise_if_any("invalid ticket")
    return spec


def _check_batch_size(
    size: int, path: str, limits: Limits, errors: Violations, *, message: str
) -> None:
    """Not empty, not over the limit; an oversized batch is refused before its items are
    looked at (each item would only add work and violations)."""
    if not size:
        errors.add(path, "must not be empty")
    if size > limits.max_batch_size:
        errors.add(path, f"must have at most {limits.max_batch_size} items")
        errors.raise_if_any(message)


def validate_batch(raws: Sequence[RawTicketSpec], limits: Limits) -> list[TicketSpec]:
    """All-or-nothing: any bad spec or a repeated (plan_id, task_id) rejects the batch."""
    errors = Violations()
    _check_batch_size(len(raws), "tickets", limits, errors, message="invalid batch")
    specs: list[TicketSpec] = []
    seen: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(raws):
        spec = validate_spec(raw, limits, errors, prefix=f"tickets[{index}]")
        key = (spec.plan_id, spec.task_id)
        if key in seen:
            errors.add(
                f"tickets[{index}].task_id",
                f"repeats tickets[{seen[key]}] (same plan_id and task_id)",
            )
        seen.setdefault(key, index)
        specs.append(spec)
    errors.raise_if_any("invalid batch")
    return specs


def validate_ticket_id(value: str, path: str = "ticket_id") -> str:
    errors = Violations()
    ticket_id = check_uuid(value, path, errors)
    errors.raise_if_any("invalid ticket id")
    return ticket_id


@dataclass(frozen=True, slots=True)
class RawAssignment:
    """An AssignTicket request's fields, as received."""

    ticket_id: str
    worker_id: str
    lease_seconds: int
    attempt: int
    expected_version: int | None
    worker_capacity: int = 0


def _check_assignment(
    raw: RawAssignment, limits: Limits, errors: Violations, *, prefix: str = ""
) -> Assignment:
    ticket_id = check_uuid(raw.ticket_id, f"{prefix}ticket_id", errors)
    check_identifier(raw.worker_id, f"{prefix}worker_id", errors)
    lease = raw.lease_seconds or limits.default_lease_seconds
    if not 0 < lease <= limits.max_lease_seconds:
        errors.add(f"{prefix}lease_seconds", f"must be between 1 and {limits.max_lease_seconds}")
    if raw.attempt < 1:
        errors.add(f"{prefix}attempt", "must be at least 1 (the ticket's current attempt)")
    if raw.expected_version is not None and raw.expected_version < 1:
        errors.add(f"{prefix}expected_version", "must be at least 1")
    if raw.worker_capacity < 0:
        errors.add(f"{prefix}worker_capacity", "must not be negative (0: not checked)")
    return Assignment(
        ticket_id=ticket_id,
        worker_id=canonical_if_uuid(raw.worker_id),
        lease_seconds=lease,
        attempt=raw.attempt,
        expected_version=raw.expected_version,
        worker_capacity=raw.worker_capacity,
    )


def validate_assignment(raw: RawAssignment, limits: Limits) -> Assignment:
    errors = Violations()
    assignment = _check_assignment(raw, limits, errors)
    errors.raise_if_any("invalid assignment")
    return assignment


def validate_assignments(raws: Sequence[RawAssignment], limits: Limits) -> list[Assignment]:
    """All-or-nothing validation of AssignTickets: any bad item rejects the request."""
    errors = Violations()
    _check_batch_size(len(raws), "assignments", limits, errors, message="invalid assignments")
    assignments: list[Assignment] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raws):
        assignment = _check_assignment(raw, limits, errors, prefix=f"assignments[{index}].")
        if assignment.ticket_id in seen:
            errors.add(
                f"assignments[{index}].ticket_id",
                f"repeats assignments[{seen[assignment.ticket_id]}]",
            )
        seen.setdefault(assignment.ticket_id, index)
        assignments.append(assignment)
    errors.raise_if_any("invalid assignments")
    return assignments


def validate_report_batch(ticket_ids: Sequence[str], limits: Limits) -> None:
    """What UpdateTicketStatuses refuses whole: no reports, too many, a ticket twice (each
    report is then validated on its own, :func:`validate_status_update`)."""
    errors = Violations()
    _check_batch_size(len(ticket_ids), "reports", limits, errors, message="invalid reports")
    seen: dict[str, int] = {}
    for index, ticket_id in enumerate(ticket_ids):
        key = canonical_if_uuid(ticket_id)
        if key in seen:
            errors.add(f"reports[{index}].update.ticket_id", f"repeats reports[{seen[key]}]")
        seen.setdefault(key, index)
    errors.raise_if_any("invalid reports")


# A result's protobuf (Struct) size at most this many times MAX_RESULT_BYTES. Most JSON is
# at most 2.75 times larger as a Struct (11 bytes for each `0.0,`), but a list of small
# whole numbers is 5.5 times (each `0,`): without this bound a result within
# MAX_RESULT_BYTES could make a ticket that no answer can carry (README: Message size).
STRUCT_SIZE_RATIO = 2.75


def validate_status_update(
    *,
    ticket_id: str,
    status: str,
    attempt: int,
    expected_version: int | None,
    result: JsonObject | None,
    error_message: str,
    permanent: bool,
    limits: Limits,
    worker_lost: bool = False,
    result_struct_bytes: int = 0,
) -> StatusUpdate:
    """``result_struct_bytes``: the result's size as it came, a protobuf Struct (0 if not)."""
    errors = Violations()
    ticket_id = check_uuid(ticket_id, "ticket_id", errors)
    target = parse_status(status, "status", errors) if status else None
    if not status:
        errors.add("status", "is required")
    elif target is not None and target not in UPDATE_TARGETS:
        allowed = ", ".join(sorted(s.value for s in UPDATE_TARGETS))
        errors.add("status", f"must be one of {allowed}")
    if attempt < 0 or (attempt == 0 and target is not TicketStatus.CANCELLED):
        errors.add("attempt", "must be at least 1 (0 is only allowed to cancel)")
    if expected_version is not None and expected_version < 1:
        errors.add("expected_version", "must be at least 1")
    result_size = json_size(result) if result is not None else 0
    struct_limit = int(limits.max_result_bytes * STRUCT_SIZE_RATIO)
    if result_size > limits.max_result_bytes:
        errors.add("result", _too_large(result_size, limits.max_result_bytes))
    elif result_struct_bytes > struct_limit:
        errors.add(
            "result",
            f"is {result_struct_bytes:,} bytes as a protobuf Struct, at most {struct_limit:,}"
            f" ({STRUCT_SIZE_RATIO} times MAX_RESULT_BYTES: a list of small numbers takes 5.5"
            " times its JSON size)",
        )
    elif result is not None:
        check_json(result, "result", errors)
    _check_text(error_message, "error_message", errors)
    # What a status does not keep is refused, not dropped without a word.
    if result is not None and target in (TicketStatus.RUNNING, TicketStatus.CANCELLED):
        errors.add("result", "only applies to COMPLETED and FAILED")
    if error_message and target in (TicketStatus.RUNNING, TicketStatus.COMPLETED):
        errors.add("error_message", "only applies to FAILED and CANCELLED")
    if permanent and target is not TicketStatus.FAILED:
        errors.add("permanent", "only applies to FAILED")
    if worker_lost and target is not TicketStatus.FAILED:
        errors.add("worker_lost", "only applies to FAILED")
    errors.raise_if_any("invalid status update")
    assert target is not None
    return StatusUpdate(
        ticket_id=ticket_id,
        status=target,
        attempt=attempt,
        expected_version=expected_version,
        result=result,
        error_message=error_message,
        permanent=permanent,
        worker_lost=worker_lost,
    )


def validate_filter(
    *,
    plan_id: str,
    statuses: Iterable[str],
    worker_id: str,
    errors: Violations,
    statuses_path: str = "statuses",
) -> TicketFilter:
    check_identifier(plan_id, "plan_id", errors, required=False)
    check_identifier(worker_id, "worker_id", errors, required=False)
    parsed: set[TicketStatus] = set()
    for index, value in enumerate(statuses):
        status = parse_status(value, f"{statuses_path}[{index}]", errors)
        if status is not None:
            parsed.add(status)
    return TicketFilter(
        plan_id=plan_id, statuses=frozenset(parsed), worker_id=canonical_if_uuid(worker_id)
    )


def resolve_page_size(page_size: int, limits: Limits, errors: Violations) -> int:
    if page_size < 0:
        errors.add("page_size", "must not be negative")
        return limits.default_page_size
    return min(page_size or limits.default_page_size, limits.max_page_size)


def resolve_token_ttl(ttl_seconds: int, limits: Limits) -> int:
    errors = Violations()
    ttl = ttl_seconds or limits.default_token_ttl_seconds
    if not 0 < ttl <= limits.max_token_ttl_seconds:
        errors.add("ttl_seconds", f"must be between 1 and {limits.max_token_ttl_seconds}")
    errors.raise_if_any("invalid token request")
    return ttl
