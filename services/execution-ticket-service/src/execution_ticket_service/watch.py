"""One reader of the event log per process, shared by every WatchTickets stream.

Each stream used to query the log itself on every change, so a change cost one query per
open stream (the orchestrator's plus one per worker). The tail reads the log once per
change into a bounded in-memory window; a stream whose position is inside the window is
served from memory, filtered in Python. A stream behind the window (resumed from an old
cursor, or slower than the window is long) reads the database until it reaches it; a
position before an event the purge deleted is refused (INVALID_ARGUMENT), never served
with a gap.

The tail only reads while at least one stream is open (:meth:`EventLogTail.subscribed`):
without watchers, writes cost nothing extra. Reads start at least ``read_gap`` apart
(5 ms by default): under load the changes of those few milliseconds are read in one
query instead of one each; a change after a quiet spell is read at once. Changes of other
replicas are found by polling (every ``poll_interval``; every ``busy_poll_interval`` for a
second after any activity, since committed events that a running transaction hid from a
read become visible when it ends, and nothing signals that).

Why the window is exact: the tail reads only events of transactions that ended before its
read (see ``TicketRepository.events_after``), in log order, so the window always holds every
committed event between its start and the tail's position, and no event can appear there
later.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

from execution_ticket_service.domain.models import TicketEvent, TicketFilter
from execution_ticket_service.domain.paging import (
    Cursor,
    CursorPurged,
    decode_cursor,
    encode_cursor,
)
from execution_ticket_service.domain.validation import Violations, event_payload_bytes
from execution_ticket_service.signals import ChangeSignal, spaced_delay
from execution_ticket_service.storage.tickets import TicketRepository
from hive_common.logging import get_logger, log_round_failure

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TailSettings:
    poll_interval: float = 0.5
    batch_size: int = 500
    # Events kept in memory, and their tickets' parameters and results (and the results in
    # their details) as JSON bytes at most (each event holds its own copy: 5,000 events of
    # 30 KB parameters pinned 200 MB); a stream further behind than the window reads the
    # database.
    window: int = 5_000
    window_bytes: int = 64 * 1024 * 1024
    retry_interval: float = 1.0
    # Reads start at least this far apart (see spaced_delay).
    read_gap: float = 0.005
    # For busy_seconds after a change was signalled or read, poll every busy_poll_interval
    # instead of poll_interval: the end of a transaction that held back the visibility of
    # committed events (any transaction of the cluster, see events_after) is not signalled.
    busy_poll_interval: float = 0.02
    busy_seconds: float = 1.0


def cursor_of(event: TicketEvent) -> Cursor:
    cursor = decode_cursor(event.cursor, Violations())
    assert cursor is not None  # the repository always sets a valid cursor
    return cursor


def _matches(event: TicketEvent, ticket_filter: TicketFilter) -> bool:
    if ticket_filter.plan_id and event.ticket.plan_id != ticket_filter.plan_id:
        return False
    # The same column the database filters on: the worker the event concerns.
    return not ticket_filter.worker_id or event.worker_id == ticket_filter.worker_id


class EventLogTail:
    """Reads the event log once per change and serves every watch stream from memory."""

    def __init__(
        self, *, repository: TicketRepository, signal: ChangeSignal, settings: TailSettings
    ) -> None:
        self._repository = repository
        self._signal = signal
        self._settings = settings
        # The window: every committed event after ``_start`` up to the last key, in order.
        self._start: Cursor | None = None
        self._keys: list[Cursor] = []
        self._events: list[TicketEvent] = []
        self._sizes: list[int] = []
        self._bytes = 0
        self._appended = ChangeSignal()
        self._subscribers = 0
        self._wanted = asyncio.Event()

    @contextlib.contextmanager
    def subscribed(self) -> Iterator[None]:
        """Keep the tail reading while a stream is open."""
        self._subscribers += 1
        self._wanted.set()
        try:
            yield
        finally:
            self._subscribers -= 1
            if not self._subscribers:
                self._wanted.clear()

    @property
    def generation(self) -> int:
        """Changes as seen by streams: bumps when the window grows."""
        return self._appended.generation

    async def wait(self, since: int, max_wait: float) -> None:
        await self._appended.wait(since, max_wait)

    def wake(self) -> None:
        """Wake every waiting stream now (e.g. to let them see a drain)."""
        self._appended.notify()

    async def run(self) -> None:
        """Follow the log while streams are open, until cancelled; survives the database
        being away."""
        loop = asyncio.get_running_loop()
        position: Cursor | None = None
        last_read = -math.inf
        last_generation = self._signal.generation
        busy_until = -math.inf
        while True:
            if not self._subscribers:
                # Nobody to serve: forget the window, start afresh with the next stream.
                position = self._start = None
                self._forget()
                await self._wanted.wait()
            delay = spaced_delay(now=loop.time(), last=last_read, gap=self._settings.read_gap)
            if delay > 0:
                await asyncio.sleep(delay)
            generation = self._signal.generation
            last_read = loop.time()
            if generation != last_generation:  # a change was signalled
                busy_until = last_read + self._settings.busy_seconds
                last_generation = generation
            try:
                if position is None:
                    position = await self._repository.current_position()
                    self._start = position
                events = await self._repository.events_after(
                    position, TicketFilter(), limit=self._settings.batch_size
                )
            except CursorPurged as purged:
                assert position is not None  # set before the read
                position = self._past_purged(position, purged.purged_through)
                continue
            except Exception as exc:
                log_round_failure(log, "event log tail: read failed; retrying", exc)
                await asyncio.sleep(self._settings.retry_interval)
                continue
            if events:
                position = self._append(events)
                busy_until = loop.time() + self._settings.busy_seconds
            if len(events) < self._settings.batch_size:
                # Other replicas' changes, and events a running transaction hid, are found
                # by polling: fast while busy.
                busy = loop.time() < busy_until
                poll = self._settings.busy_poll_interval if busy else self._settings.poll_interval
                await self._signal.wait(generation, poll)

    def _past_purged(self, position: Cursor, purged_through: Cursor) -> Cursor:
        """Where the tail reads on after the purge deleted events it had not read yet (a
        transaction open longer than the retention held them back until the purge could
        take them): past them. The window is emptied and starts there, so a stream before
        it reads the database and is refused, never served with a gap."""
        log.warning(
            "event log tail: the purge deleted events it had not read; streams positioned "
            "before them are refused",
            tail_position=encode_cursor(position),
            purged_through=encode_cursor(purged_through),
        )
        self._forget()
        self._start = max(position, purged_through)
        self._appended.notify()
        return self._start

    def _forget(self) -> None:
        self._keys.clear()
        self._events.clear()
        self._sizes.clear()
        self._bytes = 0

    def _append(self, events: list[TicketEvent]) -> Cursor:
        sizes = [event_payload_bytes(e) for e in events]
        self._keys.extend(cursor_of(e) for e in events)
        self._events.extend(events)
        self._sizes.extend(sizes)
        self._bytes += sum(sizes)
        excess = max(len(self._events) - self._settings.window, 0)
        dropped = sum(self._sizes[:excess])
        # Then the oldest while over the byte budget (the newest event stays).
        while (
            self._bytes - dropped > self._settings.window_bytes and excess < len(self._events) - 1
        ):
            dropped += self._sizes[excess]
            excess += 1
        if excess > 0:
            self._bytes -= dropped
            self._start = self._keys[excess - 1]
            del self._keys[:excess]
            del self._events[:excess]
            del self._sizes[:excess]
        self._appended.notify()
        return self._keys[-1]

    async def read(
        self, position: Cursor, ticket_filter: TicketFilter, *, limit: int
    ) -> tuple[list[TicketEvent], Cursor]:
        """Up to ``limit`` matching events after ``position``, and the position to read on
        from (past events that did not match, so they are not looked at again)."""
        start = self._start
        found: list[TicketEvent] = []
        if start is None or position < start:
            # Behind the window (or no window yet): from the database, up to the window.
            found = await self._repository.events_after(
                position, ticket_filter, limit=limit, until=start
            )
            if start is None or len(found) == limit:
                return found, cursor_of(found[-1]) if found else position
            position = start  # caught up with the window as it was; go on from memory
            if self._start is not None and position < self._start:
                return found, position  # it moved on during the read: next time
        # No await from here on: the window cannot move under us.
        index = bisect.bisect_right(self._keys, position)
        scanned = position
        for key, event in zip(self._keys[index:], self._events[index:], strict=True):
            scanned = key
            if _matches(event, ticket_filter):
                found.append(event)
                if len(found) == limit:
                    break
        return found, scanned
