"""What the transport needs from storage, so it depends on the domain only
(transport → domain ← storage): implemented by ``storage.tickets.TicketRepository`` and
``storage.audit.AuditStore``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from execution_ticket_service.domain.models import (
    Assignment,
    StatusUpdate,
    Ticket,
    TicketFilter,
    TicketSpec,
)
from execution_ticket_service.domain.paging import Cursor
from hive_common.errors import HiveError


class TicketStore(Protocol):
    """Tickets and their changes (see ``TicketRepository`` for each method's contract)."""

    async def create(self, spec: TicketSpec, *, actor: str) -> tuple[Ticket, bool]: ...

    async def create_many(
        self, specs: Sequence[TicketSpec], *, actor: str
    ) -> list[tuple[Ticket, bool]]: ...

    async def get(self, ticket_id: str) -> Ticket: ...

    async def list_page(
        self, ticket_filter: TicketFilter, *, after_seq: int, limit: int
    ) -> tuple[list[tuple[int, Ticket]], bool]: ...

    async def assign(self, request: Assignment, *, actor: str) -> Ticket: ...

    async def assign_many(
        self, requests: Sequence[Assignment], *, actor: str
    ) -> list[Ticket | HiveError]: ...

    async def update_status(self, update: StatusUpdate, *, actor: str) -> Ticket: ...

    async def update_status_many(
        self, updates: Sequence[tuple[StatusUpdate, str]]
    ) -> list[Ticket | HiveError]: ...

    async def current_position(self) -> Cursor: ...

    async def check_resumable(self, cursor: Cursor) -> None: ...

    async def snapshot(
        self, ticket_filter: TicketFilter, *, after_seq: int = 0, limit: int
    ) -> tuple[Cursor, list[tuple[int, Ticket]]]: ...


class AuditTrail(Protocol):
    """The audit trail of tickets (MongoDB)."""

    async def history(self, ticket_id: str, *, limit: int) -> list[dict[str, Any]]:
        """The audit trail of one ticket, oldest first."""
        ...
