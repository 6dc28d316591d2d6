"""run_service: what an operator sees when a service cannot start (no traceback, no secret)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from hive_common.config import HiveSettings
from hive_common.entrypoint import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID_SETTINGS,
    run_service,
)
from hive_common.errors import Unavailable
from hive_common.http import create_http_app
from hive_common.metrics import new_registry
from hive_common.runtime import ServerStoppedUnexpectedly, ServiceRuntime

SECRET = "short-but-secret"


class DemoSettings(HiveSettings):
    model_config = SettingsConfigDict(env_prefix="HIVE_DEMO_")

    service_name: str = "demo"
    log_format: Any = "json"
    workers: list[int] = Field(default_factory=list)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HIVE_DEMO_GRPC_PORT", "HIVE_DEMO_JWT_SECRET", "HIVE_DEMO_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HIVE_DEMO_JWT_SECRET", "y" * 40)


def _log_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def _never(settings: DemoSettings, logger: Any) -> None:
    raise AssertionError("must not be reached")


def test_invalid_settings_name_each_variable_and_never_echo_a_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HIVE_DEMO_GRPC_PORT", "abc")
    monkeypatch.setenv("HIVE_DEMO_JWT_SECRET", SECRET)
    monkeypatch.setenv("HIVE_DEMO_WORKERS", '[1, "x"]')

    assert run_service(DemoSettings, _never, program="demo") == EXIT_INVALID_SETTINGS

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "demo: invalid settings:",
        "  HIVE_DEMO_GRPC_PORT: Input should be a valid integer, unable to parse string as "
        "an integer",
        "  HIVE_DEMO_JWT_SECRET: must be at least 32 bytes for HS256",
        "  HIVE_DEMO_WORKERS[1]: Input should be a valid integer, unable to parse string as "
        "an integer",
    ]
    assert SECRET not in err


@pytest.mark.parametrize(
    ("failure", "shown"),
    [
        (
            Unavailable("postgresql not available after 1s (4 attempts)"),
            "Unavailable: postgresql not available after 1s (4 attempts)",
        ),
        (
            ServerStoppedUnexpectedly("a server of this service stopped unexpectedly"),
            "ServerStoppedUnexpectedly: a server of this service stopped unexpectedly",
        ),
    ],
)
def test_a_failure_to_start_or_to_keep_serving_is_one_error_line(
    failure: Exception, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def serve(settings: DemoSettings, logger: Any) -> None:
        raise failure

    assert run_service(DemoSettings, serve, program="demo-service") == EXIT_FAILED

    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    [line] = [x for x in _log_lines(out) if x["level"] == "error"]
    assert line["event"] == "service failed"
    assert line["logger"] == "demo_service"
    assert line["error"] == shown


@pytest.mark.parametrize("listener", ["http", "metrics"])
def test_a_port_in_use_names_the_listener_and_the_address(
    capsys: pytest.CaptureFixture[str], listener: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        async def serve(settings: DemoSettings, logger: Any) -> None:
            runtime = ServiceRuntime(
                http_app=create_http_app(title="demo", version="1"),
                host="127.0.0.1",
                http_port=busy if listener == "http" else 0,
                metrics_registry=new_registry(),
                metrics_port=busy if listener == "metrics" else 0,
            )
            await runtime.run_until_signal()

        assert run_service(DemoSettings, serve, program="demo") == EXIT_FAILED

    out, _ = capsys.readouterr()
    # One error line: the HTTP server started before the metrics one failed is stopped
    # without uvicorn's "Cancel 0 running task(s), timeout graceful shutdown exceeded".
    [line] = [x for x in _log_lines(out) if x["level"] == "error"]
    assert line["error"] == (
        f"OSError: [Errno 98] could not bind the {listener} listener to 127.0.0.1:{busy}: "
        "Address already in use"
    )


def test_ctrl_c_before_the_service_is_up_exits_130_quietly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def serve(settings: DemoSettings, logger: Any) -> None:
        raise KeyboardInterrupt

    assert run_service(DemoSettings, serve, program="demo") == EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err


def test_a_service_console_script_with_an_invalid_setting_exits_2_without_a_traceback() -> None:
    env = {"PATH": "/usr/bin:/bin", "HIVE_TICKETS_GRPC_PORT": "70000"}
    done = subprocess.run(
        [sys.executable, "-m", "execution_ticket_service"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_INVALID_SETTINGS
    assert done.stderr.splitlines() == [
        "execution-ticket-service: invalid settings:",
        "  HIVE_TICKETS_GRPC_PORT: Input should be less than or equal to 65535",
    ]
