"""OrchestratorService, the gRPC twin of the HTTP API, against the real system."""

from __future__ import annotations

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
        (pb.PlanSpec(plan_id="p-99", priority=99), "$.priority", "'99' is not a priority"),
        (pb.PlanSpec(plan_id="p-neg", priority=-3), "$.priority", "'-3' is not a priority"),
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
        for i in range(200)
    ]
    stub = pb_grpc.OrchestratorServiceStub(channel)
    with pytest.raises(InvalidArgument) as raised:
        await stub.SubmitPlan(pb.SubmitPlanRequest(plan=pb.PlanSpec(plan_id="big", tasks=tasks)))
    *shown, last = raised.value.violations
    assert shown[0].field == "$.tasks[0].depends_on[0]"
    assert last.field == "request"
    assert last.description == f"{200 - len(shown)} more violations not shown"


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
