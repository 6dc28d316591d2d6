"""Who may call what: every (token kind, method) pair, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from execution_ticket_service.domain.authorization import AccessRequest, authorize
from execution_ticket_service.domain.models import Ticket, TicketSpec, TicketStatus
from hive_common.auth import TokenClaims, TokenKind
from hive_common.errors import PermissionDenied

TID = "6f1f0a3e-8a47-4cf8-9a0f-3c1d1fbb7a11"
OTHER = "0e6b7d2c-1111-4c3e-9d55-5b0c8e1e2f33"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def claims(kind: TokenKind, **kwargs: object) -> TokenClaims:
    values: dict[str, object] = {
        "kind": kind,
        "subject": "w1" if kind is not TokenKind.SERVICE else "orchestrator",
        "issuer": "i",
        "audience": "a",
        "jti": "j",
        "issued_at": NOW,
        "expires_at": NOW,
    }
    if kind is not TokenKind.SERVICE:
        values["worker_id"] = "w1"
    if kind is TokenKind.TICKET:
        values.update(ticket_id=TID.upper(), plan_id="p", attempt=2)
    values.update(kwargs)
    return TokenClaims(**values)  # type: ignore[arg-type]


def ticket_of(worker: str) -> Ticket:
    return Ticket(
        ticket_id=TID,
        spec=TicketSpec(plan_id="p", task_id="t", task_type="echo"),
        status=TicketStatus.ASSIGNED,
        attempt=2,
        version=2,
        created_at=NOW,
        updated_at=NOW,
        worker_id=worker,
    )


SERVICE = claims(TokenKind.SERVICE)
WORKER = claims(TokenKind.WORKER)
TICKET = claims(TokenKind.TICKET)
R, C, F, X = (
    TicketStatus.RUNNING,
    TicketStatus.COMPLETED,
    TicketStatus.FAILED,
    TicketStatus.CANCELLED,
)
METHODS = [
    "CreateTicket",
    "BatchCreateTickets",
    "GetTicket",
    "ListTickets",
    "AssignTicket",
    "UpdateTicketStatus",
    "UpdateTicketStatuses",
    "GenerateToken",
    "WatchTickets",
]

CASES: list[tuple[str, TokenClaims, AccessRequest, bool]] = [
    *[(f"service {m}", SERVICE, AccessRequest(method=m), True) for m in METHODS],
    *[
        (f"{c.kind} {m}", c, AccessRequest(method=m), True)
        for c in (WORKER, TICKET)
        for m in ("GetTicket", "ListTickets")
    ],
    *[
        (f"{c.kind} {m}", c, AccessRequest(method=m, ticket_id=TID, attempt=2), False)
        for c in (WORKER, TICKET)
        for m in ("CreateTicket", "BatchCreateTickets", "AssignTicket")
    ],
    # Open to every token: each report in it is authorized on its own (as UpdateTicketStatus).
    *[
        (f"{c.kind} UpdateTicketStatuses", c, AccessRequest(method="UpdateTicketStatuses"), True)
        for c in (WORKER, TICKET)
    ],
    ("worker watches itself", WORKER, AccessRequest(method="WatchTickets", worker_id="w1"), True),
    ("worker watches another", WORKER, AccessRequest(method="WatchTickets", worker_id="w2"), False),
    ("worker watches everything", WORKER, AccessRequest(method="WatchTickets"), False),
    ("ticket token watches", TICKET, AccessRequest(method="WatchTickets", worker_id="w1"), False),
    (
        "worker token for its ticket",
        WORKER,
        AccessRequest(method="GenerateToken", ticket=ticket_of("w1")),
        True,
    ),
    (
        "worker token for another's ticket",
        WORKER,
        AccessRequest(method="GenerateToken", ticket=ticket_of("w2")),
        False,
    ),
    ("worker token, no ticket", WORKER, AccessRequest(method="GenerateToken"), False),
    (
        "ticket token mints",
        TICKET,
        AccessRequest(method="GenerateToken", ticket=ticket_of("w1")),
        False,
    ),
    (
        "worker token updates",
        WORKER,
        AccessRequest(method="UpdateTicketStatus", ticket_id=TID, attempt=2, status=R),
        False,
    ),
    *[
        (
            f"ticket token reports {s}",
            TICKET,
            AccessRequest(method="UpdateTicketStatus", ticket_id=TID, attempt=2, status=s),
            True,
        )
        for s in (R, C, F)
    ],
    (
        "ticket token cancels",
        TICKET,
        AccessRequest(method="UpdateTicketStatus", ticket_id=TID, attempt=2, status=X),
        False,
    ),
    (
        "ticket token, unknown status",
        TICKET,
        AccessRequest(method="UpdateTicketStatus", ticket_id=TID, attempt=2, status=None),
        False,
    ),
    (
        "ticket token, other ticket",
        TICKET,
        AccessRequest(method="UpdateTicketStatus", ticket_id=OTHER, attempt=2, status=R),
        False,
    ),
    (
        "ticket token, other attempt",
        TICKET,
        AccessRequest(method="UpdateTicketStatus", ticket_id=TID, attempt=1, status=R),
        False,
    ),
    ("unknown method", WORKER, AccessRequest(method="DropEverything"), False),
]


@pytest.mark.parametrize(
    ("token", "request_", "allowed"),
    [(c, r, a) for _, c, r, a in CASES],
    ids=[name for name, *_ in CASES],
)
def test_authorize(token: TokenClaims, request_: AccessRequest, allowed: bool) -> None:
    if allowed:
        authorize(token, request_)
    else:
        with pytest.raises(PermissionDenied):
            authorize(token, request_)
