"""Who may call what (DESIGN.md section 6), as one pure function.

* service token: everything;
* worker token: reads, WatchTickets for its own worker_id, GenerateToken for a ticket
  assigned to it;
* ticket token: reads, and UpdateTicketStatus to RUNNING/COMPLETED/FAILED for exactly its
  ticket and attempt;
* any token: UpdateTicketStatuses, whose every report is then authorized as an
  UpdateTicketStatus call with the report's ticket token (or the call's token).

Authentication (a valid, unexpired token) happens before; this decides PERMISSION_DENIED.
"""

from __future__ import annotations

from dataclasses import dataclass

from execution_ticket_service.domain.models import Ticket, TicketStatus
from hive_common.auth import TokenClaims, TokenKind
from hive_common.errors import PermissionDenied

READ_METHODS = frozenset({"GetTicket", "ListTickets"})
# Open to every token: each report in it is authorized on its own, as UpdateTicketStatus.
REPORT_METHODS = frozenset({"UpdateTicketStatuses"})
WORKER_UPDATE_TARGETS = frozenset(
    {TicketStatus.RUNNING, TicketStatus.COMPLETED, TicketStatus.FAILED}
)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """The parts of a request that authorization looks at (ids already canonical)."""

    method: str
    ticket_id: str = ""
    attempt: int = 0
    worker_id: str = ""
    status: TicketStatus | None = None
    # GenerateToken: the ticket as stored, to check who it is assigned to.
    ticket: Ticket | None = None


def _deny(message: str, reason: str) -> PermissionDenied:
    return PermissionDenied(message, details={"reason": reason})


def authorize(claims: TokenClaims, request: AccessRequest) -> None:
    """Raise :class:`PermissionDenied` unless ``claims`` may make ``request``."""
    if (
        claims.kind is TokenKind.SERVICE
        or request.method in READ_METHODS
        or request.method in REPORT_METHODS
    ):
        return
    if claims.kind is TokenKind.WORKER:
        if request.method == "WatchTickets":
            if not request.worker_id:
                raise _deny("a worker may only watch its own tickets (set worker_id)", "worker")
            if request.worker_id != claims.worker_id:
                raise _deny("a worker may only watch its own tickets", "worker")
            return
        if request.method == "GenerateToken":
            if request.ticket is None or request.ticket.worker_id != claims.worker_id:
                raise _deny("the ticket is not assigned to this worker", "worker")
            return
    if claims.kind is TokenKind.TICKET and request.method == "UpdateTicketStatus":
        if request.ticket_id != (claims.ticket_id or "").lower():
            raise _deny("the token is for another ticket", "ticket")
        if request.attempt != claims.attempt:
            raise _deny("the token is for another attempt", "attempt")
        if request.status not in WORKER_UPDATE_TARGETS:
            raise _deny("a ticket token may only report RUNNING, COMPLETED or FAILED", "status")
        return
    raise _deny(f"a {claims.kind.value} token may not call {request.method}", "kind")
