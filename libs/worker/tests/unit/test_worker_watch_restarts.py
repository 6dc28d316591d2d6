"""How the worker's assignment watch starts again after a refusal (no service involved:
the ticket client is a fake that scripts each watch).

A message it cannot decode: resuming from the cursor before it (or asking for a snapshot
that holds the same ticket) would meet it again, forever; the worker starts afresh from
"now" instead, and keeps running. A cursor the service refuses (older than its event
retention): the worker starts again with a snapshot of its tickets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from hive_common.errors import FieldViolation, InvalidArgument, UndecodableResponse
from hive_worker import Worker, WorkerSettings
from neuralhive.ticket.v1 import ticket_service_pb2 as pb


class ScriptedWatch:
    """Yields its events (moving ``cursor``), then raises ``error`` or waits forever."""

    def __init__(self, events: list[pb.TicketEvent], error: Exception | None) -> None:
        self._events = events
        self._error = error
        self.cursor = ""
        self.closed = False

    def __aiter__(self) -> AsyncIterator[pb.TicketEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[pb.TicketEvent]:
        for event in self._events:
            self.cursor = event.cursor
            yield event
        if self._error is not None:
            raise self._error
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


class FakeTickets:
    def __init__(self, scripts: list[tuple[list[pb.TicketEvent], Exception | None]]) -> None:
        self._scripts = scripts
        self.requests: list[dict[str, Any]] = []
        self.opened = asyncio.Event()

    def watch_tickets(self, **kwargs: Any) -> ScriptedWatch:
        self.requests.append(kwargs)
        self.opened.set()
        events, error = self._scripts.pop(0) if self._scripts else ([], None)
        return ScriptedWatch(events, error)


def other_workers_event(cursor: str) -> pb.TicketEvent:
    return pb.TicketEvent(
        event_id=cursor,
        cursor=cursor,
        type=pb.TICKET_EVENT_TYPE_STATUS_CHANGED,
        ticket=pb.ExecutionTicket(ticket_id="t-other", worker_id="w-2", version=1),
    )


def undecodable() -> UndecodableResponse:
    return UndecodableResponse("a message of the stream WatchTickets could not be decoded")


async def run_watch(fake: FakeTickets, *, watches: int) -> Worker:
    worker = Worker(
        settings=WorkerSettings(
            name="unit", capabilities=["python"], reconnect_max_backoff_seconds=0.1
        )
    )
    worker._tickets = fake  # type: ignore[assignment]
    worker._worker_id = "w-1"
    task = asyncio.create_task(worker._watch_loop())
    try:
        async with asyncio.timeout(10):
            while len(fake.requests) < watches:
                fake.opened.clear()
                await fake.opened.wait()
        await asyncio.sleep(0.05)
        assert not task.done(), task  # the worker's watch loop is still alive
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return worker


async def test_an_undecodable_message_restarts_the_watch_from_now_without_a_snapshot() -> None:
    fake = FakeTickets([([other_workers_event("c1")], undecodable())])
    worker = await run_watch(fake, watches=2)
    first, second = fake.requests
    assert (first["cursor"], first["include_snapshot"]) == ("", True)
    # Not from "c1" (where the same message waits) and without a snapshot (which could
    # hold the same ticket): from "now".
    assert (second["cursor"], second["include_snapshot"]) == ("", False)
    assert second["worker_id"] == "w-1"
    assert worker._watch_cursor == ("w-1", "")


async def test_after_skipping_the_watch_resumes_normally_again() -> None:
    fake = FakeTickets(
        [
            ([], undecodable()),
            ([other_workers_event("c7")], undecodable()),  # a second one, later on
            ([], None),
        ]
    )
    await run_watch(fake, watches=3)
    assert [(r["cursor"], r["include_snapshot"]) for r in fake.requests] == [
        ("", True),
        ("", False),
        ("", False),
    ]


async def test_a_refused_cursor_restarts_the_watch_with_a_snapshot() -> None:
    expired = InvalidArgument(
        "invalid watch request",
        violations=[FieldViolation("cursor", "is older than the event retention ...")],
    )
    # The stream delivered up to "c3"; reopened from there, its cursor is refused.
    fake = FakeTickets([([other_workers_event("c3")], expired)])
    worker = await run_watch(fake, watches=2)
    first, second = fake.requests
    assert (first["cursor"], first["include_snapshot"]) == ("", True)
    # Not "c3" again (refused for ever): the worker's tickets as they are now.
    assert (second["cursor"], second["include_snapshot"]) == ("", True)
    assert worker._watch_cursor == ("w-1", "")
