"""Status reports sent together (group commit).

Every report waits for the next UpdateTicketStatuses call, which carries all the reports
made since the previous call was sent: those made in the same turn of the event loop (the
assignments of one watch message start together) and those made while a call was in
flight. A lone report goes at once, so nothing waits longer than one call; under load a
worker with several slots makes one call and one database transaction for many reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from hive_common.errors import HiveError, Internal
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

SendReports = Callable[
    [list[pb.TicketStatusReport]], Awaitable[Sequence[pb.ExecutionTicket | HiveError]]
]

MAX_REPORTS_PER_CALL = 100
# The ticket service receives at most 4 MiB per message by default, and one result may be
# up to 1 MiB: a call carries about 1 MiB of reports (a larger report goes alone).
MAX_BYTES_PER_CALL = 1024 * 1024


class ReportBatcher:
    """``await report(r)`` → the ticket after the update, or raises the error that
    UpdateTicketStatus would have (a failed call raises its error for each report)."""

    def __init__(
        self,
        send: SendReports,
        *,
        max_per_call: int = MAX_REPORTS_PER_CALL,
        max_bytes_per_call: int = MAX_BYTES_PER_CALL,
    ) -> None:
        if max_per_call < 1:
            raise ValueError("max_per_call must be at least 1")
        self._send = send
        self._max = max_per_call
        self._max_bytes = max_bytes_per_call
        self._queue: list[tuple[pb.TicketStatusReport, asyncio.Future[pb.ExecutionTicket]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def report(self, report: pb.TicketStatusReport) -> pb.ExecutionTicket:
        answer: asyncio.Future[pb.ExecutionTicket] = asyncio.get_running_loop().create_future()
        self._queue.append((report, answer))
        if self._sender is None:
            # Starts in the next turn of the loop: reports made in this one go with it.
            self._sender = asyncio.create_task(self._send_queued(), name="hive-worker-reports")
        return await answer

    async def aclose(self) -> None:
        """Stop sending; reports still waiting fail with ``CancelledError``."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        for _, answer in self._queue:
            answer.cancel()
        self._queue.clear()

    def _take(self) -> list[tuple[pb.TicketStatusReport, asyncio.Future[pb.ExecutionTicket]]]:
        """The next call's reports: the oldest, up to the count and size bounds (a report
        larger than the size bound goes alone)."""
        size = 0
        count = 0
        for report, _ in self._queue[: self._max]:
            size += report.ByteSize()
            if count and size > self._max_bytes:
                break
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                try:
                    results: Sequence[pb.ExecutionTicket | Exception] = await self._send(
                        [report for report, _ in batch]
                    )
                    if len(results) != len(batch):
                        raise Internal(f"{len(results)} answers to {len(batch)} reports")
                except Exception as exc:  # the call failed: so did each of its reports
                    results = [exc] * len(batch)
                except BaseException:
                    for _, answer in batch:
                        answer.cancel()
                    raise
                for (_, answer), result in zip(batch, results, strict=True):
                    if answer.done():  # its waiter gave up (cancelled)
                        continue
                    if isinstance(result, Exception):
                        answer.set_exception(result)
                    else:
                        answer.set_result(result)
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None
