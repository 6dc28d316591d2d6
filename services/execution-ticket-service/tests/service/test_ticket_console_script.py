"""The console script, configured from the environment, serves and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess

import httpx
import pytest

from hive_common.localdb import free_port

pytestmark = pytest.mark.service


async def test_console_script_serves_and_stops_on_sigterm(
    postgres_dsn: str, mongo_uri: str, mongo_database_name: str
) -> None:
    executable = shutil.which("execution-ticket-service")
    assert executable is not None, "the console script is not installed"
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "HIVE_TICKETS_HOST": "127.0.0.1",
        "HIVE_TICKETS_GRPC_PORT": str(grpc_port),
        "HIVE_TICKETS_HTTP_PORT": str(http_port),
        "HIVE_TICKETS_METRICS_PORT": str(metrics_port),
        "HIVE_TICKETS_POSTGRES_DSN": postgres_dsn,
        "HIVE_TICKETS_MONGO_URI": mongo_uri,
        "HIVE_TICKETS_MONGO_DATABASE": mongo_database_name,
        "HIVE_TICKETS_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        executable,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while True:
                assert process.returncode is None, "the service exited during start-up"
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert loop.time() < end, "the service never became ready"
                await asyncio.sleep(0.2)
            metrics = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert "hive_ticket_outbox_pending" in metrics.text
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, output.decode()
        assert b"development" in output.lower() or b"insecure" in output.lower()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("dsn", "password", "reason"),
    [
        ("garbage", "garbage", 'missing "=" after "***" in connection info string'),
        # A raw '%' in the password of a URL (libpq quotes the token it could not decode).
        ("postgresql://postgres:p%ss@db/tickets", "p%ss", 'invalid percent-encoded token: "***"'),
        (
            "postgresql://postgres:pg-secret@db/tickets?bogus_option=1",
            "pg-secret",
            'invalid URI query parameter: "***"',
        ),
    ],
)
def test_a_malformed_postgres_dsn_exits_2_with_one_line_and_never_the_password(
    dsn: str, password: str, reason: str
) -> None:
    # It was a traceback (psycopg.ProgrammingError, exit 1) quoting part of the DSN.
    executable = shutil.which("execution-ticket-service")
    assert executable is not None, "the console script is not installed"
    env = {name: value for name, value in os.environ.items() if not name.startswith("HIVE_")}
    env["HIVE_TICKETS_POSTGRES_DSN"] = dsn
    run = subprocess.run(
        [executable], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "execution-ticket-service: invalid settings:",
        f"  HIVE_TICKETS_POSTGRES_DSN: not a PostgreSQL connection string: {reason}",
    ]
    assert password not in run.stderr
