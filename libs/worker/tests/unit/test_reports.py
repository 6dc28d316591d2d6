"""ReportBatcher: which reports share a call, and what each waiter gets back."""

from __future__ import annotations

import asyncio

import pytest

from hive_common.errors import FailedPrecondition, HiveError, Internal, Unavailable
from hive_worker.reports import ReportBatcher
from neuralhive.ticket.v1 import ticket_service_pb2 as pb


def report(ticket_id: str, error: str = "") -> pb.TicketStatusReport:
    update = pb.UpdateTicketStatusRequest(ticket_id=ticket_id, attempt=1, error_message=error)
    return pb.TicketStatusReport(update=update, ticket_token=f"token-{ticket_id}")


class FakeService:
    """Answers each report with its ticket (or a scripted refusal); calls wait for
    ``gate`` when it is set to a pending event."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.refuse: dict[str, HiveError] = {}
        self.fail_call: HiveError | None = None
        self.short_answer = False
        self.gate: asyncio.Event | None = None

    async def send(
        self, reports: list[pb.TicketStatusReport]
    ) -> list[pb.ExecutionTicket | HiveError]:
        self.calls.append([r.update.ticket_id for r in reports])
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_call is not None:
            raise self.fail_call
        answers = [
            self.refuse.get(r.update.ticket_id) or pb.ExecutionTicket(ticket_id=r.update.ticket_id)
            for r in reports
        ]
        return answers[:-1] if self.short_answer else answers


async def test_reports_of_one_turn_share_a_call_and_later_ones_wait_for_the_next() -> None:
    service = FakeService()
    service.gate = asyncio.Event()
    batcher = ReportBatcher(service.send)
    first = [asyncio.create_task(batcher.report(report(t))) for t in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    assert service.calls == [["a", "b", "c"]]  # in flight
    later = [asyncio.create_task(batcher.report(report(t))) for t in ("d", "e")]
    await asyncio.sleep(0.01)
    assert service.calls == [["a", "b", "c"]]  # waiting for the call in flight
    service.gate.set()
    answers = await asyncio.gather(*first, *later)
    assert [t.ticket_id for t in answers] == ["a", "b", "c", "d", "e"]
    assert service.calls == [["a", "b", "c"], ["d", "e"]]
    # Idle again: the next report goes at once, alone.
    assert (await batcher.report(report("f"))).ticket_id == "f"
    assert service.calls[-1] == ["f"]


async def test_each_waiter_gets_its_own_answer_and_a_failed_call_fails_each() -> None:
    service = FakeService()
    service.refuse["b"] = FailedPrecondition("ticket b is COMPLETED")
    batcher = ReportBatcher(service.send)
    a, b = await asyncio.gather(
        batcher.report(report("a")), batcher.report(report("b")), return_exceptions=True
    )
    assert isinstance(a, pb.ExecutionTicket)
    assert a.ticket_id == "a"
    assert isinstance(b, FailedPrecondition)
    service.fail_call = Unavailable("ticket service restarting")
    results = await asyncio.gather(
        batcher.report(report("c")), batcher.report(report("d")), return_exceptions=True
    )
    assert [type(r) for r in results] == [Unavailable, Unavailable]
    assert service.calls[-1] == ["c", "d"]
    # A service answering the wrong number of reports: an error for each, nobody hangs.
    service.fail_call = None
    service.short_answer = True
    results = await asyncio.gather(
        batcher.report(report("e")), batcher.report(report("f")), return_exceptions=True
    )
    assert [type(r) for r in results] == [Internal, Internal]


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
    with pytest.raises(ValueError, match="at least 1"):
        ReportBatcher(service.send, max_per_call=0)


async def test_closing_cancels_the_reports_still_waiting() -> None:
    service = FakeService()
    service.gate = asyncio.Event()
    batcher = ReportBatcher(service.send)
    waiting = [asyncio.create_task(batcher.report(report(t))) for t in ("a", "b")]
    await asyncio.sleep(0.01)
    await batcher.aclose()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    # A closed batcher starts afresh when used again.
    service.gate.set()
    assert (await batcher.report(report("c"))).ticket_id == "c"
