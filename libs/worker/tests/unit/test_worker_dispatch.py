"""The handler registry, the public decorator API, settings/CLI parsing and how one
attempt's outcome is decided (no service involved: the dispatch runs without I/O)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from google.protobuf import struct_pb2

from hive_worker import (
    InvalidParameters,
    PermanentTaskError,
    TaskContext,
    TaskError,
    TaskRegistry,
    Worker,
    WorkerSettings,
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
    for bad in ["", " x", "a b", "-lead", "x" * 129]:
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
    assert timed_out.error_message.startswith("timed out after 0.9s")


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
        worker.task("upper")(upper)  # type: ignore[arg-type]
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


@pytest.mark.parametrize(
    "values",
    [
        {"max_concurrent": 0},
        {"labels": "novalue"},
        {"capabilities": ["a", " "]},
        {"log_level": "LOUD"},
        {"name": ""},
    ],
)
def test_bad_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        WorkerSettings(**({"capabilities": ["python"]} | values))


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
