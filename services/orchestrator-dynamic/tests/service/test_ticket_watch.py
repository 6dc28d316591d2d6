"""The replica's ticket watch and the plans' listings leave no gap: a change made while the
watch is still opening is seen at once (not at the next periodic resync), and a watch
rebuilt after a failure resumes where the previous one was.

Both tests set ``RESYNC_INTERVAL_SECONDS`` to an hour, so the periodic resync cannot be what
makes them pass. The orchestrator's ticket client is wrapped (``TicketClient`` patched for
the test) to hold the watch back or to fail it once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pytest

from hive_common.clients import TicketClient, TicketWatch
from hive_common.errors import Internal
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service

AN_HOUR = 3600.0
# A bound against hanging (the hour-long resync would be the only other way to see it).
SEEN_WITHIN_SECONDS = 30.0


class ControlledWatch:
    """A TicketWatch whose stream is not opened before ``gate`` is set, and that can fail
    once (a non-retryable error) as soon as its stream is positioned."""

    def __init__(self, inner: TicketWatch, *, gate: asyncio.Event, fail_once: bool) -> None:
        self._inner = inner
        self._gate = gate
        self._fail_once = fail_once
        self.failed_at_cursor: str | None = None

    @property
    def cursor(self) -> str:
        return self._inner.cursor

    @property
    def positioned(self) -> bool:
        return self._inner.positioned

    async def wait_positioned(self) -> None:
        await self._inner.wait_positioned()

    async def __aenter__(self) -> ControlledWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> ControlledWatch:
        return self

    async def __anext__(self) -> ticket_pb.TicketEvent:
        await self._gate.wait()
        if self._fail_once and self.failed_at_cursor is None:
            read = asyncio.ensure_future(anext(self._inner))  # opens the stream
            await self._inner.wait_positioned()
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await read
            self.failed_at_cursor = self._inner.cursor
            raise Internal("injected failure of the ticket watch")
        return await anext(self._inner)


class TicketClientSpy:
    """Patches ``TicketClient`` so that every watch is a :class:`ControlledWatch` and the
    listings of a plan are counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_first_watch: bool) -> None:
        self.gate = asyncio.Event()
        self.watches: list[tuple[str, ControlledWatch]] = []  # (cursor asked, watch)
        self.listed: dict[str, asyncio.Event] = {}
        watch_tickets = TicketClient.watch_tickets
        list_tickets = TicketClient.list_tickets

        def controlled_watch(client: TicketClient, **kwargs: Any) -> ControlledWatch:
            watch = ControlledWatch(
                watch_tickets(client, **kwargs),
                gate=self.gate,
                fail_once=fail_first_watch and not self.watches,
            )
            self.watches.append((kwargs.get("cursor", ""), watch))
            return watch

        async def counted_list(client: TicketClient, **kwargs: Any) -> Any:
            response = await list_tickets(client, **kwargs)
            self.listed.setdefault(kwargs.get("plan_id", ""), asyncio.Event()).set()
            return response

        monkeypatch.setattr(TicketClient, "watch_tickets", controlled_watch)
        monkeypatch.setattr(TicketClient, "list_tickets", counted_list)

    def listed_event(self, plan_id: str) -> asyncio.Event:
        return self.listed.setdefault(plan_id, asyncio.Event())


def waiting_plan(plan_id: str) -> dict[str, Any]:
    """One task no worker can take: only a change from outside moves its ticket."""
    return {
        "plan_id": plan_id,
        "tasks": [
            {"task_id": "only", "task_type": "echo", "required_capabilities": ["nobody-has-it"]}
        ],
    }


async def cancel_from_outside(flow: Flow, ticket_id: str) -> None:
    async with flow.ticket_client() as tickets:
        ticket = await tickets.get_ticket(ticket_id=ticket_id)
        assert ticket.status == ticket_pb.TICKET_STATUS_PENDING
        await tickets.update_ticket_status(
            ticket_id=ticket_id,
            status=ticket_pb.TICKET_STATUS_CANCELLED,
            attempt=ticket.attempt,
            error_message="cancelled by an operator",
        )


async def wait_cancel_seen(flow: Flow, plan_id: str) -> None:
    async def seen() -> bool:
        body = await flow.plan(plan_id)
        return bool(flow.tasks(body)["only"]["status"] == "CANCELLED")

    await flow.wait_for(
        seen, what=f"{plan_id}: the outside cancel seen", limit_seconds=SEEN_WITHIN_SECONDS
    )
    final = await flow.wait_settled(plan_id)
    assert final["status"] == "CANCELLED", final


async def test_change_while_the_watch_opens_is_seen_without_a_resync(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = TicketClientSpy(monkeypatch, fail_first_watch=False)
    await flow.start_orchestrator(resync_interval_seconds=AN_HOUR)
    submitted = await flow.submit(waiting_plan("racing-change"))
    assert submitted.status_code == 202, submitted.text
    ticket_id = submitted.json()["ticket_ids"]["only"]
    # The takeover listing is done while the replica's watch is not open yet ...
    async with asyncio.timeout(SEEN_WITHIN_SECONDS):
        await spy.listed_event("racing-change").wait()
    assert spy.watches
    assert not spy.watches[0][1].positioned
    # ... a change lands after that listing and before the watch's starting position ...
    await cancel_from_outside(flow, ticket_id)
    spy.gate.set()
    # ... and is neither in that listing nor on the stream: only a listing made once the
    # watch is positioned can see it.
    await wait_cancel_seen(flow, "racing-change")


async def test_a_rebuilt_watch_resumes_from_the_previous_cursor(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = TicketClientSpy(monkeypatch, fail_first_watch=True)
    spy.gate.set()
    await flow.start_orchestrator(resync_interval_seconds=AN_HOUR)

    async def rebuilt() -> bool:
        return len(spy.watches) >= 2

    await flow.wait_for(rebuilt, what="the ticket watch rebuilt after its failure")
    (first_cursor, first), (second_cursor, _) = spy.watches[:2]
    assert first_cursor == ""
    assert first.failed_at_cursor  # positioned (the header's cursor) when it failed
    assert second_cursor == first.failed_at_cursor

    # And the rebuilt watch follows changes (the hour-long resync is not what sees this).
    submitted = await flow.submit(waiting_plan("after-rebuild"))
    assert submitted.status_code == 202, submitted.text
    async with asyncio.timeout(SEEN_WITHIN_SECONDS):
        await spy.listed_event("after-rebuild").wait()
    await cancel_from_outside(flow, submitted.json()["ticket_ids"]["only"])
    await wait_cancel_seen(flow, "after-rebuild")
