"""Status reports sent together (group commit).

Every report waits for the next UpdateTicketStatuses call, which carries all the reports
made since the previous call was sent: those made in the same turn of the event loop (the
assignments of one watch message start together) and those made while a call was in
flight. A lone report goes at once, so nothing waits longer than one call; under load a
worker with several slots makes one call for many reports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from hive_common.batching import GroupCommit
from hive_common.errors import HiveError
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

SendReports = Callable[
    [list[pb.TicketStatusReport]], Awaitable[Sequence[pb.ExecutionTicket | HiveError]]
]

MAX_REPORTS_PER_CALL = 100
# A gRPC message holds at most 4 MiB by default, and one result may be up to 1 MiB: a
# call carries about 1 MiB of reports and of the tickets its answer returns (a larger
# report goes alone).
MAX_BYTES_PER_CALL = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The largest gRPC message the ticket service receives and sends (gRPC's default): a
report alone, and the ticket its answer returns, must each fit in one."""

_Pending = tuple[pb.TicketStatusReport, int]  # a report, and the size of its answer


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
        self._max = max_per_call
        self._max_bytes = max_bytes_per_call

        async def send_reports(
            pending: list[_Pending],
        ) -> Sequence[pb.ExecutionTicket | HiveError]:
            return await send([report for report, _ in pending])

        self._calls: GroupCommit[_Pending, pb.ExecutionTicket] = GroupCommit(
            send_reports, take=self._take, name="hive-worker-reports"
        )

    async def report(
        self, report: pb.TicketStatusReport, *, answer_bytes: int = 0
    ) -> pb.ExecutionTicket:
        """``answer_bytes``: about how large the ticket it returns is, beyond what the
        report carries (its parameters, ...): it counts against the call's size bound, so
        that the answer fits in a message too (it carries every ticket whole)."""
        return await self._calls.submit((report, answer_bytes))

    async def aclose(self) -> None:
        """Stop sending; reports still waiting fail with ``CancelledError``."""
        await self._calls.aclose()

    def _take(self, pending: Sequence[_Pending]) -> int:
        """How many of the oldest reports the next call carries: up to the count and size
        bounds, counting each report and its answer (a report larger than the size bound
        goes alone)."""
        size = 0
        count = 0
        for report, answer_bytes in pending[: self._max]:
            size += report.ByteSize() + answer_bytes
            if count and size > self._max_bytes:
                break
            count += 1
        return count
