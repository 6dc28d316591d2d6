"""OrchestratorService, the gRPC twin of the HTTP API, against the real system."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2

from hive_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from hive_common.grpc_client import create_channel
from neuralhive.orchestrator.v1 import orchestrator_service_pb2 as pb
from neuralhive.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


def params(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def spec(plan_id: str, *, name: str = "") -> pb.PlanSpec:
    return pb.PlanSpec(
        plan_id=plan_id,
        name=name,
        priority=ticket_pb.PRIORITY_HIGH,
        tasks=[
            pb.TaskSpec(
                task_id="a",
                task_type="echo",
                required_capabilities=["python"],
                parameters=params(n=3, word="x"),
            ),
            pb.TaskSpec(
                task_id="b",
                task_type="echo",
                required_capabilities=["python"],
                depends_on=["a"],
                max_retries=1,
            ),
        ],
    )


@pytest.fixture
async def channel(flow: Flow) -> AsyncIterator[grpc.aio.Channel]:
    app = await flow.start_orchestrator()
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        yield channel
    finally:
        await channel.close()


async def test_submit_watch_and_resubmit(flow: Flow, channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    await flow.start_worker("w1", ["python"])
    submitted = await stub.SubmitPlan(pb.SubmitPlanRequest(plan=spec("over-grpc")))
    assert submitted.created is True
    assert [t.task_id for t in submitted.plan.tickets] == ["a", "b"]
    assert all(t.ticket_id for t in submitted.plan.tickets)

    statuses: list[int] = []
    async for update in stub.WatchPlan(pb.WatchPlanRequest(plan_id="over-grpc")):
        statuses.append(update.plan.status)
    assert statuses[-1] == pb.PLAN_STATUS_COMPLETED
    final = (await stub.GetPlan(pb.GetPlanRequest(plan_id="over-grpc"))).plan
    assert final.counts["COMPLETED"] == 2
    assert final.HasField("completed_at")

    again = await stub.SubmitPlan(pb.SubmitPlanRequest(plan=spec("over-grpc")))
    assert again.created is False
    with pytest.raises(AlreadyExists):
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=spec("over-grpc", name="changed")))

    # The same plan as JSON over HTTP is the same plan (Struct doubles are not a change).
    as_json = {
        "plan_id": "over-grpc",
        "priority": "HIGH",
        "tasks": [
            {
                "task_id": "a",
                "task_type": "echo",
                "required_capabilities": ["python"],
                "parameters": {"n": 3, "word": "x"},
            },
            {
                "task_id": "b",
                "task_type": "echo",
                "required_capabilities": ["python"],
                "depends_on": ["a"],
                "max_retries": 1,
            },
        ],
    }
    response = await flow.submit(as_json)
    assert response.status_code == 200, response.text


async def test_invalid_plans_and_unknown_ids(flow: Flow, channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    cyclic = pb.PlanSpec(
        plan_id="bad",
        tasks=[
            pb.TaskSpec(task_id="a", task_type="echo", depends_on=["b"]),
            pb.TaskSpec(task_id="b", task_type="echo", depends_on=["a"]),
            pb.TaskSpec(task_id="", task_type="echo"),
        ],
    )
    with pytest.raises(InvalidArgument) as raised:
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=cyclic))
    fields = {v.field: v.description for v in raised.value.violations}
    assert "$.tasks[2].task_id" in fields
    assert any("a -> b -> a" in d for d in fields.values()), fields
    with pytest.raises(NotFound):
        await stub.GetPlan(pb.GetPlanRequest(plan_id="bad"))
    with pytest.raises(NotFound):
        await stub.CancelPlan(pb.CancelPlanRequest(plan_id="nope"))


@pytest.mark.parametrize(
    ("plan", "field", "description"),
    [
        (
            pb.PlanSpec(plan_id="p-99", priority=ticket_pb.Priority.ValueType(99)),
            "$.priority",
            "'99' is not a priority",
        ),
        (
            pb.PlanSpec(plan_id="p-neg", priority=ticket_pb.Priority.ValueType(-3)),
            "$.priority",
            "'-3' is not a priority",
        ),
        (
            pb.PlanSpec(plan_id="p-nan", tasks=[pb.TaskSpec(parameters=params(x=float("nan")))]),
            "$.tasks[0].parameters.x",
            "nan is not a JSON number",
        ),
        (
            pb.PlanSpec(plan_id="p-inf", tasks=[pb.TaskSpec(parameters=params(x=-float("inf")))]),
            "$.tasks[0].parameters.x",
            "-inf is not a JSON number",
        ),
    ],
)
async def test_numbers_json_cannot_carry_are_invalid_not_internal(
    channel: grpc.aio.Channel, plan: pb.PlanSpec, field: str, description: str
) -> None:
    # An unnamed priority and NaN / infinite parameters failed in the conversion to the
    # HTTP API's JSON: INTERNAL with a traceback in the log.
    stub = pb_grpc.OrchestratorServiceStub(channel)
    for task in plan.tasks:
        task.task_id, task.task_type = "a", "echo"
        task.required_capabilities.append("python")
    if not plan.tasks:
        plan.tasks.append(pb.TaskSpec(task_id="a", task_type="echo", required_capabilities=["x"]))
    with pytest.raises(InvalidArgument) as raised:
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=plan))
    fields = {v.field: v.description for v in raised.value.violations}
    assert description in fields[field], fields
    with pytest.raises(NotFound):
        await stub.GetPlan(pb.GetPlanRequest(plan_id=plan.plan_id))


async def test_a_plan_with_hundreds_of_problems_is_invalid_argument_with_the_first_ones(
    channel: grpc.aio.Channel,
) -> None:
    # 200 tasks depending on a missing one made a 17 KiB trailer: RESOURCE_EXHAUSTED at the
    # client, with no violation at all.
    tasks = [
        pb.TaskSpec(
            task_id=f"t{i}",
            task_type="echo",
            required_capabilities=["python"],
            depends_on=["setup"],
        )
        for i in range(600)
    ]
    stub = pb_grpc.OrchestratorServiceStub(channel)
    with pytest.raises(InvalidArgument) as raised:
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=pb.PlanSpec(plan_id="big", tasks=tasks)))
    *shown, last = raised.value.violations
    assert shown[0].field == "$.tasks[0].depends_on[0]"
    assert last.field == "request"
    # Past the 500 the validator reports, its own "100 more" entry counted as 100, not 1.
    assert last.description == f"{600 - len(shown)} more violations not shown"
    assert raised.value.message.startswith("invalid plan: 600 problems")


async def test_cancelling_a_completed_plan_is_failed_precondition_like_over_http(
    flow: Flow, channel: grpc.aio.Channel
) -> None:
    # Was OK with the plan unchanged: a gRPC client could not tell nothing was cancelled.
    await flow.start_worker("w1", ["python"])
    stub = pb_grpc.OrchestratorServiceStub(channel)
    await stub.SubmitPlan(pb.SubmitPlanRequest(plan=spec("done")))
    assert (await flow.wait_settled("done"))["status"] == "COMPLETED"
    with pytest.raises(FailedPrecondition) as raised:
        await stub.CancelPlan(pb.CancelPlanRequest(plan_id="done"))
    assert "already COMPLETED" in raised.value.message
    over_http = await flow.client().post("/api/v1/plans/done/cancel")
    assert over_http.status_code == 412
    assert over_http.json()["error"]["message"] == raised.value.message


async def test_cancel_over_grpc_and_api_token(flow: Flow) -> None:
    app = await flow.start_orchestrator(api_token="grpc-token-for-tests")
    plain = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    authed = create_channel(
        f"127.0.0.1:{app.runtime.grpc_port}", token_provider=lambda: "grpc-token-for-tests"
    )
    try:
        with pytest.raises(Unauthenticated):
            await pb_grpc.OrchestratorServiceStub(plain).GetPlan(pb.GetPlanRequest(plan_id="x"))
        stub = pb_grpc.OrchestratorServiceStub(authed)
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=spec("cancel-me")))
        cancelled = await stub.CancelPlan(pb.CancelPlanRequest(plan_id="cancel-me"))
        assert cancelled.plan.status == pb.PLAN_STATUS_CANCELLED
        assert cancelled.cancel_requested
        again = await stub.CancelPlan(pb.CancelPlanRequest(plan_id="cancel-me"))
        assert again.plan.status == pb.PLAN_STATUS_CANCELLED
        assert not again.cancel_requested
        last = None
        async for update in stub.WatchPlan(pb.WatchPlanRequest(plan_id="cancel-me")):
            last = update.plan
        assert last is not None
        assert {t.status for t in last.tickets} == {ticket_pb.TICKET_STATUS_CANCELLED}
    finally:
        await plain.close()
        await authed.close()


async def test_a_plan_sent_as_json_with_whole_floats_is_the_grpc_plan(
    flow: Flow, channel: grpc.aio.Channel
) -> None:
    """JSON ``30.0`` first, then the same plan over gRPC (Struct numbers are doubles)."""
    stub = pb_grpc.OrchestratorServiceStub(channel)
    as_json = {
        "plan_id": "float-first",
        "tasks": [{"task_id": "a", "task_type": "echo", "parameters": {"n": 30.0, "x": 2.5}}],
    }
    response = await flow.submit(as_json)
    assert response.status_code == 202, response.text
    over_grpc = pb.PlanSpec(
        plan_id="float-first",
        tasks=[pb.TaskSpec(task_id="a", task_type="echo", parameters=params(n=30, x=2.5))],
    )
    again = await stub.SubmitPlan(pb.SubmitPlanRequest(plan=over_grpc))
    assert again.created is False


async def test_ids_that_cannot_exist_are_not_found(flow: Flow, channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    with pytest.raises(NotFound):
        await stub.GetPlan(pb.GetPlanRequest(plan_id="x\x00y"))
    with pytest.raises(NotFound):
        await stub.CancelPlan(pb.CancelPlanRequest(plan_id="x\x00y"))
    # An id longer than any plan's: echoed whole in the error's trailer, it made the
    # client refuse the answer (RESOURCE_EXHAUSTED: metadata over its limit).
    for call in (
        stub.GetPlan(pb.GetPlanRequest(plan_id="a" * 5000)),
        stub.CancelPlan(pb.CancelPlanRequest(plan_id="a" * 5000)),
    ):
        with pytest.raises(NotFound) as raised:
            await call
        assert len(raised.value.message) < 200


async def test_two_authorization_entries_are_refused_like_over_http(flow: Flow) -> None:
    # The servicer took the first entry holding the token: a wrong one then the right one
    # was OK over gRPC, and 401 over HTTP and at the other services.
    app = await flow.start_orchestrator(api_token="grpc-token-for-tests")
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        for headers in (
            [("authorization", "Bearer wrong"), ("authorization", "Bearer grpc-token-for-tests")],
            [("authorization", "Basic grpc-token-for-tests")],
        ):
            with pytest.raises(Unauthenticated) as raised:
                await stub.GetPlan(pb.GetPlanRequest(plan_id="x"), metadata=headers)
            over_http = await flow.client().get("/api/v1/plans/x", headers=headers)
            assert over_http.status_code == 401
            assert over_http.json()["error"]["message"] == raised.value.message
        assert raised.value.message == "authorization header must be 'Bearer <token>'"
    finally:
        await channel.close()


async def test_stop_ends_watch_plan_streams_instead_of_waiting_for_the_grace(
    flow: Flow,
) -> None:
    # A stream watching a plan that never settles held the stop for the whole grace
    # period, then ended UNAVAILABLE ("Cancelling all calls").
    app = await flow.start_orchestrator()
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        never = pb.TaskSpec(task_id="a", task_type="echo", required_capabilities=["no-such"])
        plan = pb.PlanSpec(plan_id="never-settles", tasks=[never])
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=plan))
        updates = aiter(stub.WatchPlan(pb.WatchPlanRequest(plan_id="never-settles")))
        first = await anext(updates)
        assert first.plan.plan_id == "never-settles"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await app.stop(30)
        rest = [update async for update in updates]  # ends with OK, or raises
        assert all(not update.plan.completed_at.seconds for update in rest)
        # Far below the 30 s grace: the stream ended because of the stop, not the grace.
        assert loop.time() - started < 15
    finally:
        await channel.close()


async def test_watch_plan_streams_read_the_whole_plan_only_when_it_changed_and_are_bounded(
    flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every stream read the whole plan (every task) twice a second, and on every change:
    # 20 streams on a 3,000-task plan held up the orchestrator (submits took seconds,
    # /ready blamed PostgreSQL), and any number of streams was served.
    app = await flow.start_orchestrator(watch_plan_interval_seconds=0.05, watch_plan_max_streams=2)
    full_reads: list[str] = []
    read_plan = app.repository.get

    async def counted(plan_id: str) -> Any:
        full_reads.append(plan_id)
        return await read_plan(plan_id)

    monkeypatch.setattr(app.repository, "get", counted)
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        never = pb.TaskSpec(task_id="a", task_type="echo", required_capabilities=["no-such"])
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=pb.PlanSpec(plan_id="idle", tasks=[never])))
        before = len(full_reads)  # the submit's own
        watches = [stub.WatchPlan(pb.WatchPlanRequest(plan_id="idle")) for _ in range(2)]
        for watch in watches:
            assert (await anext(aiter(watch))).plan.plan_id == "idle"
        assert len(full_reads) == before + 1  # the two streams share one read
        await asyncio.sleep(1.0)  # some 20 polls, the plan unchanged
        assert len(full_reads) == before + 1
        with pytest.raises(ResourceExhausted) as refused:
            await anext(aiter(stub.WatchPlan(pb.WatchPlanRequest(plan_id="idle"))))
        assert "WATCH_PLAN_MAX_STREAMS" in refused.value.message
        # A change is still seen (and read once per stream).
        assert (await flow.client().post("/api/v1/plans/idle/cancel")).status_code == 200
        for watch in watches:
            async for update in watch:
                if update.plan.status == pb.PLAN_STATUS_CANCELLED:
                    break
        for watch in watches:
            watch.cancel()
        # Their slots are free again.
        again = stub.WatchPlan(pb.WatchPlanRequest(plan_id="idle"))
        assert (await anext(aiter(again))).plan.status == pb.PLAN_STATUS_CANCELLED
        again.cancel()
    finally:
        await channel.close()


async def test_watch_plan_goes_on_past_a_terminal_status_until_the_plan_is_settled(
    flow: Flow, channel: grpc.aio.Channel
) -> None:
    # A plan is CANCELLED at once, its tickets in flight cancelled next (here only once
    # the stopped ticket service is back): the stream ends with the plan settled, as the
    # `hive` CLI's watch does, not at the status.
    stub = pb_grpc.OrchestratorServiceStub(channel)
    await flow.start_worker("w1", ["python"])
    nap = pb.TaskSpec(
        task_id="nap",
        task_type="sleep",
        required_capabilities=["python"],
        parameters=params(seconds=60),
    )
    await stub.SubmitPlan(pb.SubmitPlanRequest(plan=pb.PlanSpec(plan_id="nap", tasks=[nap])))
    await flow.wait_plan(
        "nap", lambda b: b["tickets"][0]["status"] == "RUNNING", "its ticket running"
    )
    updates = aiter(stub.WatchPlan(pb.WatchPlanRequest(plan_id="nap")))
    await flow.stop_ticket_service()
    try:
        assert (await flow.client().post("/api/v1/plans/nap/cancel")).status_code == 200
        async with asyncio.timeout(30):
            while True:
                update = (await anext(updates)).plan
                if update.status == pb.PLAN_STATUS_CANCELLED:
                    break
        assert not update.HasField("settled_at")
        assert update.counts["RUNNING"] == 1
        # Still open: the next update is the plan settled, once the ticket service is back.
        following = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(1.0)
        assert not following.done()
    finally:
        await flow.start_ticket_service()
    async with asyncio.timeout(30):
        rest = [(await following).plan] + [u.plan async for u in updates]
    assert rest[-1].HasField("settled_at")
    assert rest[-1].counts["CANCELLED"] == 1
    assert all(not u.HasField("settled_at") for u in rest[:-1])


def blob_plan(plan_id: str, tasks: int) -> pb.SubmitPlanRequest:
    """Tasks with 60 KB of parameters each (within MAX_PARAMETERS_BYTES)."""
    return pb.SubmitPlanRequest(
        plan=pb.PlanSpec(
            plan_id=plan_id,
            tasks=[
                pb.TaskSpec(
                    task_id=f"t{n:03}",
                    task_type="echo",
                    required_capabilities=["python"],
                    parameters=params(blob="x" * 60_000, n=n),
                )
                for n in range(tasks)
            ],
        )
    )


async def test_plans_up_to_max_request_bytes_are_accepted_over_grpc_too(flow: Flow) -> None:
    # The gRPC server kept its default 4 MiB receive limit: a 5 MB plan accepted over
    # HTTP (MAX_REQUEST_BYTES, 8 MiB) was RESOURCE_EXHAUSTED over gRPC.
    limit = 8 * 1024 * 1024
    app = await flow.start_orchestrator(max_request_bytes=limit)
    channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}", max_message_bytes=2 * limit)
    try:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        request = blob_plan("five-megabytes", 85)
        assert 4 * 1024 * 1024 < request.ByteSize() < limit
        submitted = await stub.SubmitPlan(request)
        assert submitted.created is True
        over = blob_plan("over-the-limit", 150)
        assert over.ByteSize() > limit
        with pytest.raises(ResourceExhausted):
            await stub.SubmitPlan(over)
    finally:
        await channel.close()
