"""A real Worker against the real ticket service and registry.

The test plays the orchestrator (service token): it creates tickets and assigns them to
the worker, then watches what the worker made of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import types
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from hive_common.clients import RegistryClient, TicketClient
from hive_common.errors import AlreadyExists, NotFound, Unauthenticated
from hive_worker import TaskContext, TaskError, sdk
from neuralhive.registry.v1 import registry_service_pb2 as rpb
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

from .conftest import Workers

pytestmark = pytest.mark.service

WAIT_SECONDS = 30.0
COMPLETED = pb.TICKET_STATUS_COMPLETED
FAILED = pb.TICKET_STATUS_FAILED
PENDING = pb.TICKET_STATUS_PENDING
ASSIGNED = pb.TICKET_STATUS_ASSIGNED
RUNNING = pb.TICKET_STATUS_RUNNING
CANCELLED = pb.TICKET_STATUS_CANCELLED


def spec(task_type: str, params: dict[str, Any] | None = None, **fields: Any) -> pb.TicketSpec:
    """A ticket spec with a unique plan and task id."""
    result = pb.TicketSpec(
        plan_id=fields.pop("plan_id", f"plan-{uuid.uuid4().hex[:8]}"),
        task_id=fields.pop("task_id", f"task-{uuid.uuid4().hex[:8]}"),
        task_type=task_type,
        required_capabilities=["python"],
        **fields,
    )
    result.parameters.update(params or {})
    return result


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    condition: Callable[[Any], bool],
    *,
    what: str,
    seconds: float = WAIT_SECONDS,
) -> Any:
    """Poll ``probe`` until ``condition`` holds (a bounded wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + seconds
    last: Any = None
    while loop.time() < ends:
        last = await probe()
        if condition(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last}")


async def wait_status(
    client: TicketClient, ticket_id: str, *statuses: pb.TicketStatus.ValueType, attempt: int = 1
) -> pb.ExecutionTicket:
    ticket: pb.ExecutionTicket = await eventually(
        lambda: client.get_ticket(ticket_id=ticket_id),
        lambda t: t.status in statuses and t.attempt == attempt,
        what=f"ticket {ticket_id} to reach {[pb.TicketStatus.Name(s) for s in statuses]} "
        f"at attempt {attempt}",
    )
    return ticket


async def create_and_assign(
    client: TicketClient, worker_id: str, ticket_spec: pb.TicketSpec
) -> pb.ExecutionTicket:
    created = await client.create_ticket(spec=ticket_spec)
    return await client.assign_ticket(
        ticket_id=created.ticket.ticket_id, worker_id=worker_id, attempt=created.ticket.attempt
    )


class Gate:
    """A handler that blocks until released, counting how many run at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self._changed = asyncio.Event()

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.append(ctx.ticket_id)
        self._changed.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.ticket_id)
            self._changed.set()
            raise
        finally:
            self.active -= 1
        return {"released": ctx.ticket_id}

    async def until(self, condition: Callable[[], bool]) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), WAIT_SECONDS)


def _rpcs_started(tickets: Any, method: str) -> float:
    registry = tickets.service.runtime.metrics_registry
    labels = {
        "grpc_service": "neuralhive.ticket.v1.TicketService",
        "grpc_method": method,
        "grpc_type": "unary_unary",
    }
    return registry.get_sample_value("grpc_server_started_total", labels) or 0.0


async def test_echo_runs_to_completed_with_its_result(
    workers: Any, orchestrator: TicketClient, registry_admin: RegistryClient, tickets: Any
) -> None:
    worker = workers.make(capabilities=["python", "shell"], labels={"zone": "a"})
    worker_id = await workers.start(worker)
    registered = await registry_admin.get_worker(worker_id=worker_id)
    assert list(registered.capabilities) == ["python", "shell"]
    assert dict(registered.labels) == {"zone": "a"}

    params = {"message": "hello", "n": 2, "nested": {"ok": True}}
    assigned = await create_and_assign(orchestrator, worker_id, spec("echo", params))
    done = await wait_status(orchestrator, assigned.ticket_id, COMPLETED)
    assert dict(done.result) == {"message": "hello", "n": 2.0, "nested": {"ok": True}}
    assert done.worker_id == worker_id
    assert done.HasField("started_at")
    assert done.error_message == ""
    # The ticket token came with the assignment: the worker never asked for one. Its two
    # reports (RUNNING, then COMPLETED) went in two UpdateTicketStatuses calls.
    assert _rpcs_started(tickets, "UpdateTicketStatuses") == 2
    assert _rpcs_started(tickets, "UpdateTicketStatus") == 0
    assert _rpcs_started(tickets, "GenerateToken") == 0
    # The heartbeat carries the cumulative totals to the registry.
    seen = await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.succeeded_total == 1,
        what="succeeded_total == 1 in the registry",
    )
    assert seen.failed_total == 0
    # An empty result is a result ({}), not "none recorded" (it was stored as null).
    empty = await create_and_assign(orchestrator, worker_id, spec("echo", {}, task_id="e"))
    empty_done = await wait_status(orchestrator, empty.ticket_id, COMPLETED)
    assert empty_done.HasField("result")
    assert dict(empty_done.result) == {}


async def test_a_retryable_failure_is_requeued_then_fails_for_good(
    workers: Any, orchestrator: TicketClient, registry_admin: RegistryClient
) -> None:
    worker_id = await workers.start(workers.make())
    ticket_spec = spec("fail", {"message": "flaky dependency"}, max_retries=1)
    first = await create_and_assign(orchestrator, worker_id, ticket_spec)

    requeued = await wait_status(orchestrator, first.ticket_id, PENDING, attempt=2)
    assert requeued.error_message == "flaky dependency"
    assert requeued.worker_id == ""

    await orchestrator.assign_ticket(ticket_id=first.ticket_id, worker_id=worker_id, attempt=2)
    final = await wait_status(orchestrator, first.ticket_id, FAILED, attempt=2)
    assert final.error_message == "flaky dependency"
    await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.failed_total == 2,
        what="failed_total == 2 in the registry",
    )


@pytest.mark.parametrize(
    ("task_type", "params", "message"),
    [
        ("fail", {"message": "bad input", "permanent": True}, "bad input"),
        ("resize", {}, "unknown task type 'resize'"),
        ("shell", {"cmd": "rm -rf /"}, "not in the shell allow-list"),
        ("sleep", {"seconds": -1}, "parameters.seconds"),
    ],
)
async def test_permanent_failures_skip_the_remaining_retries(
    workers: Any,
    orchestrator: TicketClient,
    task_type: str,
    params: dict[str, Any],
    message: str,
) -> None:
    worker_id = await workers.start(workers.make(shell_allow_list=["make"]))
    assigned = await create_and_assign(
        orchestrator, worker_id, spec(task_type, params, max_retries=3)
    )
    final = await wait_status(orchestrator, assigned.ticket_id, FAILED, attempt=1)
    assert message in final.error_message


async def test_results_the_service_cannot_store_become_clear_failures(
    workers: Workers, orchestrator: TicketClient
) -> None:
    worker = workers.make()

    @worker.task("huge")
    async def huge(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"blob": "x" * 10_000}  # over the service's 4 KiB result limit

    @worker.task("nul")
    async def nul(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"text": "a\x00b"}  # PostgreSQL cannot store NUL characters

    worker_id = await workers.start(worker)
    too_big = await create_and_assign(orchestrator, worker_id, spec("huge", max_retries=2))
    with_nul = await create_and_assign(orchestrator, worker_id, spec("nul"))
    refused = await wait_status(orchestrator, too_big.ticket_id, FAILED, attempt=1)
    assert refused.error_message.startswith("the result was refused")
    stored = await wait_status(orchestrator, with_nul.ticket_id, COMPLETED)
    assert dict(stored.result) == {"text": "a\ufffdb"}


@pytest.mark.parametrize("checked_before_sending", [True, False])
async def test_a_result_larger_than_a_grpc_message_fails_for_good_without_it(
    workers: Workers,
    orchestrator: TicketClient,
    monkeypatch: pytest.MonkeyPatch,
    checked_before_sending: bool,
) -> None:
    # The ticket service refused the report (RESOURCE_EXHAUSTED), the worker reported
    # nothing, and the ticket stayed RUNNING until its lease expired, then ran again.
    if not checked_before_sending:  # the service's refusal is handled the same way
        monkeypatch.setattr(sdk, "MAX_MESSAGE_BYTES", 64 * 1024 * 1024)
    worker = workers.make()

    @worker.task("huge")
    async def huge(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"s": "x" * 5_000_000}

    @worker.task("huge-failure")
    async def huge_failure(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        raise TaskError("gave up", result={"s": "x" * 5_000_000})

    worker_id = await workers.start(worker)
    completed = await create_and_assign(orchestrator, worker_id, spec("huge", max_retries=2))
    failed = await create_and_assign(orchestrator, worker_id, spec("huge-failure"))
    refused = await wait_status(orchestrator, completed.ticket_id, FAILED, attempt=1)
    dropped = await wait_status(orchestrator, failed.ticket_id, FAILED, attempt=1)
    expected = "too large to report" if checked_before_sending else "larger than max"
    assert refused.error_message.startswith("the result was refused: ")
    assert expected in refused.error_message
    assert not refused.result.fields
    assert dropped.error_message.startswith("gave up (result dropped: ")
    assert expected in dropped.error_message


async def test_an_unexpected_error_fails_the_ticket_instead_of_leaving_it_running(
    workers: Workers, orchestrator: TicketClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error the worker did not foresee used to be logged only: the ticket stayed
    # RUNNING until its timeout (an hour by default) on a healthy worker.
    worker = workers.make()

    @worker.task("huge-number")
    async def huge_number(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"n": 10**400}  # valid JSON, but no double holds it

    @worker.task("deep")
    async def deep(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for _ in range(40):  # deeper than protobuf decodes when copying the report
            result = {"in": result}
        return result

    invoke = worker._invoke_handler

    async def broken(run: Any) -> sdk.Outcome | None:
        if run.ticket.task_type == "broken":
            raise RuntimeError("worker bug")
        return await invoke(run)

    monkeypatch.setattr(worker, "_invoke_handler", broken)
    worker.add_task("broken", echo_params)
    worker_id = await workers.start(worker)

    unencodable = await create_and_assign(orchestrator, worker_id, spec("huge-number"))
    failed = await wait_status(orchestrator, unencodable.ticket_id, FAILED, attempt=1)
    assert failed.error_message.startswith(
        "the handler returned an invalid result: result.n: integers beyond ±2^53"
    )
    assert not failed.result.fields  # reported without it

    too_deep = await create_and_assign(orchestrator, worker_id, spec("deep", max_retries=2))
    failed = await wait_status(orchestrator, too_deep.ticket_id, FAILED, attempt=1)
    assert failed.error_message == (
        "the handler returned an invalid result: objects and arrays nest more than 32 "
        "levels deep (the ticket service's limit)"
    )

    bug = await create_and_assign(orchestrator, worker_id, spec("broken", max_retries=1))
    requeued = await wait_status(orchestrator, bug.ticket_id, PENDING, attempt=2)  # retryable
    assert requeued.error_message == "unexpected error in the worker: RuntimeError: worker bug"


async def echo_params(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return params


async def test_max_concurrent_is_honoured(workers: Any, orchestrator: TicketClient) -> None:
    worker = workers.make(max_concurrent=2)
    gate = Gate()
    worker.add_task("block", gate)
    worker_id = await workers.start(worker)
    plan = f"plan-{uuid.uuid4().hex[:8]}"
    ids = [
        (await create_and_assign(orchestrator, worker_id, spec("block", plan_id=plan))).ticket_id
        for _ in range(4)
    ]
    # Settled: all four accepted, two handlers run (a third slot would start a third; the
    # gate's peak below counts every handler that ever ran at once).
    await eventually(
        lambda: asyncio.sleep(0, (worker.in_flight, len(gate.started))),
        lambda seen: seen == (4, 2),
        what="all four accepted, two of them started",
    )
    page = await orchestrator.list_tickets(plan_id=plan)
    statuses = sorted(pb.TicketStatus.Name(t.status) for t in page.tickets)
    # Two run; the other two wait for a slot without being started.
    assert statuses == ["TICKET_STATUS_ASSIGNED"] * 2 + ["TICKET_STATUS_RUNNING"] * 2

    gate.release.set()
    for ticket_id in ids:
        done = await wait_status(orchestrator, ticket_id, COMPLETED)
        assert dict(done.result) == {"released": ticket_id}
    assert gate.peak == 2
    assert sorted(gate.started) == sorted(ids)


async def test_reports_made_together_go_in_one_call(
    workers: Any, orchestrator: TicketClient, tickets: Any
) -> None:
    worker = workers.make(max_concurrent=4)
    gate = Gate()
    worker.add_task("block", gate)
    worker_id = await workers.start(worker)
    plan = f"plan-{uuid.uuid4().hex[:8]}"
    created = [
        (await orchestrator.create_ticket(spec=spec("block", plan_id=plan))).ticket
        for _ in range(4)
    ]
    # Assigned in one transaction: one watch message hands the worker all four, they
    # start in the same turn of its loop, and their RUNNING reports go in one call.
    assigned = await orchestrator.assign_tickets(
        [
            pb.AssignTicketRequest(ticket_id=t.ticket_id, worker_id=worker_id, attempt=1)
            for t in created
        ]
    )
    assert all(isinstance(t, pb.ExecutionTicket) for t in assigned)
    await gate.until(lambda: len(gate.started) == 4)
    assert _rpcs_started(tickets, "UpdateTicketStatuses") == 1
    # Released together: the four COMPLETED reports go in one call too.
    gate.release.set()
    for ticket in created:
        done = await wait_status(orchestrator, ticket.ticket_id, COMPLETED)
        assert dict(done.result) == {"released": ticket.ticket_id}
    assert _rpcs_started(tickets, "UpdateTicketStatuses") == 2
    assert worker.succeeded_total == 4


async def test_a_name_taken_over_gets_a_new_identity_and_leaves_the_old_ones_tickets(
    workers: Any, registry: Any, orchestrator: TicketClient
) -> None:
    name = f"returning-{uuid.uuid4().hex[:6]}"
    # An earlier life of this worker registered; a ticket was assigned to it meanwhile.
    earlier = RegistryClient.connect(registry.target)
    async with earlier:
        response = await earlier.register(
            name=name,
            capabilities=["python"],
            max_concurrent=1,
            token="hive-worker-service-tests-registration-secret",
            instance_id="earlier-process",
        )
    # That life went silent long enough for its registration to have lapsed (not expired).
    registry.clock.advance(16)
    assigned = await create_and_assign(
        orchestrator, response.worker.worker_id, spec("echo", {"x": "while away"})
    )

    # The name is taken over under a new id (the old one ends with EXPIRED, and the
    # orchestrator hands its tickets back): with the same id, the earlier process, had it
    # only been paused, would have run this one's assignments too.
    worker_id = await workers.start(workers.make(name=name))
    assert worker_id != response.worker.worker_id
    mine = await create_and_assign(orchestrator, worker_id, spec("echo", {"x": "mine"}))
    assert dict((await wait_status(orchestrator, mine.ticket_id, COMPLETED)).result) == {
        "x": "mine"
    }
    # The old identity's assignment is not this process's to run.
    left = await orchestrator.get_ticket(ticket_id=assigned.ticket_id)
    assert (left.status, left.worker_id) == (ASSIGNED, response.worker.worker_id)


async def test_a_cancelled_ticket_stops_its_handler_and_reports_nothing(
    workers: Any, orchestrator: TicketClient
) -> None:
    worker = workers.make()
    gate = Gate()
    worker.add_task("block", gate)
    worker_id = await workers.start(worker)
    assigned = await create_and_assign(orchestrator, worker_id, spec("block"))
    await gate.until(lambda: len(gate.started) == 1)

    await orchestrator.update_ticket_status(
        ticket_id=assigned.ticket_id, status=CANCELLED, attempt=0, error_message="plan cancelled"
    )
    await gate.until(lambda: gate.cancelled == [assigned.ticket_id])
    await eventually(lambda: asyncio.sleep(0, worker.in_flight), lambda n: n == 0, what="idle")
    final = await orchestrator.get_ticket(ticket_id=assigned.ticket_id)
    assert final.status == CANCELLED
    assert final.error_message == "plan cancelled"
    assert worker.succeeded_total == worker.failed_total == 0


async def _blocked(
    workers: Any, orchestrator: TicketClient, *, drain_grace_seconds: float = 0.2
) -> tuple[Any, str, Gate, pb.ExecutionTicket]:
    """A worker running a task that blocks until its gate is released: (worker, its id,
    the task's gate, the ticket)."""
    worker = workers.make(drain_grace_seconds=drain_grace_seconds)
    gate = Gate()
    worker.add_task("block", gate)
    worker_id = await workers.start(worker)
    assigned = await create_and_assign(orchestrator, worker_id, spec("block"))
    await gate.until(lambda: len(gate.started) == 1)
    return worker, worker_id, gate, assigned


async def test_drain_finishes_running_work_takes_no_new_work_and_deregisters(
    workers: Any, orchestrator: TicketClient, registry_admin: RegistryClient
) -> None:
    worker, worker_id, gate, running = await _blocked(workers, orchestrator, drain_grace_seconds=60)
    worker.drain()
    draining = await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.status == rpb.WORKER_STATUS_DRAINING,
        what="the registry to show the worker DRAINING",
    )
    assert draining.in_flight == 1
    # Assigned after the drain started: the worker must not start it.
    late = await create_and_assign(orchestrator, worker_id, spec("echo", {"late": True}))

    gate.release.set()
    task = workers.running[-1][1]
    await asyncio.wait_for(task, WAIT_SECONDS)  # run() returned normally
    assert (await orchestrator.get_ticket(ticket_id=running.ticket_id)).status == COMPLETED
    assert (await orchestrator.get_ticket(ticket_id=late.ticket_id)).status == ASSIGNED
    with pytest.raises(NotFound):
        await registry_admin.get_worker(worker_id=worker_id)


async def test_a_ticket_service_outage_delays_work_and_loses_nothing(
    workers: Any, tickets: Any, orchestrator: TicketClient
) -> None:
    worker_id = await workers.start(workers.make())
    before = await create_and_assign(orchestrator, worker_id, spec("echo", {"n": 1}))
    await wait_status(orchestrator, before.ticket_id, COMPLETED)

    await tickets.stop()  # the worker's watch stream breaks
    await tickets.start()  # same port, same database
    after = await create_and_assign(orchestrator, worker_id, spec("echo", {"n": 2}))
    done = await wait_status(orchestrator, after.ticket_id, COMPLETED)
    assert dict(done.result) == {"n": 2.0}


async def test_a_worker_that_cannot_see_its_assignments_reports_no_free_slot(
    workers: Any, tickets: Any, registry_admin: RegistryClient
) -> None:
    # It used to heartbeat with every slot free: the orchestrator kept assigning it
    # tickets it never saw, each costing an attempt and a lease (plans failed for it).
    worker = workers.make(max_concurrent=3, heartbeat_interval_seconds=0.2)
    worker_id = await workers.start(worker)
    await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.in_flight == 0,
        what="a heartbeat with every slot free",
    )
    await tickets.stop()  # the assignment watch cannot reconnect
    await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.in_flight == 3,
        what="a heartbeat with no free slot",
    )
    await tickets.start()  # same port, same database
    await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.in_flight == 0,
        what="every slot free again",
    )


async def test_a_registry_outage_does_not_stop_work(
    workers: Any, registry: Any, orchestrator: TicketClient, registry_admin: RegistryClient
) -> None:
    worker = workers.make()
    worker_id = await workers.start(worker)
    await registry.stop()  # heartbeats now fail
    during = await create_and_assign(orchestrator, worker_id, spec("echo", {"n": 1}))
    await wait_status(orchestrator, during.ticket_id, COMPLETED)
    await registry.start()  # same port, same database
    # Heartbeats resume and carry what happened meanwhile.
    seen = await eventually(
        lambda: registry_admin.get_worker(worker_id=worker_id),
        lambda w: w.succeeded_total == 1,
        what="the registry to hear about the completed ticket",
    )
    assert seen.status == rpb.WORKER_STATUS_HEALTHY


async def test_registration_with_a_wrong_secret_is_refused(workers: Any) -> None:
    worker = workers.make(registration_secret="not-the-secret")
    with pytest.raises(Unauthenticated):
        await asyncio.wait_for(worker.run(install_signal_handlers=False), WAIT_SECONDS)


async def _hive_worker_process(
    registry: Any, tickets: Any, secret: str, name: str, capabilities: str = "python,shell"
) -> Any:
    env = {
        **os.environ,
        "HIVE_WORKER_REGISTRATION_SECRET": secret,
        "HIVE_WORKER_LOG_FORMAT": "json",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hive_worker",
        "--registry",
        registry.target,
        "--tickets",
        tickets.target,
        "--name",
        name,
        "--capabilities",
        capabilities,
        "--drain-grace",
        "5",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_the_command_drains_on_sigterm_and_exits_0(
    registry: Any, tickets: Any, registry_admin: RegistryClient, orchestrator: TicketClient
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    process = await _hive_worker_process(
        registry, tickets, "hive-worker-service-tests-registration-secret", name
    )
    try:
        page = await eventually(
            lambda: registry_admin.list_workers(capability="shell"),
            lambda p: any(w.name == name for w in p.workers),
            what="the command's worker in the registry",
        )
        worker = next(w for w in page.workers if w.name == name)
        assigned = await create_and_assign(orchestrator, worker.worker_id, spec("echo", {"a": 1}))
        await wait_status(orchestrator, assigned.ticket_id, COMPLETED)
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode(errors="replace")
    with pytest.raises(NotFound):
        await registry_admin.get_worker(worker_id=worker.worker_id)


async def test_the_command_exits_1_when_registration_is_refused(
    registry: Any, tickets: Any
) -> None:
    process = await _hive_worker_process(registry, tickets, "wrong-secret", "cli-refused")
    output, _ = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
    assert process.returncode == 1
    assert b"registration refused" in output
    assert b"HIVE_WORKER_REGISTRATION_SECRET" in output  # a credentials problem


async def test_the_command_names_the_settings_the_registry_refuses(
    registry: Any, tickets: Any
) -> None:
    process = await _hive_worker_process(
        registry,
        tickets,
        "hive-worker-service-tests-registration-secret",
        "cli-invalid",
        capabilities="a b",
    )
    output, _ = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
    assert process.returncode == 1
    lines = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    by_event = {line["event"]: line for line in lines}
    violation = "capabilities[0]: must be 1-64 characters"
    assert violation in by_event["registration refused"]["error"]
    assert violation in by_event["worker stopped"]["error"]
    # Not a credentials problem: the secrets are not blamed.
    assert b"SECRET" not in output


async def test_a_worker_the_registry_forgot_registers_again_and_keeps_working(
    workers: Any, registry: Any, orchestrator: TicketClient, registry_admin: RegistryClient
) -> None:
    worker = workers.make(heartbeat_interval_seconds=0.2)
    old_id = await workers.start(worker)

    async def jump_and_sweep() -> bool:
        registry.clock.advance(3600)
        await registry.app.sweeper.sweep_once()
        try:
            await registry_admin.get_worker(worker_id=old_id)
        except NotFound:
            return True
        return False

    # The worker expires and is removed. A heartbeat that lands between the clock's jump
    # and the sweep makes it fresh again (seen under CI load): jump again until it is
    # gone (removed by this sweep or by the registry's own sweeper loop, seen in CI too).
    await eventually(jump_and_sweep, bool, what="the worker to expire")

    # Its next heartbeat gets NOT_FOUND: it registers again, under a new id.
    new_id = await eventually(
        lambda: asyncio.sleep(0, worker.worker_id),
        lambda current: current != old_id,
        what="the worker to register again",
    )
    assert (await registry_admin.get_worker(worker_id=new_id)).name == worker.settings.name
    assigned = await create_and_assign(orchestrator, new_id, spec("echo", {"again": True}))
    done = await wait_status(orchestrator, assigned.ticket_id, COMPLETED)
    assert dict(done.result) == {"again": True}


async def test_work_still_running_when_the_drain_grace_ends_is_requeued_using_no_retry(
    workers: Any, orchestrator: TicketClient, registry_admin: RegistryClient
) -> None:
    # max_retries 0: a rolling restart used to fail the task it interrupted.
    worker, worker_id, gate, assigned = await _blocked(workers, orchestrator)

    worker.drain()
    await asyncio.wait_for(workers.running[-1][1], WAIT_SECONDS)
    assert gate.cancelled == [assigned.ticket_id]
    requeued = await orchestrator.get_ticket(ticket_id=assigned.ticket_id)
    assert (requeued.status, requeued.attempt, requeued.lost_runs) == (PENDING, 2, 1)
    assert requeued.error_message == "the worker stopped before the task finished"
    assert worker.failed_total == 0  # the worker's stop, not a failure of its tasks
    with pytest.raises(NotFound):
        await registry_admin.get_worker(worker_id=worker_id)


async def test_a_drain_that_cannot_report_names_the_tickets_left_unreported(
    workers: Any, tickets: Any, orchestrator: TicketClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the ticket service down the drain used to end, exit 0, and say nothing of the
    # outcomes it could not report.
    monkeypatch.setattr(sdk, "_SHUTDOWN_REPORT_SECONDS", 0.5)
    worker, _, _, assigned = await _blocked(workers, orchestrator)
    await tickets.stop()

    with capture_logs() as logs:
        worker.drain()
        await asyncio.wait_for(workers.running[-1][1], WAIT_SECONDS)
    [unreported] = [e for e in logs if e["event"].startswith("stopping without reporting")]
    assert unreported["log_level"] == "warning"
    assert unreported["tickets"] == [f"{assigned.ticket_id} attempt 1 (REPORTING)"]


async def test_a_second_live_worker_under_a_name_is_refused_and_the_first_runs_on(
    workers: Any, orchestrator: TicketClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two processes with one name used to share the worker id and both run every task.
    monkeypatch.setattr(sdk, "_NAME_WAIT_MARGIN", -14.0)  # give up after 1 s, not 17
    name = f"twin-{uuid.uuid4().hex[:6]}"
    first = workers.make(name=name)
    worker_id = await workers.start(first)
    second = workers.make(name=name)

    with pytest.raises(AlreadyExists) as refused:
        await asyncio.wait_for(second.run(install_signal_handlers=False), WAIT_SECONDS)

    assert f"worker name '{name}' is held by a running instance" in refused.value.message
    assert second.worker_id is None
    assigned = await create_and_assign(orchestrator, worker_id, spec("echo", {"n": 1}))
    await wait_status(orchestrator, assigned.ticket_id, COMPLETED)
    assert first.succeeded_total == 1


async def test_the_command_stops_at_once_on_sigterm_while_the_registry_is_unreachable() -> None:
    nowhere = types.SimpleNamespace(target="127.0.0.1:1")  # refused: Register keeps retrying
    process = await _hive_worker_process(nowhere, nowhere, "any-secret-at-all-0123", "cli-noreg")
    loop = asyncio.get_running_loop()
    try:
        # Started and retrying (the deadline of one Register call is 30 s).
        await asyncio.sleep(3)
        assert process.returncode is None
        sent = loop.time()
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
        stopped_after = loop.time() - sent
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode(errors="replace")
    assert stopped_after < 3, output.decode(errors="replace")  # was 20-27 s


async def test_a_cancel_during_a_drain_still_stops_the_running_task(
    workers: Any, orchestrator: TicketClient
) -> None:
    # The drain closed the assignment watch first: a plan cancelled during the drain
    # grace ran its task to the end, and the refused report was logged at WARNING.
    worker, _, gate, assigned = await _blocked(workers, orchestrator, drain_grace_seconds=60)
    worker.drain()
    await orchestrator.update_ticket_status(
        ticket_id=assigned.ticket_id, status=CANCELLED, attempt=0, error_message="plan cancelled"
    )
    await gate.until(lambda: gate.cancelled == [assigned.ticket_id])
    await asyncio.wait_for(workers.running[-1][1], WAIT_SECONDS)  # the drain ends
    final = await orchestrator.get_ticket(ticket_id=assigned.ticket_id)
    assert (final.status, final.error_message) == (CANCELLED, "plan cancelled")
