"""RecentTickets: a bounded memory of the last written state of unfinished tickets."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from execution_ticket_service.domain.models import Ticket, TicketSpec, TicketStatus
from execution_ticket_service.storage.tickets import RecentTickets

S = TicketStatus
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ticket(n: int, status: S = S.ASSIGNED, version: int = 2) -> Ticket:
    return Ticket(
        ticket_id=f"00000000-0000-0000-0000-{n:012d}",
        spec=TicketSpec(plan_id="p", task_id=f"t{n}", task_type="echo"),
        status=status,
        attempt=1,
        version=version,
        created_at=NOW,
        updated_at=NOW,
        worker_id="w1",
    )


def test_keeps_the_latest_state_of_each_ticket() -> None:
    recent = RecentTickets(10)
    recent.put(ticket(1))
    running = replace(ticket(1), status=S.RUNNING, version=3)
    recent.put(running)
    assert recent.get(ticket(1).ticket_id) == running
    assert recent.get(ticket(2).ticket_id) is None
    assert len(recent) == 1


def test_forgets_finished_tickets() -> None:
    recent = RecentTickets(10)
    recent.put(ticket(1))
    recent.put(replace(ticket(1), status=S.COMPLETED, version=3))
    assert recent.get(ticket(1).ticket_id) is None
    assert len(recent) == 0


def test_forgets_the_least_recently_written_beyond_its_size() -> None:
    recent = RecentTickets(2)
    recent.put(ticket(1))
    recent.put(ticket(2))
    recent.put(replace(ticket(1), status=S.RUNNING, version=3))  # 1 is now the newest
    recent.put(ticket(3))
    assert recent.get(ticket(2).ticket_id) is None
    assert recent.get(ticket(1).ticket_id) is not None
    assert recent.get(ticket(3).ticket_id) is not None
    assert len(recent) == 2


def test_size_zero_remembers_nothing() -> None:
    recent = RecentTickets(0)
    recent.put(ticket(1))
    assert recent.get(ticket(1).ticket_id) is None


def test_forgets_the_least_recently_written_beyond_its_bytes() -> None:
    # Counted only: 5,000 tickets of 64 KiB parameters would have held 320 MB.
    def big(n: int) -> Ticket:
        spec = TicketSpec(
            plan_id="p", task_id=f"t{n}", task_type="echo", parameters={"b": "x" * 1000}
        )
        return replace(ticket(n), spec=spec)

    recent = RecentTickets(10, max_bytes=2500)
    first, second = big(1), big(2)
    recent.put(first)
    recent.put(second)
    recent.put(replace(first, status=S.RUNNING, version=3))  # same spec: not counted twice
    assert len(recent) == 2
    recent.put(big(3))
    assert recent.get(second.ticket_id) is None  # the least recently written
    assert recent.get(first.ticket_id) is not None
    assert len(recent) == 2
    recent.put(replace(first, status=S.COMPLETED, version=4))
    recent.put(big(4))
    assert len(recent) == 2  # the finished one's bytes were given back
