"""What the worker says when the registry refuses it, and which heartbeat interval it
keeps (no service involved: the registry client is a fake that answers Register)."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from hive_common.errors import FieldViolation, InvalidArgument, Unauthenticated
from hive_worker import Worker, WorkerSettings
from hive_worker.sdk import describe_error
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
