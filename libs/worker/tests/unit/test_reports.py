"""ReportBatcher: which reports share a call (the grouping itself: hive_common's
GroupCommit tests)."""

from __future__ import annotations

import asyncio

import pytest

from hive_worker.reports import ReportBatcher
from neuralhive.ticket.v1 import ticket_service_pb2 as pb


def report(ticket_id: str, error: str = "") -> pb.TicketStatusReport:
    update = pb.UpdateTicketStatusRequest(ticket_id=ticket_id, attempt=1, error_message=error)
    return pb.TicketStatusReport(update=update, ticket_token=f"token-{ticket_id}")


class FakeService:
    """Answers each report with its ticket, recording which reports shared a call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def send(self, reports: list[pb.TicketStatusReport]) -> list[pb.ExecutionTicket]:
        self.calls.append([r.update.ticket_id for r in reports])
        return [pb.ExecutionTicket(ticket_id=r.update.ticket_id) for r in reports]


async def test_calls_are_bounded_by_count_and_size() -> None:
    service = FakeService()
    batcher = ReportBatcher(service.send, max_per_call=3, max_bytes_per_call=1000)
    await asyncio.gather(*(batcher.report(report(f"t{i}")) for i in range(7)))
    assert [len(c) for c in service.calls] == [3, 3, 1]
    service.calls.clear()
    big = "x" * 600
    await asyncio.gather(
        batcher.report(report("small")),
        batcher.report(report("big1", big)),
        batcher.report(report("big2", big)),
        batcher.report(report("huge", big * 3)),  # over the bound on its own: alone
        batcher.report(report("tail")),
    )
    assert service.calls == [["small", "big1"], ["big2"], ["huge"], ["tail"]]
    service.calls.clear()
    # The tickets the answer returns count too (their parameters are not in the report):
    # an answer over a message's size was an error for every report of the call.
    await asyncio.gather(
        batcher.report(report("p1"), answer_bytes=600),
        batcher.report(report("p2"), answer_bytes=600),
        batcher.report(report("p3")),
    )
    assert service.calls == [["p1"], ["p2", "p3"]]
    with pytest.raises(ValueError, match="at least 1"):
        ReportBatcher(service.send, max_per_call=0)
