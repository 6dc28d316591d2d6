"""The handler registry, the public decorator API, settings/CLI parsing and how one
attempt's outcome is decided (no service involved: the dispatch runs without I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from google.protobuf import struct_pb2
from structlog.testing import capture_logs

from hive_common.config import unbounded_durations
from hive_common.errors import Aborted, FailedPrecondition
from hive_worker import (
    InvalidParameters,
    PermanentTaskError,
    TaskContext,
    TaskError,
    TaskRegistry,
    Worker,
    WorkerSettings,
    sdk,
)
from hive_worker.cli import settings_from_args
from hive_worker.sdk import MAX_RESULT_NESTING, Outcome, Phase, _Run, normalise_result
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

TICKET = "5b2f3a8e-1d7c-4c1e-9a53-2f1b0c9d8e71"


async def noop(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return {}


def test_registry_registers_and_refuses_duplicates_and_bad_names() -> None:
    registry = TaskRegistry()
    registry.register("resize", noop)
    assert registry.get("resize") is noop
    assert registry.get("missing") is None
    assert "resize" in registry
    with pytest.raises(ValueError, match="already has a handler"):
        registry.register("resize", noop)
    registry.register("resize", echo_twice, replace=True)
    assert registry.get("resize") is echo_twice
    for bad in ["", " x", "a b", "-lead", "x" * 129, "resize\n"]:
        with pytest.raises(ValueError, match="task type"):
            registry.register(bad, noop)
    assert registry.task_types() == ["resize"]


async def echo_twice(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return {"twice": [params, params]}


def settings(**values: Any) -> WorkerSettings:
    values.setdefault("name", "unit")
    values.setdefault("capabilities", ["python"])
    return WorkerSettings(**values)


def test_worker_decorator_adds_user_handlers_next_to_builtins() -> None:
    worker = Worker(settings=settings())

    @worker.task("resize")
    async def resize(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"width": params["width"] / 2}

    assert worker.tasks.get("resize") is resize
    assert worker.tasks.task_types() == ["echo", "fail", "http_get", "resize", "shell", "sleep"]
    with pytest.raises(ValueError, match="already"):
        worker.add_task("echo", noop)
    worker.add_task("echo", noop, replace=True)
    assert worker.tasks.get("echo") is noop
    assert Worker(settings=settings(), builtin_task_types=False).tasks.task_types() == []


def ticket(task_type: str, params: dict[str, Any], *, timeout: int = 60) -> pb.ExecutionTicket:
    struct = struct_pb2.Struct()
    struct.update(params)
    return pb.ExecutionTicket(
        ticket_id=TICKET,
        plan_id="plan",
        task_id="t",
        task_type=task_type,
        parameters=struct,
        attempt=1,
        max_retries=2,
        timeout_seconds=timeout,
        worker_id="w-1",
        status=pb.TICKET_STATUS_RUNNING,
        version=3,
    )


async def dispatch(worker: Worker, t: pb.ExecutionTicket) -> Outcome | None:
    run = _Run(ticket=t, worker_id="w-1", log=worker._log)
    return await worker._invoke_handler(run)


async def test_dispatch_outcomes() -> None:
    worker = Worker(settings=settings())
    seen: list[TaskContext] = []

    @worker.task("ctx")
    async def record(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"n": params["n"] + 1}

    @worker.task("crash")
    async def crash(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    @worker.task("bad-result")
    async def bad_result(params: dict[str, Any], ctx: TaskContext) -> Any:
        return ["not", "an", "object"]

    @worker.task("bad-params")
    async def bad_params(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        raise InvalidParameters("width", "must be positive")

    @worker.task("hang")
    async def hang(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    assert await dispatch(worker, ticket("echo", {"a": "b"})) == Outcome(
        completed=True, result={"a": "b"}
    )
    assert await dispatch(worker, ticket("ctx", {"n": 1})) == Outcome(
        completed=True, result={"n": 2.0}
    )
    assert (seen[0].ticket_id, seen[0].attempt, seen[0].max_retries) == (TICKET, 1, 2)
    assert not seen[0].last_attempt

    unknown = await dispatch(worker, ticket("resize", {}))
    assert unknown is not None
    assert unknown.permanent
    assert "unknown task type 'resize'" in unknown.error_message

    crashed = await dispatch(worker, ticket("crash", {}))
    assert crashed == Outcome.failure("RuntimeError: disk on fire")

    refused = await dispatch(worker, ticket("bad-result", {}))
    assert refused is not None
    assert refused.permanent
    assert "must return a dict" in refused.error_message

    invalid = await dispatch(worker, ticket("bad-params", {}))
    assert invalid == Outcome.failure("parameters.width: must be positive", permanent=True)

    failing = await dispatch(worker, ticket("fail", {"message": "nope", "permanent": True}))
    assert failing == Outcome.failure("nope", permanent=True)

    timed_out = await dispatch(worker, ticket("hang", {}, timeout=1))
    assert timed_out is not None
    assert not timed_out.permanent
    # The task's timeout, not the handler's share of it ("timed out after 0.9s").
    assert timed_out.error_message == "timed out: the task's timeout is 1s"


async def test_dispatch_of_a_disallowed_shell_command_is_permanent() -> None:
    worker = Worker(settings=settings(shell_allow_list="make"))
    outcome = await dispatch(worker, ticket("shell", {"cmd": "rm -rf /"}))
    assert outcome is not None
    assert outcome.permanent
    assert "not in the shell allow-list" in outcome.error_message


def test_task_error_flags() -> None:
    assert not TaskError("x").permanent
    assert TaskError("x", permanent=True).permanent
    assert PermanentTaskError("x").permanent
    assert not PermanentTaskError("x", permanent=False).permanent
    assert TaskError("x", result={"a": 1}).result == {"a": 1}


def test_normalise_result() -> None:
    assert normalise_result({"a": (1, 2), "s": "nul\x00"}) == {"a": [1, 2], "s": "nul\ufffd"}
    with pytest.raises(TypeError):
        normalise_result([1])
    with pytest.raises(ValueError, match="Out of range"):
        normalise_result({"x": float("inf")})
    with pytest.raises(TypeError):
        normalise_result({"x": object()})


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"i": 2**53 + 1}, "result.i: integers beyond ±2^53"),
        ({"neg": [0, -(2**53) - 1]}, "result.neg[1]: integers beyond ±2^53"),
        ({"big": {"n": 2**60}}, "result.big.n: integers beyond ±2^53"),
        ({"n": 10**400}, "result.n: integers beyond ±2^53"),
        ({1: "a", "1": "b"}, "result: keys must be strings, not int (1)"),
        ({"in": [{(1, 2): 0}]}, "result.in[0]: keys must be strings, not tuple"),
    ],
)
async def test_results_json_would_change_fail_for_good_naming_the_place(
    result: dict[Any, Any], problem: str
) -> None:
    # They were stored changed: 2**53 + 1 as 9007199254740992, 2**60 as a float, and
    # {1: "a", "1": "b"} as {"1": "b"}.
    worker = Worker(settings=settings())
    worker.add_task("inexact", functools.partial(returning, result))
    outcome = await dispatch(worker, ticket("inexact", {}))
    assert outcome is not None
    assert outcome.permanent
    assert outcome.error_message.startswith(f"the handler returned an invalid result: {problem}")
    # At the limit, and floats of any size, pass unchanged.
    exact = {"max": 2**53, "min": -(2**53), "f": 2.0**60, "flag": True}
    assert normalise_result(exact) == exact


def nested(levels: int) -> dict[str, Any]:
    """A result whose objects nest ``levels`` deep (the result itself is level 1)."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"in": value}
    return value


async def test_a_result_nested_deeper_than_the_ticket_service_takes_fails_for_good() -> None:
    # 40 levels made building the report's protobuf fail (DecodeError) and the ticket
    # stayed RUNNING until its timeout; the ticket service refuses more than 32 anyway.
    worker = Worker(settings=settings())
    worker.add_task("deep", functools.partial(returning, nested(MAX_RESULT_NESTING + 1)))
    worker.add_task("deepest", functools.partial(returning, nested(100_000)))
    worker.add_task("limit", functools.partial(returning, nested(MAX_RESULT_NESTING)))
    for task_type in ["deep", "deepest"]:
        assert await dispatch(worker, ticket(task_type, {})) == Outcome.failure(
            "the handler returned an invalid result: objects and arrays nest more than 32 "
            "levels deep (the ticket service's limit)",
            permanent=True,
        )
    assert await dispatch(worker, ticket("limit", {})) == Outcome(
        completed=True, result=nested(MAX_RESULT_NESTING)
    )


async def test_a_task_error_result_that_cannot_be_stored_is_dropped_from_the_failure() -> None:
    worker = Worker(settings=settings())

    @worker.task("fail-deep")
    async def fail_deep(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        raise TaskError("gave up", result=nested(40))

    assert await dispatch(worker, ticket("fail-deep", {})) == Outcome.failure(
        "gave up (result dropped: objects and arrays nest more than 32 levels deep "
        "(the ticket service's limit))"
    )


async def returning(result: dict[str, Any], params: dict[str, Any], ctx: TaskContext) -> Any:
    return result


def test_a_handler_that_is_not_async_is_refused_when_registered() -> None:
    # It used to be taken and fail each time a ticket ran it ("An asyncio.Future, a
    # coroutine or an awaitable is required"), leaving the ticket RUNNING.
    worker = Worker(settings=settings())

    def upper(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        return {"text": str(params["text"]).upper()}

    with pytest.raises(TypeError, match="handler for 'upper' must be an async def function"):
        worker.task("upper")(upper)  # type: ignore[type-var]  # deliberately not async
    with pytest.raises(TypeError, match="handler for 'upper' must be an async def function"):
        worker.add_task("upper", upper)  # type: ignore[arg-type]
    assert "upper" not in worker.tasks

    class Resize:
        async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            return {}

    # Async callables of every shape are taken: objects, partials.
    worker.add_task("resize", Resize())
    worker.add_task("partial", functools.partial(returning, {}))
    assert {"resize", "partial"} <= set(worker.tasks.task_types())


async def test_whole_numbers_reach_handlers_as_integers() -> None:
    worker = Worker(settings=settings())
    seen: list[dict[str, Any]] = []

    @worker.task("record")
    async def record(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        seen.append(params)
        return {}

    params = {"n": 3, "x": 2.5, "neg": -4, "big": 2.0**60, "list": [1, {"k": 2}], "flag": True}
    await dispatch(worker, ticket("record", params))
    [got] = seen
    assert got == {"n": 3, "x": 2.5, "neg": -4, "big": 2.0**60, "list": [1, {"k": 2}], "flag": True}
    types = [type(v) for v in (got["n"], got["neg"], got["list"][0], got["list"][1]["k"])]
    assert types == [int] * 4
    # Past 2**53 a double is no longer exact: it stays a float, and so does 2.5.
    assert (type(got["big"]), type(got["x"]), got["flag"]) == (float, float, True)


def test_a_run_is_superseded_only_by_newer_changes_that_leave_it() -> None:
    run = _Run(ticket=ticket("echo", {}), worker_id="w-1", accepted_version=3)

    def change(**fields: Any) -> pb.ExecutionTicket:
        t = ticket("echo", {})
        t.version = fields.pop("version", 4)
        for name, value in fields.items():
            setattr(t, name, value)
        return t

    assert not run.superseded_by(change(status=pb.TICKET_STATUS_RUNNING))
    assert not run.superseded_by(change(status=pb.TICKET_STATUS_CANCELLED, version=3))
    assert run.superseded_by(change(status=pb.TICKET_STATUS_CANCELLED))
    assert run.superseded_by(change(status=pb.TICKET_STATUS_PENDING, attempt=2, worker_id=""))
    assert run.superseded_by(change(status=pb.TICKET_STATUS_ASSIGNED, worker_id="w-2"))
    assert not run.superseded_by(change(attempt=0))


def test_the_load_a_heartbeat_reports_leaves_out_attempts_reporting_their_outcome() -> None:
    worker = Worker(settings=settings(max_concurrent=4))
    for n, phase in enumerate(Phase):
        run = _Run(ticket=ticket("echo", {}), worker_id="w-1", phase=phase)
        run.ticket.attempt = n + 1  # one run per phase, each its own key
        worker._runs[run.key] = run
    # Queued, starting, running: they hold or wait for a slot. Reporting: done with it.
    assert worker.in_flight == 4
    assert worker.load == 3


async def test_an_assignment_cancelled_before_it_starts_frees_its_slot() -> None:
    # Cancelled at once (before its task's first step), its run stayed in the worker's
    # count for good: heartbeats said in_flight 5 of 4 with nothing running.
    worker = Worker(settings=settings(max_concurrent=4))
    worker._worker_id = "w-1"
    for n in range(5):
        assigned = ticket("echo", {})
        assigned.ticket_id = f"t-{n}"
        worker._accept(assigned, None)
        [run] = [r for r in worker._runs.values() if r.ticket.ticket_id == f"t-{n}"]
        cancelled = ticket("echo", {})
        cancelled.ticket_id = f"t-{n}"
        cancelled.status = pb.TICKET_STATUS_CANCELLED
        worker._abandon(run, cancelled)
    assert worker.in_flight == 5
    await asyncio.sleep(0)  # the cancelled tasks end; their callbacks run
    await asyncio.sleep(0)
    assert (worker.in_flight, worker.load) == (0, 0)


def test_no_free_slot_is_reported_while_the_assignment_watch_does_not_deliver() -> None:
    # A watch the ticket service refused (e.g. tokens signed with another secret) was not
    # "down": heartbeats said every slot free, and tickets waited out their leases on it.
    worker = Worker(settings=settings(max_concurrent=4))
    assert worker._reported_load() == 0  # starting: its first watch is being opened
    watch = SimpleNamespace(live=False, down=True)  # reconnecting after a failure
    worker._watch = cast(Any, watch)
    assert worker._reported_load() == 4
    watch.live, watch.down = True, False
    worker._watch_live_changed(cast(Any, watch))
    assert worker._reported_load() == 0
    worker._watch_refused = True  # what a refusal sets, until a watch delivers again
    watch.live = False
    assert worker._reported_load() == 4
    worker._watch_live_changed(cast(Any, watch))  # still not live: still refused
    assert worker._reported_load() == 4
    watch.live = True
    worker._watch_live_changed(cast(Any, watch))
    assert worker._reported_load() == 0
    worker._watch_refused = True
    worker._draining = True  # nothing new comes anyway: the load says what is left
    assert worker._reported_load() == 0


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_WORKER_CAPABILITIES", "python, shell,python")
    monkeypatch.setenv("HIVE_WORKER_LABELS", "zone=a, tier=gpu")
    monkeypatch.setenv("HIVE_WORKER_SHELL_ALLOW_LIST", '["make", "pytest"]')
    monkeypatch.setenv("HIVE_WORKER_REGISTRATION_SECRET", "join")
    monkeypatch.setenv("HIVE_WORKER_MAX_CONCURRENT", "3")
    loaded = WorkerSettings()
    assert loaded.capabilities == ["python", "shell"]
    assert loaded.labels == {"zone": "a", "tier": "gpu"}
    assert loaded.shell_allow_list == ["make", "pytest"]
    assert loaded.registration_secret is not None
    assert loaded.registration_secret.get_secret_value() == "join"
    assert loaded.max_concurrent == 3
    assert loaded.name  # defaults to the host name


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_WORKER_CAPABILITIES", "python")
    monkeypatch.setenv("HIVE_WORKER_NAME", "from-env")
    monkeypatch.setenv("HIVE_WORKER_MAX_CONCURRENT", "3")
    loaded = settings_from_args(
        [
            "--capabilities",
            "python,shell",
            "--name",
            "w1",
            "--label",
            "zone=b",
            "--label",
            "gpu=yes",
            "--shell-allow",
            "make",
            "--registry",
            "registry:50051",
        ]
    )
    assert loaded.capabilities == ["python", "shell"]
    assert loaded.name == "w1"
    assert loaded.labels == {"zone": "b", "gpu": "yes"}
    assert loaded.shell_allow_list == ["make"]
    assert loaded.registry_target == "registry:50051"
    assert loaded.max_concurrent == 3  # not given on the command line: env applies


def test_http_get_allow_networks_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # By default http_get reaches public addresses only; the setting adds networks.
    assert WorkerSettings(capabilities=["http"]).http_get_allow_networks == []
    monkeypatch.setenv("HIVE_WORKER_CAPABILITIES", "http")
    monkeypatch.setenv("HIVE_WORKER_HTTP_GET_ALLOW_NETWORKS", "10.0.0.0/8, 127.0.0.1,fd00::/8")
    loaded = WorkerSettings()
    assert [str(n) for n in loaded.http_get_allow_networks] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
        "fd00::/8",
    ]
    worker = Worker(settings=loaded)
    assert worker.tasks.get("http_get").allowed_networks == tuple(  # type: ignore[union-attr]
        loaded.http_get_allow_networks
    )
    flagged = settings_from_args(["--http-get-allow", "192.168.0.0/16"])
    assert [str(n) for n in flagged.http_get_allow_networks] == ["192.168.0.0/16"]
    for bad in ("nope", "10.0.0.1/8", "localhost"):
        with pytest.raises(ValueError, match="http_get_allow_networks"):
            WorkerSettings(http_get_allow_networks=bad)
    with pytest.raises(
        ValueError, match=re.escape("'10.0.0.1/8' has host bits set; the network is 10.0.0.0/8")
    ):
        WorkerSettings(http_get_allow_networks="192.168.0.0/16,10.0.0.1/8")


@pytest.mark.parametrize(
    "values",
    [
        {"max_concurrent": 0},
        {"labels": "novalue"},
        {"capabilities": ["a", " "]},
        {"log_level": "LOUD"},
        {"name": ""},
        # Unbounded durations were accepted up to inf, and overflowed later.
        {"drain_grace_seconds": float("inf")},
        {"call_timeout_seconds": 1e300},
        {"heartbeat_interval_seconds": float("nan")},
        {"sleep_max_seconds": 7 * 86400 + 1},
    ],
)
def test_bad_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        WorkerSettings(**({"capabilities": ["python"]} | values))


def test_every_duration_setting_has_an_upper_bound() -> None:
    assert unbounded_durations(WorkerSettings) == []


@pytest.mark.parametrize(("given", "level"), [("warn", "WARNING"), (" debug ", "DEBUG")])
def test_log_levels_are_read_as_the_services_read_them(given: str, level: str) -> None:
    # compose passes one HIVE_LOG_LEVEL to every process: `warn` made the workers refuse
    # to start (and restart for ever) while the services ran.
    assert WorkerSettings(capabilities=["python"], log_level=given).log_level == level


@pytest.mark.parametrize("capabilities", ["", " , ", [], None])
def test_a_worker_without_capabilities_is_refused_before_registering(
    capabilities: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry never registers a worker without a capability.
    monkeypatch.delenv("HIVE_WORKER_CAPABILITIES", raising=False)
    values = {} if capabilities is None else {"capabilities": capabilities}
    with pytest.raises(ValueError, match="at least one capability is required"):
        WorkerSettings(name="unit", **values)


def test_the_command_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from hive_worker.cli import main

    assert main(["--max-concurrent", "0", "--capabilities", "shell"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "hive-worker: invalid settings:",
        "  --max-concurrent / HIVE_WORKER_MAX_CONCURRENT: Input should be greater than or "
        "equal to 1",
    ]


def test_each_label_flag_is_one_label(capsys: pytest.CaptureFixture[str]) -> None:
    # The flags were joined with commas and split again: a value with a comma became two
    # labels (one refused), and a refusal named HIVE_WORKER_LABELS only.
    loaded = settings_from_args(
        ["--capabilities", "python", "--label", "desc=fast,cheap", "--label", "eq=a=b"]
    )
    assert loaded.labels == {"desc": "fast,cheap", "eq": "a=b"}
    from hive_worker.cli import main

    assert main(["--capabilities", "python", "--label", "zone=eu", "--label", "novalue"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "hive-worker: invalid settings:",
        "  --label / HIVE_WORKER_LABELS: label 'novalue' is not key=value",
    ]


def test_the_command_refuses_an_empty_capability_list_without_calling_the_registry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hive_worker import cli

    async def must_not_run(settings: WorkerSettings) -> None:
        raise AssertionError("the worker started")

    monkeypatch.setattr(cli, "_serve", must_not_run)
    monkeypatch.delenv("HIVE_WORKER_CAPABILITIES", raising=False)
    assert cli.main(["--capabilities", ""]) == 2
    assert "  --capabilities / HIVE_WORKER_CAPABILITIES: at least one capability is required" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (SystemExit(3), "SystemExit: 3"),
        (KeyboardInterrupt("stop"), "KeyboardInterrupt: stop"),
        # Raised by the handler itself (e.g. it awaited a future someone else cancelled),
        # not a cancel of the worker's: it was reported as the worker stopping, which uses
        # no retry, so the task ran again and again.
        (asyncio.CancelledError("not ours"), "CancelledError: not ours"),
        (asyncio.CancelledError(), "CancelledError"),  # no message: no "CancelledError: "
    ],
)
async def test_a_base_exception_a_handler_raises_is_a_retryable_failure(
    raised: BaseException, message: str
) -> None:
    # SystemExit / KeyboardInterrupt left the event loop and killed the whole worker.
    worker = Worker(settings=settings())

    @worker.task("raise")
    async def raise_it(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        raise raised

    assert await dispatch(worker, ticket("raise", {})) == Outcome.failure(message)
    # The worker goes on.
    assert await dispatch(worker, ticket("echo", {"a": 1})) == Outcome(
        completed=True, result={"a": 1}
    )


async def test_a_handler_the_worker_cancels_is_reported_as_the_worker_stopping() -> None:
    worker = Worker(settings=settings())
    gate = asyncio.Event()
    worker.add_task("hang", functools.partial(waiting, gate))
    run = _Run(ticket=ticket("hang", {}), worker_id="w-1", log=worker._log)
    invoked = asyncio.create_task(worker._invoke_handler(run))
    await asyncio.sleep(0)  # the handler task is made before the first await
    assert run.handler_task is not None
    await asyncio.sleep(0)
    run.interrupted = True  # what the end of a drain's grace does
    run.stop_handler()
    assert await invoked == Outcome.failure(
        "the worker stopped before the task finished", worker_lost=True
    )


async def waiting(gate: asyncio.Event, params: dict[str, Any], ctx: TaskContext) -> Any:
    await gate.wait()
    return {}


@pytest.mark.parametrize(
    ("attempt", "lost_runs", "max_retries", "last"),
    [(1, 0, 0, True), (1, 0, 1, False), (2, 0, 1, True), (2, 1, 1, False), (3, 1, 1, True)],
)
async def test_last_attempt_does_not_count_the_runs_the_worker_lost(
    attempt: int, lost_runs: int, max_retries: int, last: bool
) -> None:
    # Attempt 2 after a lost run said last_attempt, and the ticket service retried it.
    worker = Worker(settings=settings())
    seen: list[TaskContext] = []

    @worker.task("ctx")
    async def record(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        seen.append(ctx)
        return {}

    t = ticket("ctx", {})
    t.attempt, t.lost_runs, t.max_retries = attempt, lost_runs, max_retries
    await dispatch(worker, t)
    [ctx] = seen
    assert (ctx.lost_runs, ctx.last_attempt) == (lost_runs, last)


class Stubborn:
    """A handler that swallows cancellation until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        return {}


@pytest.mark.parametrize("stopped_by", ["timeout", "drain", "ticket moved on"])
async def test_a_handler_that_ignores_its_cancellation_is_left_behind_after_a_bound(
    stopped_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker waited for it without a bound: no report after a timeout, a slot never
    # freed after a plan cancel, a drain (and the process) that never ended.
    monkeypatch.setattr(sdk, "_HANDLER_STOP_SECONDS", 0.1)
    worker = Worker(settings=settings())
    stubborn = Stubborn()
    worker.add_task("stubborn", stubborn)
    run = _Run(
        ticket=ticket("stubborn", {}, timeout=1 if stopped_by == "timeout" else 60),
        worker_id="w-1",
        log=worker._log,
    )
    with capture_logs() as logs:
        invoked = asyncio.create_task(worker._invoke_handler(run))
        if stopped_by != "timeout":
            await asyncio.sleep(0)  # the handler task is made before the first await
            assert run.handler_task is not None
            await asyncio.sleep(0)
            run.interrupted = stopped_by == "drain"
            run.abandoned = stopped_by == "ticket moved on"
            run.stop_handler()
        outcome = await asyncio.wait_for(invoked, 5)
    expected = {
        "timeout": Outcome.failure("timed out: the task's timeout is 1s"),
        "drain": Outcome.failure("the worker stopped before the task finished", worker_lost=True),
        "ticket moved on": None,
    }[stopped_by]
    left_behind = worker.unstopped_handlers
    # Released before asserting: a failing test must not leave it running (the event
    # loop's teardown would wait for it for ever).
    stubborn.release.set()
    await asyncio.sleep(0.01)
    assert outcome == expected
    assert [e["log_level"] for e in logs if e["event"].startswith("handler did not stop")] == [
        "warning"
    ]
    assert left_behind == [f"{TICKET} attempt 1"]
    assert worker.unstopped_handlers == []


def test_the_command_exits_after_a_drain_even_if_a_handler_does_not_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A handler ignoring its cancellation (or a thread) kept the process alive after the
    # drain, with nothing logged, until a second signal.
    from hive_worker import cli

    stubborn = Stubborn()
    exits: list[int] = []
    loops: list[asyncio.AbstractEventLoop] = []

    class DrainedWorker:
        unstopped_handlers = ["t-1 attempt 1"]

        def __init__(self, settings: WorkerSettings) -> None:
            pass

        async def run(self) -> None:
            loops.append(asyncio.get_running_loop())
            ctx = TaskContext("t-1", "p", "t", "stubborn", 1, 0, 60.0, "w-1")
            asyncio.get_running_loop().create_task(stubborn({}, ctx))
            await asyncio.sleep(0)

    def exit_now(code: int) -> None:  # instead of os._exit: record it, let the loop end
        exits.append(code)
        loops[0].call_soon_threadsafe(stubborn.release.set)

    monkeypatch.setattr(cli, "Worker", DrainedWorker)
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(cli, "freeze_heap", lambda: None)
    monkeypatch.setattr(cli, "_EXIT_BOUND_SECONDS", 0.2)
    monkeypatch.setattr(os, "_exit", exit_now)
    returned: list[int] = []
    with capture_logs() as logs:
        main = threading.Thread(
            target=lambda: returned.append(cli.main(["--capabilities", "python"])), daemon=True
        )
        main.start()
        main.join(10)
    assert exits == [0]
    assert returned == [0]
    [warning] = [e for e in logs if e["event"].startswith("process still busy after the drain")]
    assert (warning["log_level"], warning["tickets"]) == ("warning", ["t-1 attempt 1"])


async def test_a_worker_refuses_a_second_run() -> None:
    # A second run() returned at once, doing nothing, with wait_ready() giving the old id.
    worker = Worker(settings=settings())
    worker.drain()  # drained before registering: the first run returns at once
    await asyncio.wait_for(worker.run(install_signal_handlers=False), 10)
    with pytest.raises(RuntimeError, match=r"already run .*create a new Worker"):
        await worker.run(install_signal_handlers=False)


def test_the_command_leaves_no_exit_timer_behind_when_it_ends_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bound on the process's ending was armed and never disarmed: a caller of main()
    # that went on (a test, a script) was ended by os._exit(0) a few seconds later.
    from hive_worker import cli

    exits: list[int] = []

    class QuickWorker:
        unstopped_handlers: list[str] = []

        def __init__(self, settings: WorkerSettings) -> None:
            pass

        async def run(self) -> None:
            await asyncio.sleep(0)

    monkeypatch.setattr(cli, "Worker", QuickWorker)
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setattr(cli, "freeze_heap", lambda: None)
    monkeypatch.setattr(cli, "_EXIT_BOUND_SECONDS", 0.2)
    monkeypatch.setattr(os, "_exit", exits.append)
    assert cli.main(["--capabilities", "python"]) == 0
    time.sleep(0.5)
    assert exits == []


async def test_an_aborted_report_is_sent_again_not_dropped() -> None:
    # ABORTED from the ticket service, to a worker (which names no expected_version), is a
    # change that lost to concurrent ones: "retry the request". The worker dropped a
    # finished task's outcome on it ("ticket moved on"), leaving the ticket RUNNING until
    # its timeout; a definite refusal still ends the report.
    worker = Worker(settings=settings(reconnect_max_backoff_seconds=0.1))
    run = _Run(ticket=ticket("echo", {}), worker_id="w-1", log=worker._log)
    answers: list[Exception | str] = [
        Aborted("concurrent update conflict; retry the request"),
        Aborted("concurrent update conflict; retry the request"),
        "reported",
    ]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await worker._until_definite(run, "report", call) == "reported"
    answers[:] = [FailedPrecondition("ticket is CANCELLED, a terminal status")]
    with pytest.raises(FailedPrecondition):
        await worker._until_definite(run, "report", call)
