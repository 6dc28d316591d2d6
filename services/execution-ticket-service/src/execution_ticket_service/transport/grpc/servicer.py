"""TicketService servicer: maps protobuf to validated domain requests and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from execution_ticket_service.domain.clock import utc_now
from execution_ticket_service.domain.ids import canonical_if_uuid
from execution_ticket_service.domain.models import (
    EventType,
    StatusUpdate,
    Ticket,
    TicketEvent,
    TicketFilter,
)
from execution_ticket_service.domain.paging import (
    decode_page_token,
    decode_watch_cursor,
    encode_cursor,
    encode_page_token,
    fill_page,
)
from execution_ticket_service.domain.state_machine import check_token_eligible, token_eligible
from execution_ticket_service.domain.stores import TicketStore
from execution_ticket_service.domain.validation import (
    Limits,
    RawAssignment,
    Violations,
    check_identifier,
    resolve_page_size,
    resolve_token_ttl,
    validate_assignment,
    validate_assignments,
    validate_batch,
    validate_create,
    validate_filter,
    validate_report_batch,
    validate_status_update,
    validate_ticket_id,
)
from execution_ticket_service.transport.grpc.auth import actor_of, current_claims
from execution_ticket_service.transport.grpc.convert import (
    event_to_proto,
    raw_spec,
    status_name,
    ticket_to_proto,
)
from execution_ticket_service.watch import EventLogTail
from hive_common.auth import TokenClaims, TokenIssuer
from hive_common.batching import bounded_batches
from hive_common.errors import FieldViolation, HiveError, InvalidArgument, ResourceExhausted
from hive_common.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from hive_common.logging import bind_request_context
from hive_common.structs import struct_to_dict
from hive_common.timestamps import datetime_to_timestamp
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

TICKET_TOKEN_SCOPES = ("ticket:update",)
SNAPSHOT_ACTOR = "system:watch"
# Initial metadata of WatchTickets: the cursor the stream starts from (see WatchTickets).
WATCH_CURSOR_HEADER = "x-watch-cursor"
# A batched WatchTickets message (batch_events) holds at most this many events and,
# unless one event alone is larger, this many bytes of them (the default receive limit of
# gRPC clients is 4 MiB; a ticket's result alone may be up to 1 MiB).
WATCH_BATCH_EVENTS = 100
WATCH_BATCH_BYTES = 1024 * 1024
# The largest answer the server sends (build_grpc_server's default send limit). A page of
# ListTickets and a WatchTickets message are bounded well below it; a batch call's answer
# is checked against it (see _refuse_unsendable_batch and _sendable).
MAX_ANSWER_BYTES = DEFAULT_MAX_MESSAGE_BYTES
# What a new ticket holds beyond the TicketSpec it was created from (id, status, attempt,
# version, timestamps, defaults filled in): ~90 bytes, at most this many.
NEW_TICKET_EXTRA_BYTES = 128
# The events that hand a worker a ticket to start (include_ticket_tokens).
_TOKEN_EVENTS = frozenset({EventType.ASSIGNED, EventType.SNAPSHOT})


@dataclass(frozen=True, slots=True)
class WatchSettings:
    poll_interval: float = 0.5
    batch_size: int = 500


class TicketServicer(pb_grpc.TicketServiceServicer):
    def __init__(
        self,
        *,
        repository: TicketStore,
        issuer: TokenIssuer,
        limits: Limits,
        tail: EventLogTail,
        watch: WatchSettings,
        authorize_report: Callable[[pb.TicketStatusReport], TokenClaims],
    ) -> None:
        self._repository = repository
        self._authorize_report = authorize_report
        self._issuer = issuer
        self._limits = limits
        self._tail = tail
        self._watch = watch
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """End every WatchTickets stream at its next idle moment (clients resume by cursor)."""
        self._draining.set()
        self._tail.wake()

    async def CreateTicket(
        self, request: pb.CreateTicketRequest, context: Any
    ) -> pb.CreateTicketResponse:
        spec = validate_create(raw_spec(request.ticket), self._limits)
        bind_request_context(plan_id=spec.plan_id)
        ticket, created = await self._repository.create(spec, actor=actor_of(current_claims()))
        return pb.CreateTicketResponse(ticket=ticket_to_proto(ticket), created=created)

    async def BatchCreateTickets(
        self, request: pb.BatchCreateTicketsRequest, context: Any
    ) -> pb.BatchCreateTicketsResponse:
        _refuse_unsendable_batch(request)
        specs = validate_batch([raw_spec(s) for s in request.tickets], self._limits)
        results = await self._repository.create_many(specs, actor=actor_of(current_claims()))
        # A new ticket's parameters are the request's: copy its Struct rather than rebuild
        # it from the dict. An existing ticket's come from the database and are rebuilt.
        return _sendable(
            pb.BatchCreateTicketsResponse(
                tickets=[
                    ticket_to_proto(
                        ticket,
                        parameters=source.parameters
                        if created and source.HasField("parameters")
                        else None,
                    )
                    for (ticket, created), source in zip(results, request.tickets, strict=True)
                ],
                created_count=sum(1 for _, created in results if created),
            )
        )

    async def GetTicket(self, request: pb.GetTicketRequest, context: Any) -> pb.GetTicketResponse:
        ticket = await self._repository.get(_bound(validate_ticket_id(request.ticket_id)))
        return pb.GetTicketResponse(ticket=ticket_to_proto(ticket))

    async def ListTickets(
        self, request: pb.ListTicketsRequest, context: Any
    ) -> pb.ListTicketsResponse:
        errors = Violations()
        ticket_filter = validate_filter(
            plan_id=request.plan_id,
            statuses=[status_name(s) for s in request.statuses],
            worker_id=request.worker_id,
            errors=errors,
        )
        limit = resolve_page_size(request.page_size, self._limits, errors)
        after = decode_page_token(request.page_token, ticket_filter, errors)
        errors.raise_if_any("invalid list request")
        rows, more = await self._repository.list_page(ticket_filter, after_seq=after, limit=limit)
        tickets, next_after = fill_page(
            rows, more=more, convert=ticket_to_proto, size=pb.ExecutionTicket.ByteSize
        )
        return pb.ListTicketsResponse(
            tickets=tickets,
            next_page_token=(
                encode_page_token(next_after, ticket_filter) if next_after is not None else ""
            ),
        )

    async def AssignTicket(
        self, request: pb.AssignTicketRequest, context: Any
    ) -> pb.AssignTicketResponse:
        assignment = validate_assignment(_raw_assignment(request), self._limits)
        _bound(assignment.ticket_id)
        ticket = await self._repository.assign(assignment, actor=actor_of(current_claims()))
        return pb.AssignTicketResponse(ticket=ticket_to_proto(ticket))

    async def AssignTickets(
        self, request: pb.AssignTicketsRequest, context: Any
    ) -> pb.AssignTicketsResponse:
        assignments = validate_assignments(
            [_raw_assignment(a) for a in request.assignments], self._limits
        )
        results = await self._repository.assign_many(assignments, actor=actor_of(current_claims()))
        return _sendable(
            pb.AssignTicketsResponse(
                results=[_batch_result(pb.AssignTicketsResult, result) for result in results]
            )
        )

    def _status_update(self, request: pb.UpdateTicketStatusRequest) -> StatusUpdate:
        return validate_status_update(
            ticket_id=request.ticket_id,
            status=status_name(request.status),
            attempt=request.attempt,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
            result=struct_to_dict(request.result) if request.HasField("result") else None,
            error_message=request.error_message,
            permanent=request.permanent,
            worker_lost=request.worker_lost,
            limits=self._limits,
            result_struct_bytes=request.result.ByteSize() if request.HasField("result") else 0,
        )

    async def UpdateTicketStatus(
        self, request: pb.UpdateTicketStatusRequest, context: Any
    ) -> pb.UpdateTicketStatusResponse:
        update = self._status_update(request)
        _bound(update.ticket_id)
        ticket = await self._repository.update_status(update, actor=actor_of(current_claims()))
        return pb.UpdateTicketStatusResponse(ticket=ticket_to_proto(ticket))

    async def UpdateTicketStatuses(
        self, request: pb.UpdateTicketStatusesRequest, context: Any
    ) -> pb.UpdateTicketStatusesResponse:
        reports = request.reports
        validate_report_batch([r.update.ticket_id for r in reports], self._limits)
        # A report refused before the database (token, validation) holds its error here;
        # the others (None) get theirs from the repository, which writes them together.
        refusals: list[HiveError | None] = []
        accepted: list[tuple[StatusUpdate, str]] = []
        for report in reports:
            try:
                claims = self._authorize_report(report)
                accepted.append((self._status_update(report.update), actor_of(claims)))
            except HiveError as exc:  # this report only, as UpdateTicketStatus would refuse it
                refusals.append(exc)
            else:
                refusals.append(None)
        applied = iter(await self._repository.update_status_many(accepted) if accepted else ())
        return _sendable(
            pb.UpdateTicketStatusesResponse(
                results=[
                    _batch_result(pb.UpdateTicketStatusesResult, refusal or next(applied))
                    for refusal in refusals
                ]
            )
        )

    async def GenerateToken(
        self, request: pb.GenerateTokenRequest, context: Any
    ) -> pb.GenerateTokenResponse:
        ticket_id = _bound(validate_ticket_id(request.ticket_id))
        ttl = resolve_token_ttl(request.ttl_seconds, self._limits)
        ticket = await self._repository.get(ticket_id)
        check_token_eligible(ticket)
        token = self._ticket_token(ticket, ttl)
        return pb.GenerateTokenResponse(
            token=token.token, expires_at=token.expires_at, attempt=token.attempt
        )

    def _ticket_token(self, ticket: Ticket, ttl_seconds: int) -> pb.TicketToken:
        token, claims = self._issuer.issue_ticket_token(
            worker_id=ticket.worker_id,
            ticket_id=ticket.ticket_id,
            plan_id=ticket.plan_id,
            attempt=ticket.attempt,
            ttl_seconds=ttl_seconds,
            scopes=TICKET_TOKEN_SCOPES,
        )
        return pb.TicketToken(
            token=token,
            expires_at=datetime_to_timestamp(claims.expires_at),
            attempt=ticket.attempt,
        )

    def _event_message(self, event: TicketEvent, token_holder: str) -> pb.TicketEvent:
        """The event as sent; with a ticket token when ``token_holder`` (a worker id) is
        to start the ticket (see WatchTicketsRequest.include_ticket_tokens)."""
        message = event_to_proto(event)
        ticket = event.ticket
        if (
            token_holder
            and event.type in _TOKEN_EVENTS
            and ticket.worker_id == token_holder
            and token_eligible(ticket)
        ):
            message.ticket_token.CopyFrom(
                self._ticket_token(ticket, self._limits.default_token_ttl_seconds)
            )
        return message

    async def WatchTickets(
        self, request: pb.WatchTicketsRequest, context: Any
    ) -> AsyncIterator[pb.WatchTicketsResponse]:
        errors = Violations()
        check_identifier(request.plan_id, "plan_id", errors, required=False)
        check_identifier(request.worker_id, "worker_id", errors, required=False)
        worker_id = canonical_if_uuid(request.worker_id)
        ticket_filter = TicketFilter(plan_id=request.plan_id, worker_id=worker_id)
        cursor, snapshot_after = decode_watch_cursor(request.cursor, ticket_filter, errors)
        if request.cursor and request.include_snapshot:
            errors.add("include_snapshot", "only applies without a cursor")
        if request.include_ticket_tokens and not request.worker_id:
            errors.add("include_ticket_tokens", "requires worker_id")
        errors.raise_if_any("invalid watch request")
        if cursor is not None:
            # Up front, before any of a snapshot's rest is sent, and whichever replica
            # answers (one whose window still holds the purged events would serve them).
            await self._repository.check_resumable(cursor)
        token_holder = worker_id if request.include_ticket_tokens else ""
        # The caller's own changes are skipped here, after the shared tail filtered: it
        # saves building and sending messages the caller does not need.
        own_actor = actor_of(current_claims()) if request.exclude_own_changes else None

        # A snapshot is read a page at a time (all tens of thousands of unfinished tickets
        # at once took a gigabyte per stream); the pages after the first are read as they
        # are then, as a stream resumed in the middle of a snapshot reads the rest.
        page = self._watch.batch_size
        with self._tail.subscribed():
            tickets: list[tuple[int, Ticket]] = []
            if cursor is None and request.include_snapshot:
                cursor, tickets = await self._repository.snapshot(ticket_filter, limit=page)
                snapshot_after = 0
            elif cursor is None:
                cursor = await self._repository.current_position()
            elif snapshot_after is not None:
                # Resumed in the middle of a snapshot: the rest of it (as the tickets are
                # now), then the changes after the snapshot's position, as before.
                _, tickets = await self._repository.snapshot(
                    ticket_filter, after_seq=snapshot_after, limit=page
                )
            # Headers as soon as the watch is positioned, not with the first event: the client
            # knows the watch is established, and gets the stream's starting cursor in
            # `x-watch-cursor`. Without it, a stream started with an empty cursor that drops
            # before its first event leaves the client nowhere to resume from, and a change made
            # before it reconnects would be missed. (A resumed stream echoes its own cursor.)
            # A snapshot stream's header cursor resumes with the whole snapshot again.
            header = encode_cursor(
                cursor, snapshot_after=snapshot_after, ticket_filter=ticket_filter
            )
            await context.send_initial_metadata(((WATCH_CURSOR_HEADER, header),))

            while tickets:
                now = utc_now()
                snapshots = (
                    TicketEvent(
                        event_id=f"snapshot-{ticket.ticket_id}-{ticket.version}",
                        type=EventType.SNAPSHOT,
                        ticket=ticket,
                        previous_status=None,
                        occurred_at=now,
                        actor=SNAPSHOT_ACTOR,
                        worker_id=ticket.worker_id,
                        # Resuming here sends the rest of the snapshot first.
                        cursor=encode_cursor(
                            cursor, snapshot_after=seq, ticket_filter=ticket_filter
                        ),
                    )
                    for seq, ticket in tickets
                )
                for response in _responses(
                    (self._event_message(e, token_holder) for e in snapshots),
                    batch=request.batch_events,
                ):
                    yield response
                if len(tickets) < page:
                    break
                _, tickets = await self._repository.snapshot(
                    ticket_filter, after_seq=tickets[-1][0], limit=page
                )

            # Each stream keeps its own position in the shared tail: a slow or vanished client
            # only stalls itself.
            while not self._draining.is_set():
                generation = self._tail.generation
                events, cursor = await self._tail.read(
                    cursor, ticket_filter, limit=self._watch.batch_size
                )
                for response in _responses(
                    (self._event_message(e, token_holder) for e in events if e.actor != own_actor),
                    batch=request.batch_events,
                ):
                    yield response
                if len(events) < self._watch.batch_size:
                    await self._tail.wait(generation, self._watch.poll_interval)


def _responses(
    events: Iterable[pb.TicketEvent], *, batch: bool
) -> Iterator[pb.WatchTicketsResponse]:
    """The stream messages carrying ``events``: one each, or with ``batch`` as many per
    message as fit in :data:`WATCH_BATCH_EVENTS` and :data:`WATCH_BATCH_BYTES` (an event
    larger than that goes alone)."""
    if not batch:
        for event in events:
            yield pb.WatchTicketsResponse(event=event)
        return
    for chunk in bounded_batches(
        events, pb.TicketEvent.ByteSize, max_bytes=WATCH_BATCH_BYTES, limit=WATCH_BATCH_EVENTS
    ):
        yield pb.WatchTicketsResponse(events=chunk)


def _refuse_unsendable_batch(request: pb.BatchCreateTicketsRequest) -> None:
    """Refuse, before writing anything, a BatchCreateTickets whose answer (the tickets
    created: the request's specs and what the service adds to each) could not be sent."""
    answer = request.ByteSize() + len(request.tickets) * NEW_TICKET_EXTRA_BYTES
    if answer > MAX_ANSWER_BYTES:
        raise InvalidArgument(
            "the answer would not fit in one message: send fewer tickets per call",
            violations=[
                FieldViolation(
                    "tickets",
                    f"their answer would be up to {answer} bytes, over the "
                    f"{MAX_ANSWER_BYTES} bytes of a message",
                )
            ],
        )


Answer = TypeVar("Answer", bound=Message)


def _sendable(answer: Answer) -> Answer:
    """``answer`` if one message holds it; else a RESOURCE_EXHAUSTED that says why (gRPC
    would fail the call with the same code, after logging an ERROR with a traceback).

    For the batch calls whose answer carries tickets as stored (their parameters and
    results are not in the request, so nothing could tell before), the changes made stand:
    every such call is idempotent, and repeated in smaller calls it answers each item."""
    size = answer.ByteSize()
    if size > MAX_ANSWER_BYTES:
        raise ResourceExhausted(
            f"the answer would be {size} bytes, over the {MAX_ANSWER_BYTES} bytes of a "
            "message: send fewer per call (what this call changed stands; repeating it in "
            "smaller calls answers each item)",
            details={"answer_bytes": size, "limit_bytes": MAX_ANSWER_BYTES},
        )
    return answer


BatchResult = TypeVar("BatchResult", pb.AssignTicketsResult, pb.UpdateTicketStatusesResult)


def _batch_result(message: type[BatchResult], result: Ticket | HiveError) -> BatchResult:
    """One item of a batch answer: the ticket, or the code and message of its refusal (an
    item has no error details: its field violations are spelled out in the message)."""
    if isinstance(result, HiveError):
        text = result.message
        if result.violations:
            text += ": " + result.violations_text()
        return message(error_code=grpc.StatusCode[result.grpc_code].value[0], error_message=text)
    return message(ticket=ticket_to_proto(result))


def _raw_assignment(request: pb.AssignTicketRequest) -> RawAssignment:
    return RawAssignment(
        ticket_id=request.ticket_id,
        worker_id=request.worker_id,
        lease_seconds=request.lease_seconds,
        attempt=request.attempt,
        expected_version=(
            request.expected_version if request.HasField("expected_version") else None
        ),
        worker_capacity=request.worker_capacity,
    )


def _bound(ticket_id: str) -> str:
    """Put the ticket id on every log line of this RPC (including the final one)."""
    bind_request_context(ticket_id=ticket_id)
    return ticket_id
