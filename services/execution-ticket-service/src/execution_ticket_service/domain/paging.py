"""Opaque tokens: ListTickets page tokens and WatchTickets cursors; the size of a page.

Both are :mod:`hive_common.tokens` (base64url JSON); a page token is
bound to the filter it was issued for, so reusing it with other filters is bad input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from execution_ticket_service.domain.models import Ticket, TicketFilter
from execution_ticket_service.domain.validation import Violations
from hive_common.batching import bounded_batches
from hive_common.errors import FieldViolation, InvalidArgument
from hive_common.tokens import decode_token, encode_token

T = TypeVar("T")

PAGE_BYTES = 2 * 1024 * 1024
"""A ListTickets page ends before the ticket that would take it past this many bytes (the
first ticket always goes): half of the 4 MiB a gRPC message may hold by default (the
server's send limit, a default client's receive limit), whatever ``page_size`` asks for.
A ticket may legitimately be ~3 MiB (its result up to 1 MiB as JSON, more as protobuf),
so one that large is a page of its own."""


def _decode(token: str) -> dict[str, object] | None:
    body = decode_token(token)
    return body if isinstance(body, dict) else None


def _position(value: object) -> int | None:
    """A sequence number or transaction id from a token: a JSON integer PostgreSQL's
    bigint holds (``true`` is a Python int too, and would reach the database)."""
    if type(value) is int and 0 <= value < 2**63:
        return value
    return None


def filter_digest(ticket_filter: TicketFilter) -> str:
    canonical = json.dumps(
        [
            ticket_filter.plan_id,
            sorted(s.value for s in ticket_filter.statuses),
            ticket_filter.worker_id,
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(after_seq: int, ticket_filter: TicketFilter) -> str:
    return encode_token({"v": 1, "after": after_seq, "f": filter_digest(ticket_filter)})


def decode_page_token(token: str, ticket_filter: TicketFilter, errors: Violations) -> int:
    """The sequence number to continue after (0 for an empty token)."""
    if not token:
        return 0
    body = _decode(token)
    after = _position(body.get("after")) if body else None
    if body is None or body.get("v") != 1 or after is None:
        errors.add("page_token", "is not a page token issued by this service")
        return 0
    if body.get("f") != filter_digest(ticket_filter):
        errors.add("page_token", "was issued for different filters")
        return 0
    return after


def fill_page(
    rows: Sequence[tuple[int, Ticket]],
    *,
    more: bool,
    convert: Callable[[Ticket], T],
    size: Callable[[T], int],
    max_bytes: int = PAGE_BYTES,
) -> tuple[list[T], int | None]:
    """A page of a listing from ``rows`` (``(seq, ticket)`` as read, in seq order; ``more``:
    rows follow them): the tickets converted, up to the first whose ``size`` would take
    the page past ``max_bytes`` (the first always goes), and the seq to continue after
    (None when the page ends the listing). A ticket left out is converted, at most one."""
    converted = ((seq, convert(ticket)) for seq, ticket in rows)
    page = next(bounded_batches(converted, lambda row: size(row[1]), max_bytes=max_bytes), [])
    complete = len(page) == len(rows) and not more
    return [item for _, item in page], None if complete else page[-1][0]


_EVERY_TICKET = TicketFilter()


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A position in the event log: (writer transaction id, sequence), see storage."""

    xid: int
    seq: int


class CursorPurged(InvalidArgument):
    """Events after a log position were deleted by the event purge: reading on from it
    would skip them (``purged_through``: the newest position it deleted)."""

    def __init__(self, purged_through: Cursor) -> None:
        super().__init__(
            "invalid watch request",
            violations=[
                FieldViolation(
                    "cursor",
                    "is older than the event retention (EVENT_RETENTION_HOURS): events after "
                    "it were deleted; watch again without a cursor (include_snapshot sends "
                    "the tickets' current state)",
                )
            ],
        )
        self.purged_through = purged_through


def encode_cursor(
    cursor: Cursor,
    *,
    snapshot_after: int | None = None,
    ticket_filter: TicketFilter = _EVERY_TICKET,
) -> str:
    """``snapshot_after``: the cursor is in the middle of a snapshot (of the tickets
    ``ticket_filter`` matches, which the cursor is then bound to), whose tickets after that
    ticket sequence number are still to be sent (see WatchTickets)."""
    body: dict[str, object] = {"v": 1, "x": cursor.xid, "s": cursor.seq}
    if snapshot_after is not None:
        body["t"] = snapshot_after
        body["f"] = filter_digest(ticket_filter)
    return encode_token(body)


def decode_cursor(token: str, errors: Violations, path: str = "cursor") -> Cursor | None:
    """``None`` for an empty token (start with new events)."""
    if not token:
        return None
    body = _decode(token)
    xid = _position(body.get("x")) if body else None
    seq = _position(body.get("s")) if body else None
    if body is None or body.get("v") != 1 or xid is None or seq is None:
        errors.add(path, "is not a cursor issued by this service")
        return None
    return Cursor(xid=xid, seq=seq)


def decode_watch_cursor(
    token: str, ticket_filter: TicketFilter, errors: Violations, path: str = "cursor"
) -> tuple[Cursor | None, int | None]:
    """A WatchTickets cursor: the log position and, for a cursor taken in the middle of a
    snapshot, the ticket sequence number the rest of the snapshot starts after (such a
    cursor resumes only a watch of the filters it was issued for: another's snapshot
    would be cut short). A plain position suits any filters."""
    cursor = decode_cursor(token, errors, path)
    if cursor is None:
        return None, None
    body = _decode(token)
    if not body or body.get("t") is None:
        return cursor, None
    after = _position(body["t"])
    if after is None:
        errors.add(path, "is not a cursor issued by this service")
        return None, None
    # Cursors issued before they were bound have no "f".
    if body.get("f", filter_digest(ticket_filter)) != filter_digest(ticket_filter):
        errors.add(
            path,
            "was issued by a snapshot watch with other filters (plan_id, worker_id): "
            "resume with those, or watch without a cursor",
        )
        return None, None
    return cursor, after
