"""The gRPC plan is a twin of the HTTP plan: every field of ``GET /api/v1/plans/{id}`` (and
of each of its tickets), of the submit answer and of the cancel answer has a gRPC field of
the same name holding the same value, and the gRPC messages have no field HTTP lacks.

The comparison is driven by the HTTP JSON and the message descriptors, not by a list of
names: a field added to one API and not to the other fails it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from hive_common.grpc_client import create_channel
from neuralhive.orchestrator.v1 import orchestrator_service_pb2 as pb
from neuralhive.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service

M = TypeVar("M", bound=Message)


def _path(where: str) -> str:
    """``plan.tickets[2].worker_id`` -> ``plan.tickets[].worker_id`` (one name per field)."""
    out, depth = [], 0
    for char in where:
        if char == "[":
            depth += 1
            out.append("[]")
        elif char == "]":
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


class TwinCheck:
    """Compares HTTP JSON objects with gRPC messages; remembers which HTTP fields were
    compared with a value (not null), so the test can tell it compared more than nulls."""

    def __init__(self) -> None:
        self.valued: set[str] = set()
        self.compared: set[str] = set()

    def message(
        self,
        http: dict[str, Any],
        message: Message,
        *,
        where: str,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        fields = {n: f for n, f in message.DESCRIPTOR.fields_by_name.items() if n not in skip}
        missing = sorted(set(http) - set(fields))
        assert not missing, f"{where}: HTTP fields without a gRPC counterpart: {missing}"
        extra = sorted(set(fields) - set(http))
        assert not extra, f"{where}: gRPC fields the HTTP API does not have: {extra}"
        for name, value in http.items():
            field = fields[name]
            present = field.is_repeated or field.message_type is None or message.HasField(name)
            self.value(field, value, getattr(message, name), present, where=f"{where}.{name}")

    def value(
        self,
        # A FieldDescriptor (the stubs also name the C implementation's class).
        field: Any,
        http: Any,
        grpc_value: Any,
        present: bool,
        *,
        where: str,
        element: bool = False,
    ) -> None:
        """One field's value (``element``: one item of a repeated field)."""
        self.compared.add(_path(where))
        if http is not None:
            self.valued.add(_path(where))
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value_field = message_type.fields_by_name["value"]
            assert set(http) == set(grpc_value), f"{where}: {http} != {dict(grpc_value)}"
            for key, item in http.items():
                self.value(value_field, item, grpc_value[key], True, where=f"{where}[{key}]")
        elif field.is_repeated and not element:
            assert len(http) == len(grpc_value), f"{where}: {http} != {list(grpc_value)}"
            for i, (item, grpc_item) in enumerate(zip(http, grpc_value, strict=True)):
                self.value(field, item, grpc_item, True, where=f"{where}[{i}]", element=True)
        elif message_type is not None and message_type.full_name == Timestamp.DESCRIPTOR.full_name:
            # HTTP: ISO 8601 or null; gRPC: a Timestamp or none. Compared as instants.
            expected = None if http is None else datetime.fromisoformat(http)
            actual = grpc_value.ToDatetime(tzinfo=UTC) if present else None
            assert expected == actual, f"{where}: HTTP {http!r}, gRPC {actual!r}"
        elif message_type is not None:
            self.message(http, grpc_value, where=where)
        elif field.enum_type is not None:
            # PLAN_STATUS_RUNNING is "RUNNING", PRIORITY_HIGH is "HIGH".
            prefix = field.enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
            name = field.enum_type.values_by_number[grpc_value].name.removeprefix(prefix)
            assert http == name, f"{where}: HTTP {http!r}, gRPC {name!r}"
        elif field.type == FieldDescriptor.TYPE_STRING:
            # proto3 strings have no null: "" is the HTTP API's null.
            assert ("" if http is None else http) == grpc_value, (
                f"{where}: HTTP {http!r}, gRPC {grpc_value!r}"
            )
        else:
            assert http == grpc_value, f"{where}: HTTP {http!r}, gRPC {grpc_value!r}"


def warning_strings(body: dict[str, Any]) -> dict[str, Any]:
    """The HTTP warnings as SubmitPlanResponse writes them: ``<code>: <field>: <description>``."""
    return {
        **body,
        "warnings": [f"{w['code']}: {w['field']}: {w['description']}" for w in body["warnings"]],
    }


async def same_moment(
    over_http: Callable[[], Awaitable[dict[str, Any]]],
    over_grpc: Callable[[], Awaitable[M]],
    ready: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    flow: Flow,
) -> tuple[dict[str, Any], M]:
    """An HTTP answer and a gRPC answer about the same state of the plan: HTTP, gRPC,
    HTTP again, until both HTTP answers agree (the plan is being driven meanwhile)."""

    async def probe() -> tuple[dict[str, Any], M] | None:
        before = await over_http()
        message = await over_grpc()
        after = await over_http()
        return (after, message) if before == after and ready(after) else None

    result: tuple[dict[str, Any], M] = await flow.wait_for(probe, what=what)
    return result


@pytest.fixture
async def stub(flow: Flow) -> AsyncIterator[pb_grpc.OrchestratorServiceAsyncStub]:
    # Long retry backoffs: a failed task stays PENDING with its backoff_until.
    app = await flow.start_orchestrator(backoff_base_seconds=3600.0, backoff_cap_seconds=3600.0)
    channel: grpc.aio.Channel = create_channel(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        yield pb_grpc.OrchestratorServiceStub(channel)
    finally:
        await channel.close()


PLAN_ID = "twin"
PLAN = pb.PlanSpec(
    plan_id=PLAN_ID,
    intent_id="intent-7",
    name="twins",
    priority=ticket_pb.PRIORITY_HIGH,
    tasks=[
        # Fails, then waits for its retry: error_message, backoff_until.
        pb.TaskSpec(
            task_id="flaky",
            task_type="fail",
            required_capabilities=["python"],
            max_retries=5,
        ),
        # Runs until the plan is cancelled: worker_id, lease_expires_at.
        pb.TaskSpec(
            task_id="hang",
            task_type="hang",
            required_capabilities=["python"],
            timeout_seconds=600,
        ),
        pb.TaskSpec(
            task_id="after",
            task_type="echo",
            required_capabilities=["python"],
            depends_on=["hang"],
        ),
    ],
)


async def test_the_grpc_plan_has_every_field_of_the_http_plan_with_the_same_value(
    flow: Flow, stub: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    worker = await flow.start_worker("w1", ["python"])

    async def hang(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.Event().wait()  # until cancelled
        return {}

    worker.add_task("hang", hang)
    check = TwinCheck()
    http = flow.client()

    submitted = await stub.SubmitPlan(pb.SubmitPlanRequest(plan=PLAN))
    assert submitted.created

    async def get_http() -> dict[str, Any]:
        return await flow.plan(PLAN_ID)

    async def get_grpc() -> pb.Plan:
        return (await stub.GetPlan(pb.GetPlanRequest(plan_id=PLAN_ID))).plan

    def running(body: dict[str, Any]) -> bool:
        tickets = flow.tasks(body)
        return (
            tickets["flaky"]["backoff_until"] is not None
            and tickets["hang"]["status"] == "RUNNING"
            and tickets["hang"]["lease_expires_at"] is not None
        )

    body, plan = await same_moment(get_http, get_grpc, running, what="a running plan", flow=flow)
    check.message(body, plan, where="plan")

    # Cancelled, then settled: cancel_requested_at, completed_at, settled_at.
    cancelled = await stub.CancelPlan(pb.CancelPlanRequest(plan_id=PLAN_ID))
    assert cancelled.cancel_requested
    assert cancelled.plan.HasField("cancel_requested_at")

    def settled(body: dict[str, Any]) -> bool:
        return body["settled_at"] is not None

    body, plan = await same_moment(get_http, get_grpc, settled, what="a settled plan", flow=flow)
    check.message(body, plan, where="plan")

    # The cancel answer (asked again: cancel_requested false on both)...
    async def cancel_http() -> dict[str, Any]:
        response = await http.post(f"/api/v1/plans/{PLAN_ID}/cancel")
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def cancel_grpc() -> pb.CancelPlanResponse:
        return await stub.CancelPlan(pb.CancelPlanRequest(plan_id=PLAN_ID))

    body, cancel = await same_moment(
        cancel_http, cancel_grpc, settled, what="a cancel answer", flow=flow
    )
    extras = frozenset(pb.CancelPlanResponse.DESCRIPTOR.fields_by_name) - {"plan"}
    check.message(
        {k: v for k, v in body.items() if k not in extras}, cancel.plan, where="cancel.plan"
    )
    check.message(
        {k: v for k, v in body.items() if k in extras},
        cancel,
        where="cancel",
        skip=frozenset({"plan"}),
    )

    # ... and the submit answer (submitted again: the same plan, created false on both).
    plan_json = {
        "plan_id": PLAN_ID,
        "intent_id": "intent-7",
        "name": "twins",
        "priority": "HIGH",
        "tasks": [
            {
                "task_id": "flaky",
                "task_type": "fail",
                "required_capabilities": ["python"],
                "max_retries": 5,
            },
            {
                "task_id": "hang",
                "task_type": "hang",
                "required_capabilities": ["python"],
                "timeout_seconds": 600,
            },
            {
                "task_id": "after",
                "task_type": "echo",
                "required_capabilities": ["python"],
                "depends_on": ["hang"],
            },
        ],
    }

    async def submit_http() -> dict[str, Any]:
        response = await flow.submit(plan_json)
        assert response.status_code == 200, response.text
        return warning_strings(response.json())

    async def submit_grpc() -> pb.SubmitPlanResponse:
        return await stub.SubmitPlan(pb.SubmitPlanRequest(plan=PLAN))

    body, again = await same_moment(
        submit_http, submit_grpc, settled, what="a submit answer", flow=flow
    )
    extras = frozenset(pb.SubmitPlanResponse.DESCRIPTOR.fields_by_name) - {"plan"}
    check.message(
        {k: v for k, v in body.items() if k not in extras}, again.plan, where="submit.plan"
    )
    check.message(
        {k: v for k, v in body.items() if k in extras},
        again,
        where="submit",
        skip=frozenset({"plan"}),
    )

    # The first answer too: the submitted priority reads back, each task's ticket id as
    # the HTTP 202 gives it.
    assert submitted.plan.priority == ticket_pb.PRIORITY_HIGH
    assert submitted.tickets_created
    assert dict(submitted.ticket_ids) == {t.task_id: t.ticket_id for t in submitted.plan.tickets}

    # Every field of the plan and of its tickets was compared with a value at least once,
    # not only as null against nothing.
    never_valued = sorted(p for p in check.compared - check.valued if p.startswith("plan."))
    assert not never_valued, f"compared only as null: {never_valued}"
