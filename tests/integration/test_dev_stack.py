"""``make dev`` as a user runs it: ``scripts/dev-stack.py`` starts its own local databases,
the services and the workers; a plan from examples/ completes; Ctrl-C (SIGINT) stops every
process cleanly."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hive_cli.auth import resolve_credentials
from hive_common.localdb import (
    ephemeral_port_range,
    find_mongo_server,
    find_postgres_bin_dir,
    port_is_free,
    quiet_port,
)
from hive_testsupport.databases import unavailable_action
from hive_testsupport.scripts import load_script

from .conftest import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The dev stack's default ports, which --port-offset moves.
GRPC_PORTS = (50051, 50052, 50053)
HTTP_PORTS = (8001, 8002, 8003, 9092)


def free_offset() -> int:
    """A --port-offset whose seven service ports are free and, where the kernel's ephemeral
    range allows, all outside it (gRPC ports above it, HTTP ports below it)."""
    low, high = ephemeral_port_range()
    smallest = max(high + 1 - min(GRPC_PORTS), 1)
    largest = min(65_535 - max(GRPC_PORTS), low - 1 - max(HTTP_PORTS))
    offsets = range(smallest, largest + 1) if smallest <= largest else range(10_000, 15_000)
    for _ in range(200):
        offset = random.choice(offsets)
        if all(port_is_free(p + offset) for p in GRPC_PORTS + HTTP_PORTS):
            return offset
    pytest.fail("no free port range for the dev stack")


class DevStack:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.output = state_dir / "dev-stack.out"
        self.offset = free_offset()
        command = [
            sys.executable,
            str(REPO / "scripts" / "dev-stack.py"),
            "--state-dir",
            str(state_dir),
            "--port-offset",
            str(self.offset),
            "--postgres-port",
            str(quiet_port()),
            "--mongo-port",
            str(quiet_port()),
            "--log-format",
            "json",
        ]
        state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_DEV_")}
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"dev stack exited with {self.process.returncode}:\n{self.text()}")
            return '"dev stack ready"' in self.text()

        wait_for(ready, what="the dev stack to be ready", timeout=180)

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for line in (self.state_dir / "dev.env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0]
        return values


@pytest.fixture
def dev_stack() -> Iterator[DevStack]:
    if find_postgres_bin_dir() is None or find_mongo_server() is None:
        message = "make dev needs local PostgreSQL and MongoDB-compatible server binaries"
        if unavailable_action(os.environ) == "fail":
            pytest.fail(message)
        pytest.skip(message)
    # Not pytest's tmp_path: its 0700 parents would keep PostgreSQL's unprivileged OS user
    # (when the tests run as root) out of the data directory.
    state_dir = Path(tempfile.mkdtemp(prefix="hive-dev-stack-"))
    state_dir.chmod(0o755)
    stack = DevStack(state_dir)
    try:
        yield stack
    finally:
        if stack.process.poll() is None:
            stack.process.send_signal(signal.SIGINT)
            try:
                stack.process.wait(90)
            except subprocess.TimeoutExpired:
                stack.process.kill()
                stack.process.wait(10)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_how_a_process_ended_names_the_signal_that_killed_it() -> None:
    how_it_ended = load_script("dev-stack.py").how_it_ended
    assert how_it_ended(1) == "exited with code 1"
    assert how_it_ended(-9) == "was killed by SIGKILL"  # was "exited with code -9"
    assert how_it_ended(-15) == "was killed by SIGTERM"


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        ([], {"HIVE_DEV_PORT_OFFSET": "abc"}, "HIVE_DEV_PORT_OFFSET must be an integer, not 'abc'"),
        (["--port-offset", "-60000"], {}, "ports outside 1-65535: registry_grpc -9949"),
        (["--mongo-port", "70000"], {}, "ports outside 1-65535: mongo 70000 (check"),
    ],
)
def test_bad_ports_are_usage_errors(
    tmp_path: Path, args: list[str], env: dict[str, str], error: str
) -> None:
    # They were tracebacks (int() of the variable; bind() of a port beyond 65535).
    script = str(REPO / "scripts" / "dev-stack.py")
    done = subprocess.run(
        [sys.executable, script, "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"dev-stack: error: {error}" in done.stderr


def test_a_second_make_dev_on_the_same_state_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    # It used to start a second PostgreSQL on the same data directory, fail, and print the
    # first run's database logs, ending in "lock file postmaster.pid already exists".
    fd = os.open(tmp_path / "dev-stack.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "dev-stack.py"), "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {tmp_path} is in use by another `make dev` (pid 4242). Stop it (Ctrl-C), "
        "or give this one its own --state-dir (and --port-offset)."
    ]


def test_make_dev_runs_an_example_plan_and_ctrl_c_stops_everything_cleanly(
    dev_stack: DevStack,
) -> None:
    dev_stack.wait_ready()
    out = dev_stack.text()
    orchestrator = f"http://127.0.0.1:{8003 + dev_stack.offset}"
    assert orchestrator in out
    assert "examples/diamond.json" in out
    env = dev_stack.env()
    assert env["HIVE_ORCHESTRATOR_URL"] == orchestrator
    # Sourced in the shell that runs `make dev` next, it must change nothing there (the
    # database URLs it held made the next run use this run's stopped servers).
    assert not [key for key in env if key.startswith("HIVE_DEV_")]
    logs = sorted(p.name for p in (dev_stack.state_dir / "logs").iterdir())
    assert logs == [
        "databases.log",
        "execution-ticket-service.log",
        "orchestrator-dynamic.log",
        "service-registry.log",
        "worker-1.log",
        "worker-2.log",
    ]

    with httpx.Client(timeout=10, trust_env=False) as http:
        plan = json.loads((REPO / "examples" / "diamond.json").read_text())
        submitted = http.post(f"{orchestrator}/api/v1/plans", json=plan)
        assert submitted.status_code == 202, submitted.text
        plan_id = submitted.json()["plan_id"]

        def completed() -> dict[str, object] | None:
            body: dict[str, object] = http.get(f"{orchestrator}/api/v1/plans/{plan_id}").json()
            return body if body["status"] in {"COMPLETED", "FAILED", "CANCELLED"} else None

        assert wait_for(completed, what="the example plan")["status"] == "COMPLETED"
        tickets = http.get(
            f"{env['HIVE_TICKETS_URL']}/api/v1/tickets",
            params={"plan_id": plan_id},
            headers={"Authorization": f"Bearer {env['HIVE_SERVICE_TOKEN']}"},
        )
        assert tickets.status_code == 200, tickets.text
        assert [t["status"] for t in tickets.json()["tickets"]] == ["COMPLETED"] * 4
        workers = http.get(
            f"{env['HIVE_REGISTRY_URL']}/api/v1/workers",
            headers={"Authorization": f"Bearer {env['HIVE_SERVICE_TOKEN']}"},
        )
        assert sorted(w["name"] for w in workers.json()["workers"]) == ["worker-1", "worker-2"]
        # The CLI signs its own tokens with the secret in the file (no token to expire).
        minted = resolve_credentials(token=None, api_token=None, env=env).service()()
        again = http.get(
            f"{env['HIVE_REGISTRY_URL']}/api/v1/workers",
            headers={"Authorization": f"Bearer {minted}"},
        )
        assert again.status_code == 200, again.text

    # What Ctrl-C sends, forwarded again by `uv run`, then an impatient second Ctrl-C and a
    # supervisor's SIGTERM: a burst of signals must still stop everything cleanly (a lock
    # taken in the signal handler once deadlocked the script on the second one).
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        dev_stack.process.send_signal(sig)
    began = time.monotonic()
    while dev_stack.process.poll() is None:
        assert time.monotonic() - began < 120, "the dev stack did not stop"
        time.sleep(0.2)
    out = dev_stack.text()
    assert "did not exit cleanly" not in out, out[-2000:]
    assert dev_stack.process.returncode == 0, out[-2000:]
    assert out.rstrip().endswith("stopped")
