"""What the worker says when the registry refuses it, which heartbeat interval it keeps
and how often it heartbeats, when it renews its worker token, how it waits for a name
another process holds, and that a stop interrupts registration (no service involved: the
registry client is a fake that answers Register, and Heartbeat where needed)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from hive_common.clients import RegistryClient
from hive_common.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    describe_error,
)
from hive_worker import Worker, WorkerSettings, sdk
from neuralhive.registry.v1 import registry_service_pb2 as rpb

CAPABILITY_RULE = (
    "must be 1-64 characters: letters, digits and . _ : / + - (starting with a letter or digit)"
)


class FakeRegistry:
    """Answers every Register with ``answer``: a response, or an error to raise."""

    def __init__(self, answer: rpb.RegisterResponse | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def register(self, **kwargs: Any) -> rpb.RegisterResponse:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def worker_with(registry: FakeRegistry, **settings: Any) -> Worker:
    worker = Worker(
        settings=WorkerSettings(**({"name": "unit", "capabilities": ["python"]} | settings))
    )
    worker._registry = registry  # type: ignore[assignment]
    return worker


def registered(interval: int) -> rpb.RegisterResponse:
    return rpb.RegisterResponse(
        worker=rpb.Worker(worker_id="w-1"), token="t", heartbeat_interval_seconds=interval
    )


async def test_an_invalid_registration_is_logged_with_every_field_violation() -> None:
    refusal = InvalidArgument(
        "invalid registration",
        violations=[
            FieldViolation("capabilities[0]", CAPABILITY_RULE),
            FieldViolation("namespace", "must be a DNS label"),
        ],
    )
    worker = worker_with(FakeRegistry(refusal))
    with capture_logs() as logs, pytest.raises(InvalidArgument):
        await worker._register_until_done()
    [line] = [entry for entry in logs if entry["event"] == "registration refused"]
    assert line["log_level"] == "error"
    assert line["error"] == (
        f"InvalidArgument: invalid registration (capabilities[0]: {CAPABILITY_RULE}; "
        "namespace: must be a DNS label)"
    )
    # Not a credentials problem: no hint about the secrets.
    assert "SECRET" not in line["hint"]
    assert describe_error(refusal) == line["error"]  # also the "worker stopped" line


async def test_only_a_credentials_refusal_points_at_the_secrets() -> None:
    worker = worker_with(FakeRegistry(Unauthenticated("invalid registration credential")))
    with capture_logs() as logs, pytest.raises(Unauthenticated):
        await worker._register_until_done()
    [line] = [entry for entry in logs if entry["event"] == "registration refused"]
    assert line["error"] == "Unauthenticated: invalid registration credential"
    assert "HIVE_WORKER_REGISTRATION_SECRET" in line["hint"]


@pytest.mark.parametrize(
    ("configured", "registry", "used", "warned"),
    [
        (None, 5, 5.0, False),  # unset: the registry's
        (0.5, 5, 0.5, False),  # more often than asked: kept
        (5.0, 5, 5.0, False),
        (20.0, 5, 5.0, True),  # would miss heartbeats: the registry's, with a warning
    ],
)
async def test_the_heartbeat_interval_is_never_longer_than_the_registry_asks(
    configured: float | None, registry: int, used: float, warned: bool
) -> None:
    worker = worker_with(FakeRegistry(registered(registry)), heartbeat_interval_seconds=configured)
    with capture_logs() as logs:
        await worker._register()
        await worker._register()  # registering again does not repeat the warning
    assert worker._interval == used
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    if not warned:
        assert warnings == []
        return
    [warning] = warnings
    assert warning["event"].startswith("heartbeat interval longer than the registry asks for")
    assert (warning["configured_seconds"], warning["registry_seconds"]) == (20.0, 5)
    assert "HIVE_WORKER_HEARTBEAT_INTERVAL_SECONDS" in warning["hint"]
    assert "at most 5" in warning["hint"]


# -- heartbeats and the worker token ---------------------------------------------------------


class HeartbeatRegistry:
    """Answers Register with ``answer`` and Heartbeat after ``delay`` seconds, recording
    when each heartbeat started (event loop time)."""

    def __init__(self, answer: rpb.RegisterResponse, *, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.registrations = 0
        self.beats: list[float] = []

    async def register(self, **kwargs: Any) -> rpb.RegisterResponse:
        self.registrations += 1
        return self.answer

    async def heartbeat(self, **kwargs: Any) -> rpb.HeartbeatResponse:
        self.beats.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.delay)
        return rpb.HeartbeatResponse()

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.beats)]


async def heartbeat_for(worker: Worker, seconds: float) -> None:
    """Run the worker's heartbeat loop for ``seconds``."""
    beating = asyncio.create_task(worker._heartbeat_loop())
    await asyncio.sleep(seconds)
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)


async def test_heartbeats_start_one_interval_apart() -> None:
    # A pause after each heartbeat (0.5 s, or the interval if shorter, meant to rate-limit
    # load reports) was added to the interval: with one missed beat allowed, the registry
    # listed an idle worker UNHEALTHY a third of the time. The call's own time counts too.
    registry = HeartbeatRegistry(registered(5), delay=0.1)
    worker = worker_with(registry, heartbeat_interval_seconds=0.3)  # type: ignore[arg-type]
    await worker._register()
    await heartbeat_for(worker, 1.05)  # beats at 0, 0.3, 0.6, 0.9
    gaps = registry.gaps()
    assert len(gaps) >= 2, gaps
    assert all(0.27 <= gap <= 0.4 for gap in gaps), gaps


async def test_load_changes_bring_heartbeats_early_but_at_most_one_per_gap() -> None:
    registry = HeartbeatRegistry(registered(5))
    worker = worker_with(registry)  # type: ignore[arg-type]
    await worker._register()
    beating = asyncio.create_task(worker._heartbeat_loop())
    for _ in range(24):  # a load change every 0.05 s, for 1.2 s
        worker._heartbeat_wake.set()
        await asyncio.sleep(0.05)
    beating.cancel()
    await asyncio.gather(beating, return_exceptions=True)
    gaps = registry.gaps()  # beats at 0, 0.5, 1.0 (the interval is 5 s)
    assert gaps
    assert all(sdk._LOAD_REPORT_GAP - 0.01 <= gap <= sdk._LOAD_REPORT_GAP + 0.1 for gap in gaps)


def registered_with_token(
    ttl: int, *, interval: int = 5, registry_clock_ahead: float = 0.0
) -> rpb.RegisterResponse:
    """A registration whose worker token lasts ``ttl`` seconds from now (on a registry
    clock ``registry_clock_ahead`` seconds ahead of this host's)."""
    response = registered(interval)
    issued_at = datetime.now(UTC) + timedelta(seconds=registry_clock_ahead)
    response.worker.last_heartbeat_at.FromDatetime(issued_at)
    response.token_expires_at.FromDatetime(issued_at + timedelta(seconds=ttl))
    return response


@pytest.mark.parametrize(("ttl", "interval"), [(60, 5), (60, 1), (90, 30), (120, 5), (3600, 5)])
async def test_the_worker_token_is_renewed_once_before_it_expires_not_on_every_heartbeat(
    ttl: int, interval: int
) -> None:
    # The renewal margin (60 s, or 3 intervals) was the whole life of a token of the
    # registry's minimum TTL (60 s): each heartbeat registered again (~2 a second), and
    # each registration reset the worker's in_flight at the registry.
    registry = HeartbeatRegistry(registered_with_token(ttl, interval=interval))
    worker = worker_with(registry)  # type: ignore[arg-type]
    await worker._register()
    for _ in range(3):
        await worker._heartbeat_once()
    assert registry.registrations == 1  # a fresh token is not renewed
    received = worker._token_received_at
    renewed_at: list[int] = []
    for age in range(0, ttl, interval):  # a heartbeat every interval of the token's life
        worker._token_received_at = received - age  # as if ``age`` seconds had passed
        await worker._heartbeat_once()
        if registry.registrations > 1:
            renewed_at.append(age)
            break
    [age] = renewed_at
    assert ttl / 2 <= age <= ttl - interval  # not early, and with a heartbeat to spare
    for _ in range(3):  # the new token is fresh
        await worker._heartbeat_once()
    assert registry.registrations == 2
    assert len(registry.beats) == 3 + len(range(0, age + 1, interval)) + 3


@pytest.mark.parametrize("registry_clock_ahead", [-7200.0, 7200.0])
async def test_a_fresh_worker_token_is_not_renewed_whatever_the_registry_clock_says(
    registry_clock_ahead: float,
) -> None:
    registry = HeartbeatRegistry(
        registered_with_token(3600, registry_clock_ahead=registry_clock_ahead)
    )
    worker = worker_with(registry)  # type: ignore[arg-type]
    await worker._register()
    for _ in range(3):
        await worker._heartbeat_once()
    assert (registry.registrations, len(registry.beats)) == (1, 3)


# -- one live process per name ---------------------------------------------------------------


def name_in_use(retry_after: float = 0.0, window: float = 15.0) -> AlreadyExists:
    """The registry's refusal of a name another live process holds (details as decoded)."""
    return AlreadyExists(
        "worker name 'unit' is held by a running instance (last heartbeat 0.4 s ago): give "
        "this worker another name (--name), or stop the other one",
        details={
            "reason": "WORKER_NAME_IN_USE",
            "name": "unit",
            "retry_after_seconds": str(retry_after),
            "unhealthy_after_seconds": str(window),
        },
    )


class ScriptedRegistry:
    """Answers each Register with the next answer (the last one repeats); records calls."""

    def __init__(self, *answers: rpb.RegisterResponse | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []
        self.called = asyncio.Event()

    async def register(self, **kwargs: Any) -> rpb.RegisterResponse:
        self.calls.append(kwargs)
        self.called.set()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_every_registration_of_a_process_sends_its_instance_id() -> None:
    registry = ScriptedRegistry(registered(5))
    worker = worker_with(registry)  # type: ignore[arg-type]
    other = worker_with(registry)  # type: ignore[arg-type]
    await worker._register()
    await worker._register()  # e.g. after NOT_FOUND or token expiry: the same process
    await other._register()
    ids = [call["instance_id"] for call in registry.calls]
    assert ids == [worker.instance_id, worker.instance_id, other.instance_id]
    assert worker.instance_id != other.instance_id


class RecordingChannel:
    """A channel whose unary calls record their request and answer ``registered(5)``."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def unary_unary(self, path: str, **kwargs: Any) -> Any:
        async def call(request: Any, **kwargs: Any) -> Any:
            self.requests.append(request)
            return registered(5)

        return call

    def unary_stream(self, path: str, **kwargs: Any) -> Any:
        return None


async def test_the_registry_client_puts_the_instance_id_in_the_request() -> None:
    channel = RecordingChannel()
    client = RegistryClient(channel=channel)  # type: ignore[arg-type]
    await client.register(
        name="unit", capabilities=["python"], max_concurrent=2, instance_id="proc-a", token="s"
    )
    [request] = channel.requests
    assert (request.name, request.instance_id, list(request.capabilities)) == (
        "unit",
        "proc-a",
        ["python"],
    )


async def test_a_name_held_by_a_live_process_is_waited_for_then_taken_over() -> None:
    # A restart after a crash: the dead process's registration lapses after the window.
    registry = ScriptedRegistry(name_in_use(0.1), name_in_use(0.05), registered(5))
    worker = worker_with(registry)  # type: ignore[arg-type]
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            assert await worker._register_until_done()
    assert worker.worker_id == "w-1"
    assert len(registry.calls) == 3
    [waiting] = [entry for entry in logs if entry["event"].startswith("worker name held")]
    assert waiting["log_level"] == "info"
    assert waiting["name"] == "unit"
    assert "--name" in waiting["error"]
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []


async def test_a_process_whose_name_was_taken_over_stops() -> None:
    # Paused past the unhealthy window, it woke up to find its id gone and its name held
    # by the process that took it over: it retried every heartbeat for ever, a zombie.
    registry = ScriptedRegistry(name_in_use())
    worker = worker_with(registry)  # type: ignore[arg-type]
    worker._worker_id = "w-old"

    class GoneHeartbeats:
        async def heartbeat(self, **kwargs: Any) -> Any:
            raise NotFound("worker w-old not found")

    registry.heartbeat = GoneHeartbeats().heartbeat  # type: ignore[attr-defined]
    with capture_logs() as logs, pytest.raises(AlreadyExists):
        await worker._heartbeat_once()
    [line] = [e for e in logs if e["event"].startswith("worker name taken over")]
    assert line["log_level"] == "error"


async def test_a_name_still_held_after_the_window_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sdk, "_NAME_WAIT_MARGIN", 0.0)
    registry = ScriptedRegistry(name_in_use(0.2, window=0.6))
    worker = worker_with(registry)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs, pytest.raises(AlreadyExists):
        async with asyncio.timeout(5):
            await worker._register_until_done()
    assert loop.time() - started >= 0.6
    assert len(registry.calls) >= 2
    [refused] = [entry for entry in logs if entry["event"] == "registration refused"]
    assert refused["log_level"] == "error"
    assert "worker name 'unit' is held by a running instance" in refused["error"]
    assert "--name" in refused["hint"]


class HangingRegistry:
    """Register never answers: a call waiting out its deadline (registry unreachable)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def register(self, **kwargs: Any) -> rpb.RegisterResponse:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


async def test_a_drain_interrupts_a_registration_in_flight() -> None:
    registry = HangingRegistry()
    worker = worker_with(registry)  # type: ignore[arg-type]
    task = asyncio.create_task(worker._register_until_done())
    await asyncio.wait_for(registry.started.wait(), 5)
    worker.drain()  # what SIGTERM does
    async with asyncio.timeout(1):
        assert await task is False
    assert registry.cancelled
    assert worker.worker_id is None


@pytest.mark.parametrize("refusal", [Unavailable("registry down"), name_in_use(10.0)])
async def test_a_drain_ends_the_wait_between_registration_attempts(refusal: Exception) -> None:
    registry = ScriptedRegistry(refusal)
    worker = worker_with(registry)  # type: ignore[arg-type]
    task = asyncio.create_task(worker._register_until_done())
    await asyncio.wait_for(registry.called.wait(), 5)
    worker.drain()
    async with asyncio.timeout(1):
        assert await task is False


# -- an unreachable registry -------------------------------------------------------------------


async def test_an_unreachable_registry_is_a_rate_limited_warning_naming_it() -> None:
    # It used to be INFO lines of the retry helper only ("retrying call",
    # function=UnaryInvoker.__call__.<locals>.retry): silent at LOG_LEVEL=WARNING.
    down = Unavailable("failed to connect to all addresses")
    registry = ScriptedRegistry(down, down, down, down, registered(5))
    worker = worker_with(
        registry,  # type: ignore[arg-type]
        registry_target="127.0.0.1:50999",
        reconnect_max_backoff_seconds=0.1,
    )
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            assert await worker._register_until_done()
    assert len(registry.calls) == 5
    # The first failure, then none within the next 30 s.
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["event"] == "registry 127.0.0.1:50999 unreachable; retrying"
    assert warning["attempt"] == 1
    assert warning["error"] == "Unavailable: failed to connect to all addresses"
    assert "function" not in warning


async def test_unreachable_registry_warnings_repeat_after_the_gap_with_the_attempt_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sdk, "_UNREACHABLE_WARNING_GAP", 0.0)
    down = Unavailable("registry down")
    registry = ScriptedRegistry(down, down, down, registered(5))
    worker = worker_with(registry, reconnect_max_backoff_seconds=0.1)  # type: ignore[arg-type]
    with capture_logs() as logs:
        async with asyncio.timeout(5):
            assert await worker._register_until_done()
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["attempt"] for entry in warnings] == [1, 2, 3]


async def test_run_warns_once_when_no_registration_secret_is_set() -> None:
    # Only the hive-worker command used to say so; an SDK worker was refused silently.
    worker = worker_with(FakeRegistry(Unauthenticated("invalid registration credential")))
    assert worker.settings.registration_secret is None
    with capture_logs() as logs, pytest.raises(Unauthenticated):
        await worker.run(install_signal_handlers=False)
    [warning] = [entry for entry in logs if entry["event"] == "no registration secret"]
    assert warning["log_level"] == "warning"
    assert "HIVE_WORKER_REGISTRATION_SECRET" in warning["detail"]

    with_secret = worker_with(
        FakeRegistry(Unauthenticated("invalid registration credential")),
        registration_secret="join",
    )
    with capture_logs() as logs, pytest.raises(Unauthenticated):
        await with_secret.run(install_signal_handlers=False)
    assert [entry for entry in logs if entry["event"] == "no registration secret"] == []
