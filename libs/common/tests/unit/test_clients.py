"""TicketClient and RegistryClient against a real grpc.aio server on 127.0.0.1:0.

The servers run fake servicers (subclasses of the generated bases) that script failures,
so retries, deadlines, stream resumption and metadata are checked over real HTTP/2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import structlog

from hive_common.clients import (
    CallPolicy,
    ReconnectPolicy,
    RegistryClient,
    TicketClient,
    to_struct,
)
from hive_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from hive_common.grpc_client import create_channel
from hive_common.grpc_errors import abort
from hive_testsupport.fakes import UnscriptedTickets
from neuralhive.registry.v1 import registry_service_pb2 as rpb
from neuralhive.registry.v1 import registry_service_pb2_grpc as rpb_grpc
from neuralhive.ticket.v1 import ticket_service_pb2 as pb
from neuralhive.ticket.v1 import ticket_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
TICKET_ID = "5b2f3a8e-1d7c-4c1e-9a53-2f1b0c9d8e71"


def _metadata(context: Context) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _event(n: int) -> pb.WatchTicketsResponse:
    return pb.WatchTicketsResponse(
        event=pb.TicketEvent(
            event_id=f"e{n}",
            cursor=f"c{n}",
            type=pb.TICKET_EVENT_TYPE_STATUS_CHANGED,
            ticket=pb.ExecutionTicket(ticket_id=TICKET_ID, version=n),
        )
    )


class FakeTickets(UnscriptedTickets):
    """Scripted answers: ``failures`` are raised (in order) before a call succeeds."""

    def __init__(self) -> None:
        self.failures: list[Exception] = []
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.hang = asyncio.Event()
        self.hanging = False
        # WatchTickets: one script per connection, each a list of event numbers (a list
        # of them: one batched message) and a final action: "abort" (UNAVAILABLE), "end"
        # (stream ends), "deny" or "wait".
        self.watch_scripts: list[tuple[list[int | list[int]], str]] = []
        self.watch_requests: list[pb.WatchTicketsRequest] = []
        self.watch_opened = asyncio.Event()
        # Sent as the `x-watch-cursor` initial metadata of every watch (None: no header).
        self.watch_header_cursor: str | None = None

    async def _fail_if_scripted(self, name: str, request: Any, context: Context) -> None:
        self.calls.append((name, request, _metadata(context)))
        if self.hanging:
            await self.hang.wait()
        if self.failures:
            error = self.failures.pop(0)
            if isinstance(error, InvalidArgument | Unavailable | NotFound | PermissionDenied):
                await abort(context, error)
            raise error

    async def GetTicket(self, request: pb.GetTicketRequest, context: Context) -> Any:
        await self._fail_if_scripted("GetTicket", request, context)
        return pb.GetTicketResponse(ticket=pb.ExecutionTicket(ticket_id=request.ticket_id))

    async def UpdateTicketStatus(
        self, request: pb.UpdateTicketStatusRequest, context: Context
    ) -> Any:
        await self._fail_if_scripted("UpdateTicketStatus", request, context)
        return pb.UpdateTicketStatusResponse(
            ticket=pb.ExecutionTicket(
                ticket_id=request.ticket_id, status=request.status, result=request.result
            )
        )

    async def AssignTickets(self, request: pb.AssignTicketsRequest, context: Context) -> Any:
        await self._fail_if_scripted("AssignTickets", request, context)
        # Scripted by worker id: "ok" is assigned, "busy" refused, "new" a code unknown here.
        codes = {"ok": 0, "busy": grpc.StatusCode.FAILED_PRECONDITION.value[0], "new": 99}
        return pb.AssignTicketsResponse(
            results=[
                pb.AssignTicketsResult(
                    ticket=pb.ExecutionTicket(ticket_id=a.ticket_id, worker_id=a.worker_id)
                )
                if codes[a.worker_id] == 0
                else pb.AssignTicketsResult(
                    error_code=codes[a.worker_id], error_message=f"no: {a.ticket_id}"
                )
                for a in request.assignments
            ]
        )

    async def AssignTicket(self, request: pb.AssignTicketRequest, context: Context) -> Any:
        await self._fail_if_scripted("AssignTicket", request, context)
        return pb.AssignTicketResponse(ticket=pb.ExecutionTicket(ticket_id=request.ticket_id))

    async def ListTickets(self, request: pb.ListTicketsRequest, context: Context) -> Any:
        await self._fail_if_scripted("ListTickets", request, context)
        start = int(request.page_token or 0)
        ids = [f"t{n}" for n in range(start, min(start + request.page_size, 5))]
        return pb.ListTicketsResponse(
            tickets=[pb.ExecutionTicket(ticket_id=i, plan_id=request.plan_id) for i in ids],
            next_page_token=str(start + len(ids)) if start + len(ids) < 5 else "",
        )

    async def GenerateToken(self, request: pb.GenerateTokenRequest, context: Context) -> Any:
        await self._fail_if_scripted("GenerateToken", request, context)
        return pb.GenerateTokenResponse(token="ticket-token", attempt=2)

    async def WatchTickets(
        self, request: pb.WatchTicketsRequest, context: Context
    ) -> AsyncIterator[pb.WatchTicketsResponse]:
        self.watch_requests.append(request)
        self.calls.append(("WatchTickets", request, _metadata(context)))
        self.watch_opened.set()
        numbers, action = self.watch_scripts.pop(0) if self.watch_scripts else ([], "wait")
        if self.watch_header_cursor is not None:
            await context.send_initial_metadata((("x-watch-cursor", self.watch_header_cursor),))
        for n in numbers:
            if isinstance(n, list):
                yield pb.WatchTicketsResponse(events=[_event(m).event for m in n])
            else:
                yield _event(n)
        if action == "abort":
            await abort(context, Unavailable("ticket store is restarting"))
        elif action == "deny":
            await abort(context, PermissionDenied("not your tickets"))
        elif action == "wait":
            await asyncio.Event().wait()


class FakeRegistry(rpb_grpc.ServiceRegistryServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.failures: list[Exception] = []
        self.watch_connections = 0
        self.drop_watch = asyncio.Event()

    async def _record(self, name: str, request: Any, context: Context) -> None:
        self.calls.append((name, request, _metadata(context)))
        if self.failures:
            error = self.failures.pop(0)
            assert isinstance(error, InvalidArgument | Unavailable | NotFound)
            await abort(context, error)

    async def Register(self, request: rpb.RegisterRequest, context: Context) -> Any:
        await self._record("Register", request, context)
        return rpb.RegisterResponse(
            worker=rpb.Worker(worker_id="w-1", name=request.name),
            token="worker-token",
            heartbeat_interval_seconds=5,
        )

    async def Heartbeat(self, request: rpb.HeartbeatRequest, context: Context) -> Any:
        await self._record("Heartbeat", request, context)
        return rpb.HeartbeatResponse(
            worker=rpb.Worker(worker_id=request.worker_id), heartbeat_interval_seconds=5
        )

    async def Deregister(self, request: rpb.DeregisterRequest, context: Context) -> Any:
        await self._record("Deregister", request, context)
        return rpb.DeregisterResponse()

    async def DiscoverWorkers(self, request: rpb.DiscoverWorkersRequest, context: Context) -> Any:
        await self._record("DiscoverWorkers", request, context)
        worker = rpb.Worker(worker_id="w-1", capabilities=request.required_capabilities)
        return rpb.DiscoverWorkersResponse(
            workers=[rpb.RankedWorker(worker=worker, score=0.5, spare_capacity=2)]
        )

    async def GetWorker(self, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListWorkers(self, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def WatchWorkers(
        self, request: rpb.WatchWorkersRequest, context: Context
    ) -> AsyncIterator[rpb.WatchWorkersResponse]:
        self.watch_connections += 1
        connection = self.watch_connections
        await context.send_initial_metadata(())
        yield rpb.WatchWorkersResponse(
            event=rpb.WorkerEvent(
                event_id=f"conn-{connection}", type=rpb.WORKER_EVENT_TYPE_REGISTERED
            )
        )
        if connection == 1:
            await self.drop_watch.wait()
            await abort(context, Unavailable("registry restarting"))
        await asyncio.Event().wait()


@asynccontextmanager
async def serve(
    *servicers: pb_grpc.TicketServiceServicer | rpb_grpc.ServiceRegistryServicer,
    port: int = 0,
) -> AsyncIterator[tuple[grpc.aio.Server, int]]:
    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, pb_grpc.TicketServiceServicer):
            pb_grpc.add_TicketServiceServicer_to_server(servicer, server)
        else:
            rpb_grpc.add_ServiceRegistryServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield server, bound
    finally:
        await server.stop(grace=None)


class Sleeps:
    """Records back-off waits and sleeps at most 10 ms of each."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._changed = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self._changed.set()
        await asyncio.sleep(min(seconds, 0.01))

    async def until(self, count: int) -> None:
        """Return once ``count`` waits were recorded."""
        while len(self.waits) < count:
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture
def tickets() -> FakeTickets:
    return FakeTickets()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def ticket_port(tickets: FakeTickets) -> AsyncIterator[int]:
    async with serve(tickets) as (_, port):
        yield port


def ticket_client(
    port: int,
    sleeps: Sleeps,
    *,
    policy: CallPolicy | None = None,
    token: Callable[[], str] = lambda: "service-token",
) -> TicketClient:
    policy = policy or CallPolicy(timeout_seconds=5, deadline_seconds=30)
    channel = create_channel(
        f"127.0.0.1:{port}", token_provider=token, default_timeout=policy.timeout_seconds
    )
    return TicketClient(
        channel=channel,
        policy=policy,
        reconnect=ReconnectPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05),
        owns_channel=True,
        sleep=sleeps,
    )


async def test_unary_call_sends_channel_token_and_per_call_token(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    async with ticket_client(ticket_port, sleeps) as client:
        ticket = await client.get_ticket(ticket_id=TICKET_ID)
        token = await client.generate_token(ticket_id=TICKET_ID, token="worker-token")
        updated = await client.update_ticket_status(
            ticket_id=TICKET_ID,
            status=pb.TICKET_STATUS_COMPLETED,
            attempt=1,
            result={"answer": 42, "items": ["a", None]},
            token="ticket-token",
        )
    assert isinstance(ticket, pb.ExecutionTicket)
    assert ticket.ticket_id == TICKET_ID
    assert (token.token, token.attempt) == ("ticket-token", 2)
    assert [c[2]["authorization"] for c in tickets.calls] == [
        "Bearer service-token",
        "Bearer worker-token",
        "Bearer ticket-token",
    ]
    sent = tickets.calls[2][1]
    assert sent.attempt == 1
    assert not sent.HasField("expected_version")
    assert dict(updated.result) == {"answer": 42.0, "items": ["a", None]}


async def test_unavailable_is_retried_until_success(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.failures = [Unavailable("db down"), Unavailable("db down")]
    async with ticket_client(ticket_port, sleeps) as client:
        with structlog.testing.capture_logs() as logs:
            ticket = await client.assign_ticket(
                ticket_id=TICKET_ID, worker_id="w-1", attempt=1, expected_version=3
            )
    assert ticket.ticket_id == TICKET_ID
    assert [c[0] for c in tickets.calls] == ["AssignTicket"] * 3
    assert tickets.calls[0][1].expected_version == 3
    assert len(sleeps.waits) == 2  # one back-off per retry
    # Each retry's log line names the RPC (it named tenacity's inner function).
    retries = [e for e in logs if e["event"] == "retrying call"]
    assert [e["call"] for e in retries] == ["/neuralhive.ticket.v1.TicketService/AssignTicket"] * 2


async def test_assign_tickets_answers_each_assignment_in_order_retrying_the_call(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.failures = [Unavailable("db down")]
    requests = [
        pb.AssignTicketRequest(ticket_id=f"t{i}", worker_id=w, attempt=1)
        for i, w in enumerate(["ok", "busy", "new", "ok"])
    ]
    async with ticket_client(ticket_port, sleeps) as client:
        results = await client.assign_tickets(requests)
    assigned, busy, unknown, last = results
    assert isinstance(assigned, pb.ExecutionTicket)
    assert (assigned.ticket_id, assigned.worker_id) == ("t0", "ok")
    assert isinstance(busy, FailedPrecondition)
    assert busy.message == "no: t1"
    assert isinstance(unknown, Internal)  # a code this client does not know
    assert isinstance(last, pb.ExecutionTicket)
    assert last.ticket_id == "t3"
    assert [c[0] for c in tickets.calls] == ["AssignTickets"] * 2


async def test_invalid_argument_is_not_retried(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    violation = FieldViolation("ticket_id", "must be a UUID")
    tickets.failures = [InvalidArgument("bad ticket id", violations=[violation])]
    async with ticket_client(ticket_port, sleeps) as client:
        with pytest.raises(InvalidArgument) as raised:
            await client.get_ticket(ticket_id="nope")
    assert raised.value.violations == [violation]
    assert len(tickets.calls) == 1
    assert sleeps.waits == []


async def test_not_found_is_not_retried(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.failures = [NotFound("no such ticket")]
    async with ticket_client(ticket_port, sleeps) as client:
        with pytest.raises(NotFound):
            await client.get_ticket(ticket_id=TICKET_ID)
    assert len(tickets.calls) == 1


async def test_retries_stop_at_the_overall_deadline(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.failures = [Unavailable("down")] * 10_000
    policy = CallPolicy(timeout_seconds=5, deadline_seconds=0.3)
    async with ticket_client(ticket_port, sleeps, policy=policy) as client:
        with pytest.raises(Unavailable):
            await client.get_ticket(ticket_id=TICKET_ID)
    assert 1 < len(tickets.calls) < 10_000


async def test_a_hanging_server_gets_per_attempt_timeouts_within_the_deadline(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.hanging = True
    policy = CallPolicy(timeout_seconds=0.1, deadline_seconds=0.35)
    async with ticket_client(ticket_port, sleeps, policy=policy) as client:
        with pytest.raises(DeadlineExceeded):
            await client.get_ticket(ticket_id=TICKET_ID)
    # Each attempt timed out (DEADLINE_EXCEEDED is retryable), so there was more than one.
    assert len(tickets.calls) >= 2
    tickets.hang.set()


async def test_an_unreachable_server_is_unavailable_after_retries(sleeps: Sleeps) -> None:
    async with serve(FakeTickets()) as (_, port):
        pass  # stopped: the port now refuses connections
    policy = CallPolicy(timeout_seconds=1, deadline_seconds=0.3)
    async with ticket_client(port, sleeps, policy=policy) as client:
        with pytest.raises(Unavailable):
            await client.get_ticket(ticket_id=TICKET_ID)
    assert len(sleeps.waits) >= 1


async def test_iter_tickets_walks_every_page_retrying_each(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.failures = [Unavailable("blip")]
    async with ticket_client(ticket_port, sleeps) as client:
        seen = [
            t.ticket_id
            async for t in client.iter_tickets(
                plan_id="p", statuses=[pb.TICKET_STATUS_PENDING], page_size=2
            )
        ]
    assert seen == ["t0", "t1", "t2", "t3", "t4"]
    requests = [c[1] for c in tickets.calls]
    assert [r.page_token for r in requests] == ["", "", "2", "4"]  # the first one retried
    assert all(list(r.statuses) == [pb.TICKET_STATUS_PENDING] for r in requests)


def test_reconnect_backoff_is_jittered_capped_and_never_overflows() -> None:
    policy = ReconnectPolicy(initial_backoff_seconds=0.1, max_backoff_seconds=2.0)
    for failures in (1, 2, 10, 5_000):
        ceiling = min(2.0, 0.1 * 2 ** min(failures - 1, 30))
        assert all(0 <= policy.backoff(failures) <= ceiling for _ in range(50))
    with pytest.raises(ValueError, match="initial_backoff_seconds"):
        ReconnectPolicy(initial_backoff_seconds=3, max_backoff_seconds=2)
    with pytest.raises(ValueError, match="deadline_seconds"):
        CallPolicy(deadline_seconds=0)


def test_result_that_is_not_json_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="Out of range float values"):
        to_struct({"x": float("nan")})
    with pytest.raises(TypeError):
        to_struct({"x": object()})
    assert dict(to_struct({"n": 1, "s": "t"})) == {"n": 1.0, "s": "t"}


async def test_watch_resumes_after_the_last_cursor(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([1, 2], "abort"), ([3], "end"), ([4], "wait")]
    async with ticket_client(ticket_port, sleeps) as client:
        watch = client.watch_tickets(worker_id="w-1", include_snapshot=True)
        async with watch:
            events = [await anext(watch) for _ in range(4)]
        assert watch.cursor == "c4"
    assert [e.event_id for e in events] == ["e1", "e2", "e3", "e4"]
    requests = [(r.worker_id, r.cursor, r.include_snapshot) for r in tickets.watch_requests]
    assert requests == [("w-1", "", True), ("w-1", "c2", False), ("w-1", "c3", False)]
    assert watch.connections == 3
    # Every stream carried the channel's token.
    assert {c[2]["authorization"] for c in tickets.calls} == {"Bearer service-token"}


async def test_watch_asks_for_batches_and_hands_out_their_events_one_by_one(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([1, [2, 3, 4]], "abort"), ([[5, 6]], "wait")]
    async with ticket_client(ticket_port, sleeps) as client:
        watch = client.watch_tickets(plan_id="p-1")
        async with watch:
            first, second = await anext(watch), await anext(watch)
            # The cursor is the last event handed out, not the last one received.
            assert watch.cursor == "c2"
            rest = [await anext(watch) for _ in range(4)]
    assert [e.event_id for e in (first, second, *rest)] == [f"e{n}" for n in range(1, 7)]
    assert watch.cursor == "c6"
    requests = [(r.cursor, r.batch_events) for r in tickets.watch_requests]
    # The batch's every event was delivered before the stream broke: resumed after it.
    assert requests == [("", True), ("c4", True)]


async def test_watch_dropped_before_any_event_comes_back_with_a_snapshot(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([], "abort"), ([7], "wait")]
    client = ticket_client(ticket_port, sleeps)
    async with client, client.watch_tickets(plan_id="p-1", cursor="") as watch:
        event = await anext(watch)
    assert event.event_id == "e7"
    requests = [(r.plan_id, r.cursor, r.include_snapshot) for r in tickets.watch_requests]
    assert requests == [("p-1", "", False), ("p-1", "", True)]


async def test_watch_dropped_before_any_event_resumes_from_the_header_cursor(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_header_cursor = "c0"
    tickets.watch_scripts = [([], "abort"), ([7], "wait")]
    client = ticket_client(ticket_port, sleeps)
    watch = client.watch_tickets(plan_id="p-1")
    async with client, watch:
        event = await anext(watch)
    assert event.event_id == "e7"
    assert watch.cursor == "c7"
    requests = [(r.plan_id, r.cursor, r.include_snapshot) for r in tickets.watch_requests]
    # The stream's starting position, not a snapshot: nothing in the gap is lost.
    assert requests == [("p-1", "", False), ("p-1", "c0", False)]


async def test_watch_header_cursor_does_not_replace_a_cursor_or_a_snapshot(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_header_cursor = "from-header"

    def requests() -> list[tuple[str, bool]]:
        seen = [(r.cursor, r.include_snapshot) for r in tickets.watch_requests]
        tickets.watch_requests.clear()
        return seen

    client = ticket_client(ticket_port, sleeps)
    async with client:
        # A snapshot watch that drops before its snapshot arrives asks for it again.
        tickets.watch_scripts = [([], "abort"), ([3], "wait")]
        async with client.watch_tickets(plan_id="p-1", include_snapshot=True) as watch:
            await anext(watch)
        assert requests() == [("", True), ("", True)]
        # A cursor the caller gave (or an event's) is not replaced by the header's.
        tickets.watch_scripts = [([], "abort"), ([4], "wait")]
        async with client.watch_tickets(plan_id="p-1", cursor="c9") as resumed:
            await anext(resumed)
        assert requests() == [("c9", False), ("c9", False)]
        tickets.watch_scripts = [([5], "abort"), ([6], "wait")]
        async with client.watch_tickets(plan_id="p-1") as fresh:
            await anext(fresh)
            await anext(fresh)
        assert requests() == [("", False), ("c5", False)]


async def test_watch_is_positioned_by_its_cursor_the_header_or_the_first_event(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    client = ticket_client(ticket_port, sleeps)
    async with client:
        # Resuming from a cursor: positioned before anything is sent.
        assert client.watch_tickets(plan_id="p-1", cursor="c5").positioned

        # From "now": the header positions it, before (and without) any event.
        tickets.watch_header_cursor = "c0"
        tickets.watch_scripts = [([], "wait")]
        watch = client.watch_tickets(plan_id="p-1")
        assert not watch.positioned
        async with watch:
            reader = asyncio.ensure_future(anext(watch))
            await asyncio.wait_for(watch.wait_positioned(), timeout=10)
            assert watch.positioned
            assert watch.cursor == "c0"
            assert not reader.done()  # no event was sent
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader

        # A server without the header: the first event positions it.
        tickets.watch_header_cursor = None
        tickets.watch_scripts = [([3], "wait")]
        async with client.watch_tickets(plan_id="p-1") as old_server:
            waiter = asyncio.ensure_future(old_server.wait_positioned())
            await asyncio.sleep(0)
            assert not waiter.done()
            assert (await anext(old_server)).event_id == "e3"
            await asyncio.wait_for(waiter, timeout=10)
            assert old_server.cursor == "c3"


async def test_closing_a_watch_ends_a_pending_read_in_another_task(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([1], "wait")]
    async with ticket_client(ticket_port, sleeps) as client:
        watch = client.watch_tickets(worker_id="w-1")
        assert (await anext(watch)).event_id == "e1"
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.05)  # let the read start (passes either way if it did not)
        await watch.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, timeout=10)
        with pytest.raises(StopAsyncIteration):
            await anext(watch)
    assert len(tickets.watch_requests) == 1


async def test_watch_raises_errors_that_retrying_cannot_fix(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([1], "deny")]
    async with ticket_client(ticket_port, sleeps) as client:
        watch = client.watch_tickets(worker_id="other")
        changes: list[bool] = []
        watch.on_live_change = lambda: changes.append(watch.live)
        assert not watch.live  # nothing answered yet
        assert (await anext(watch)).event_id == "e1"
        assert watch.live
        with pytest.raises(PermissionDenied):
            await anext(watch)
        # Refused: it delivers no more (a worker reported free slots on it for ever).
        assert not watch.live
        assert changes == [True, False]
        await watch.aclose()
    assert len(tickets.watch_requests) == 1


async def test_watch_without_reconnect_raises_the_first_failure(
    tickets: FakeTickets, ticket_port: int, sleeps: Sleeps
) -> None:
    tickets.watch_scripts = [([1], "abort")]
    async with ticket_client(ticket_port, sleeps) as client:
        watch = client.watch_tickets(worker_id="w-1", reconnect=False)
        assert (await anext(watch)).event_id == "e1"
        with pytest.raises(Unavailable):
            await anext(watch)
    assert len(tickets.watch_requests) == 1


async def test_watch_survives_a_real_server_restart(sleeps: Sleeps) -> None:
    first = FakeTickets()
    first.watch_scripts = [([1, 2], "wait")]
    second = FakeTickets()
    second.watch_scripts = [([3], "wait")]
    async with serve(first) as (server, port):
        client = ticket_client(port, sleeps)
        watch = client.watch_tickets(worker_id="w-1")
        assert [(await anext(watch)).event_id for _ in range(2)] == ["e1", "e2"]
        await server.stop(grace=None)  # the stream breaks mid-way
        # While the server is down, reconnection attempts fail and back off.
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.wait_for(sleeps.until(3), timeout=20)
        assert not pending.done()
    async with serve(second, port=port):
        event = await asyncio.wait_for(pending, timeout=20)
    await watch.aclose()
    await client.close()
    assert event.event_id == "e3"
    assert second.watch_requests[0].cursor == "c2"
    assert not second.watch_requests[0].include_snapshot


async def test_watch_gives_up_after_the_configured_outage(sleeps: Sleeps) -> None:
    async with serve(FakeTickets()) as (_, port):
        pass
    channel = create_channel(f"127.0.0.1:{port}")
    client = TicketClient(
        channel=channel,
        reconnect=ReconnectPolicy(initial_backoff_seconds=0.01, give_up_after_seconds=0.2),
        owns_channel=True,
        sleep=sleeps,
    )
    async with client:
        with pytest.raises(Unavailable):
            await anext(client.watch_tickets(worker_id="w-1"))
    assert len(sleeps.waits) >= 1


# ------------------------------------------------------------------------------ registry


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def registry_client(registry: FakeRegistry, sleeps: Sleeps) -> AsyncIterator[RegistryClient]:
    async with serve(registry) as (_, port):
        channel = create_channel(f"127.0.0.1:{port}", token_provider=lambda: "worker-token")
        client = RegistryClient(
            channel=channel,
            policy=CallPolicy(timeout_seconds=5, deadline_seconds=30),
            reconnect=ReconnectPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05),
            owns_channel=True,
            sleep=sleeps,
        )
        async with client:
            yield client


async def test_register_uses_the_given_credential_and_heartbeat_the_channel_token(
    registry: FakeRegistry, registry_client: RegistryClient
) -> None:
    registry.failures = [Unavailable("starting")]
    registered = await registry_client.register(
        name="w1",
        capabilities=["python", "shell"],
        max_concurrent=2,
        labels={"zone": "a"},
        token="join-secret",
    )
    await registry_client.heartbeat(worker_id="w-1", in_flight=1)
    await registry_client.heartbeat(
        worker_id="w-1", in_flight=0, succeeded_total=3, failed_total=0, draining=True
    )
    await registry_client.deregister(worker_id="w-1")
    assert registered.token == "worker-token"
    assert [c[0] for c in registry.calls] == [
        "Register",
        "Register",
        "Heartbeat",
        "Heartbeat",
        "Deregister",
    ]
    auth = [c[2]["authorization"] for c in registry.calls]
    assert auth == ["Bearer join-secret"] * 2 + ["Bearer worker-token"] * 3
    register = registry.calls[0][1]
    assert list(register.capabilities) == ["python", "shell"]
    assert dict(register.labels) == {"zone": "a"}
    first, second = registry.calls[2][1], registry.calls[3][1]
    # Absent totals mean "unchanged": they must not be sent as zero.
    assert not first.HasField("succeeded_total")
    assert not first.HasField("failed_total")
    assert second.succeeded_total == 3
    assert second.HasField("failed_total")
    assert second.draining


async def test_discover_returns_ranked_workers(
    registry: FakeRegistry, registry_client: RegistryClient
) -> None:
    ranked = await registry_client.discover_workers(
        required_capabilities=["python"], max_results=3, token="service-token"
    )
    assert [(r.worker.worker_id, r.spare_capacity) for r in ranked] == [("w-1", 2)]
    assert registry.calls[0][1].max_results == 3
    assert registry.calls[0][2]["authorization"] == "Bearer service-token"


async def test_unimplemented_is_internal_and_not_retried(
    registry_client: RegistryClient, sleeps: Sleeps
) -> None:
    with pytest.raises(Internal) as raised:
        await registry_client.get_worker(worker_id="w-1")
    assert raised.value.details["grpc_code"] == "UNIMPLEMENTED"
    assert sleeps.waits == []


async def test_heartbeat_not_found_is_raised_at_once(
    registry: FakeRegistry, registry_client: RegistryClient
) -> None:
    registry.failures = [NotFound("register again")]
    with pytest.raises(NotFound):
        await registry_client.heartbeat(worker_id="w-1", in_flight=0)
    assert len(registry.calls) == 1


async def test_worker_watch_reconnects_and_resyncs_when_live(
    registry: FakeRegistry, registry_client: RegistryClient
) -> None:
    resyncs: list[int] = []

    async def resync() -> None:
        resyncs.append(registry.watch_connections)

    async with registry_client.watch_workers(on_connected=resync) as watch:
        first = await anext(watch)
        registry.drop_watch.set()
        second = await anext(watch)
    assert [first.event_id, second.event_id] == ["conn-1", "conn-2"]
    # on_connected ran once per live stream, after the server had accepted it.
    assert resyncs == [1, 2]
