"""Typed client of ``neuralhive.ticket.v1.TicketService``.

Every TicketService RPC is idempotent by design (creation on ``(plan_id, task_id)``,
assignment on ``(ticket, worker, attempt)``, status updates by their content), so every
unary call retries UNAVAILABLE / DEADLINE_EXCEEDED within the client's overall deadline;
any other failure is raised at once as the matching :class:`~hive_common.errors.HiveError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2

from hive_common.clients._calls import (
    CallPolicy,
    GrpcClient,
    Metadata,
    ReconnectingStream,
    ReconnectPolicy,
    Sleep,
    bearer_metadata,
)
from hive_common.errors import HiveError
from hive_common.grpc_errors import error_class_for
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

# AssignTicketsResult.error_code -> grpc.StatusCode
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

WATCH_CURSOR_METADATA = "x-watch-cursor"
"""Initial metadata of a WatchTickets stream: the cursor the stream starts from."""


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A ``google.protobuf.Struct`` from a JSON object (``ValueError`` if it is not one)."""
    struct = struct_pb2.Struct()
    # A JSON round trip rejects what Struct cannot hold (NaN, non-string keys, objects).
    struct.update(json.loads(json.dumps(dict(value), allow_nan=False)))
    return struct


def status_update_request(
    *,
    ticket_id: str,
    status: pb.TicketStatus.ValueType,
    attempt: int,
    result: Mapping[str, Any] | None = None,
    error_message: str = "",
    permanent: bool = False,
    expected_version: int | None = None,
    worker_lost: bool = False,
) -> pb.UpdateTicketStatusRequest:
    """An UpdateTicketStatus request; ``result`` must be a JSON object (``ValueError``).
    ``worker_lost``: a FAILED that is the worker's ending, not the task's (no retry used)."""
    request = pb.UpdateTicketStatusRequest(
        ticket_id=ticket_id,
        status=status,
        attempt=attempt,
        error_message=error_message,
        permanent=permanent,
        worker_lost=worker_lost,
    )
    if result is not None:
        request.result.CopyFrom(to_struct(result))
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def _batch_results(
    results: Iterable[pb.AssignTicketsResult | pb.UpdateTicketStatusesResult],
) -> list[pb.ExecutionTicket | HiveError]:
    """Per item of a batch answer: the ticket, or the error its code stands for."""
    return [
        result.ticket
        if result.error_code == 0
        else error_class_for(_STATUS_CODES.get(result.error_code, grpc.StatusCode.UNKNOWN))(
            result.error_message
        )
        for result in results
    ]


class TicketWatch(ReconnectingStream[pb.WatchTicketsResponse, pb.TicketEvent]):
    """``WatchTickets`` as an async iterator of :class:`TicketEvent` that never misses one.

    After UNAVAILABLE / DEADLINE_EXCEEDED (or a stream the server ends) it reconnects with
    backoff and resumes after :attr:`cursor`, the cursor of the last event it yielded.
    Delivery is at least once: an event may repeat around a reconnection, so handle
    events idempotently (by ``event_id`` or by ticket version).

    A stream opened without a cursor takes its starting cursor from the server's initial
    metadata (``x-watch-cursor``), so a stream that drops before its first event resumes
    from where it started and misses nothing. Not for a snapshot request: that one, if it
    drops before its first event, asks for the snapshot again. Against a server that
    sends no such header, a stream that drops before its first event reconnects with
    ``include_snapshot`` so the current state of every matching non-terminal ticket is
    delivered again (as SNAPSHOT events); a ticket that reached a terminal status during
    that gap is then not reported.
    """

    def __init__(
        self,
        *,
        stub: pb_grpc.TicketServiceAsyncStub,
        plan_id: str,
        worker_id: str,
        cursor: str,
        include_snapshot: bool,
        metadata: Metadata | None,
        reconnect: ReconnectPolicy | None,
        sleep: Sleep = asyncio.sleep,
        include_ticket_tokens: bool = False,
        exclude_own_changes: bool = False,
    ) -> None:
        super().__init__(
            method=stub.WatchTickets, metadata=metadata, reconnect=reconnect, sleep=sleep
        )
        self._plan_id = plan_id
        self._worker_id = worker_id
        self._include_snapshot = include_snapshot
        self._include_ticket_tokens = include_ticket_tokens
        self._exclude_own_changes = exclude_own_changes
        self._snapshot_requested = False
        self._positioned = asyncio.Event()
        self._cursor = ""
        self.cursor = cursor

    @property
    def cursor(self) -> str:
        """Resume position: the cursor of the last event yielded (or the initial one)."""
        return self._cursor

    @cursor.setter
    def cursor(self, value: str) -> None:
        self._cursor = value
        if value:
            self._positioned.set()

    @property
    def positioned(self) -> bool:
        """True once the stream's position is known (:attr:`cursor` is not empty): every
        change after that point is delivered, even across reconnections.

        A watch given a cursor is positioned from the start; one without becomes
        positioned when the server's ``x-watch-cursor`` header or its first event arrives.
        """
        return self._positioned.is_set()

    async def wait_positioned(self) -> None:
        """Wait until :attr:`positioned` (the stream must be iterated meanwhile: it is
        opened by the first read). Never returns if the watch ends before that, so bound
        the wait or cancel it."""
        await self._positioned.wait()

    def _request(self) -> pb.WatchTicketsRequest:
        snapshot = not self.cursor and (self._include_snapshot or self.connections > 0)
        self._snapshot_requested = snapshot
        return pb.WatchTicketsRequest(
            plan_id=self._plan_id,
            worker_id=self._worker_id,
            cursor=self.cursor,
            include_snapshot=snapshot,
            include_ticket_tokens=self._include_ticket_tokens,
            exclude_own_changes=self._exclude_own_changes,
            batch_events=True,
        )

    async def _connected(
        self, call: grpc.aio.UnaryStreamCall[pb.WatchTicketsRequest, pb.WatchTicketsResponse]
    ) -> None:
        try:
            metadata = await call.initial_metadata()
        except grpc.aio.AioRpcError:
            return  # the next read reports the failure (translated) and reconnects
        # The service sends its cursor header once the watch is positioned (a failed call
        # has none: grpc answers its initial_metadata() with empty metadata).
        for key, value in metadata or ():
            if key == WATCH_CURSOR_METADATA and isinstance(value, str) and value:
                self._established()
                if not self.cursor and not self._snapshot_requested:
                    self.cursor = value

    def _accept(self, response: pb.WatchTicketsResponse) -> Sequence[pb.TicketEvent]:
        # Several per message when the server batches them (batch_events; a server that
        # predates it ignores the flag and sends one per message in `event`).
        return response.events or (response.event,)

    def _delivered(self, event: pb.TicketEvent) -> None:
        if event.cursor:
            self.cursor = event.cursor


class TicketClient(GrpcClient):
    """One method per TicketService RPC, keyword arguments in, protobuf messages out.

    Build it over a channel from :func:`hive_common.grpc_client.create_channel` (the
    channel's token provider supplies the bearer token) or with :meth:`connect`. Every
    method takes ``token=`` to send another bearer token for that one call (a worker
    reports a ticket's status with that ticket's token), and ``attempt_timeout=`` /
    ``deadline=`` to override the policy's per-attempt and overall bounds.
    """

    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        policy: CallPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        owns_channel: bool = False,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(
            channel=channel,
            policy=policy,
            reconnect=reconnect,
            owns_channel=owns_channel,
            sleep=sleep,
        )
        self._stub: pb_grpc.TicketServiceAsyncStub = pb_grpc.TicketServiceStub(channel)

    async def create_ticket(
        self,
        *,
        spec: pb.TicketSpec,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.CreateTicketResponse:
        """Create one ticket (idempotent on ``(plan_id, task_id)``); ``created`` says if new."""
        return await self._invoke(
            self._stub.CreateTicket,
            pb.CreateTicketRequest(ticket=spec),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def batch_create_tickets(
        self,
        *,
        specs: Iterable[pb.TicketSpec],
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.BatchCreateTicketsResponse:
        """Create tickets all-or-nothing; the answer lists them in request order."""
        return await self._invoke(
            self._stub.BatchCreateTickets,
            pb.BatchCreateTicketsRequest(tickets=list(specs)),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def get_ticket(
        self,
        *,
        ticket_id: str,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.ExecutionTicket:
        """The ticket ``ticket_id`` (``NotFound`` if there is none)."""
        response = await self._invoke(
            self._stub.GetTicket,
            pb.GetTicketRequest(ticket_id=ticket_id),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return response.ticket

    async def list_tickets(
        self,
        *,
        plan_id: str = "",
        statuses: Iterable[pb.TicketStatus.ValueType] = (),
        worker_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.ListTicketsResponse:
        """One page of tickets; pass ``next_page_token`` back for the next one."""
        return await self._invoke(
            self._stub.ListTickets,
            pb.ListTicketsRequest(
                plan_id=plan_id,
                statuses=list(statuses),
                worker_id=worker_id,
                page_size=page_size,
                page_token=page_token,
            ),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    async def iter_tickets(
        self,
        *,
        plan_id: str = "",
        statuses: Iterable[pb.TicketStatus.ValueType] = (),
        worker_id: str = "",
        page_size: int = 0,
        token: str | None = None,
    ) -> AsyncIterator[pb.ExecutionTicket]:
        """Every matching ticket, page after page (each page call retried on its own)."""
        wanted = list(statuses)
        page_token = ""
        while True:
            page = await self.list_tickets(
                plan_id=plan_id,
                statuses=wanted,
                worker_id=worker_id,
                page_size=page_size,
                page_token=page_token,
                token=token,
            )
            for ticket in page.tickets:
                yield ticket
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def assign_ticket(
        self,
        *,
        ticket_id: str,
        worker_id: str,
        attempt: int,
        lease_seconds: int = 0,
        expected_version: int | None = None,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.ExecutionTicket:
        """PENDING -> ASSIGNED for ``attempt``; repeating the same assignment is harmless."""
        request = pb.AssignTicketRequest(
            ticket_id=ticket_id, worker_id=worker_id, attempt=attempt, lease_seconds=lease_seconds
        )
        if expected_version is not None:
            request.expected_version = expected_version
        response = await self._invoke(
            self._stub.AssignTicket,
            request,
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return response.ticket

    async def assign_tickets(
        self,
        assignments: Sequence[pb.AssignTicketRequest],
        *,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> list[pb.ExecutionTicket | HiveError]:
        """Several assignments in one call and one transaction: per assignment, in order,
        the ticket after it, or the error :meth:`assign_ticket` would have raised."""
        response = await self._invoke(
            self._stub.AssignTickets,
            pb.AssignTicketsRequest(assignments=assignments),
            idempotent=True,  # an applied assignment repeats as a no-op
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return _batch_results(response.results)

    async def update_ticket_status(
        self,
        *,
        ticket_id: str,
        status: pb.TicketStatus.ValueType,
        attempt: int,
        result: Mapping[str, Any] | None = None,
        error_message: str = "",
        permanent: bool = False,
        expected_version: int | None = None,
        worker_lost: bool = False,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.ExecutionTicket:
        """Move the ticket (RUNNING, COMPLETED, FAILED or CANCELLED) for ``attempt``.

        An identical repeat gets the same answer, so retrying is safe. ``result`` must be
        a JSON object (``ValueError`` otherwise, before anything is sent).
        """
        request = status_update_request(
            ticket_id=ticket_id,
            status=status,
            attempt=attempt,
            result=result,
            error_message=error_message,
            permanent=permanent,
            expected_version=expected_version,
            worker_lost=worker_lost,
        )
        response = await self._invoke(
            self._stub.UpdateTicketStatus,
            request,
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return response.ticket

    async def update_ticket_statuses(
        self,
        reports: Sequence[pb.TicketStatusReport],
        *,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> list[pb.ExecutionTicket | HiveError]:
        """Several status updates (each ticket at most once) in one call: per report, in
        order, the ticket after it, or the error
        :meth:`update_ticket_status` would have raised with the report's ``ticket_token``
        (the call's token when it has none). Build each update with
        :func:`status_update_request`."""
        response = await self._invoke(
            self._stub.UpdateTicketStatuses,
            pb.UpdateTicketStatusesRequest(reports=reports),
            idempotent=True,  # an applied update repeats with the same answer
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )
        return _batch_results(response.results)

    async def generate_token(
        self,
        *,
        ticket_id: str,
        ttl_seconds: int = 0,
        token: str | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> pb.GenerateTokenResponse:
        """A token for the ticket's current attempt (``attempt`` says which)."""
        return await self._invoke(
            self._stub.GenerateToken,
            pb.GenerateTokenRequest(ticket_id=ticket_id, ttl_seconds=ttl_seconds),
            idempotent=True,
            metadata=bearer_metadata(token),
            attempt_timeout=attempt_timeout,
            deadline=deadline,
        )

    def watch_tickets(
        self,
        *,
        plan_id: str = "",
        worker_id: str = "",
        cursor: str = "",
        include_snapshot: bool = False,
        include_ticket_tokens: bool = False,
        exclude_own_changes: bool = False,
        reconnect: bool = True,
        token: str | None = None,
    ) -> TicketWatch:
        """Follow ticket changes (see :class:`TicketWatch`); ``reconnect=False`` raises
        the first stream failure instead of resuming. ``include_ticket_tokens`` (with
        ``worker_id``): assignments arrive with their ticket token (``event.ticket_token``).
        ``exclude_own_changes``: skip the changes this caller made itself (it knows them
        from its own calls' answers)."""
        return TicketWatch(
            stub=self._stub,
            plan_id=plan_id,
            worker_id=worker_id,
            cursor=cursor,
            include_snapshot=include_snapshot,
            include_ticket_tokens=include_ticket_tokens,
            exclude_own_changes=exclude_own_changes,
            metadata=bearer_metadata(token),
            reconnect=self._reconnect if reconnect else None,
            sleep=self._sleep,
        )


__all__ = [
    "WATCH_CURSOR_METADATA",
    "TicketClient",
    "TicketWatch",
    "status_update_request",
    "to_struct",
]
