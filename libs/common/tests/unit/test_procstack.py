"""hive_common.procstack with tiny Python child processes (loopback only, a few seconds)."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hive_common.localdb import free_port
from hive_common.procstack import (
    ManagedProcess,
    ProcessExited,
    ProcessSpec,
    ProcessStack,
    ReadyTimeout,
    http_ready,
    log_ready,
    logged_errors,
)


def python(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


# Serves 503 on /ready for `delay` seconds, then 200; exits 0 on SIGTERM after a line.
HTTP_SERVER = """
import http.server, os, signal, sys, threading, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
began = time.monotonic()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/ready" and time.monotonic() - began >= delay
        self.send_response(200 if ok else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
def on_term(*_):
    print("got SIGTERM, draining", flush=True)
    threading.Thread(target=server.shutdown).start()
signal.signal(signal.SIGTERM, on_term)
print(f"serving on {port} pid {os.getpid()}", flush=True)
server.serve_forever()
print("drained", flush=True)
"""

IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("stubborn", flush=True)
while True:
    time.sleep(1)
"""


def http_spec(name: str, *, delay: float = 0.0, **kwargs: object) -> tuple[ProcessSpec, int]:
    port = free_port()
    spec = ProcessSpec(
        name=name,
        argv=[*python(HTTP_SERVER), str(port), str(delay)],
        ready=http_ready(f"http://127.0.0.1:{port}/ready"),
        **kwargs,  # type: ignore[arg-type]
    )
    return spec, port


def test_start_waits_for_http_ready_and_stop_sends_sigterm(tmp_path: Path) -> None:
    spec, _ = http_spec("web", delay=0.5)
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    assert process.is_running
    assert not process.is_ready()  # 503 during the delay
    process.wait_ready(timeout=20)
    assert process.is_ready()

    assert process.stop(grace=10) == 0
    assert not process.is_running
    log = (tmp_path / "web.log").read_text()
    assert "starting web" in log
    assert "got SIGTERM, draining" in log
    assert "drained" in log


def test_stop_kills_after_the_grace_period(tmp_path: Path) -> None:
    spec = ProcessSpec(name="stubborn", argv=python(IGNORES_SIGTERM), ready=log_ready("stubborn"))
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    process.wait_ready(timeout=20)
    assert process.stop(grace=0.3) == -signal.SIGKILL
    assert not process.is_running


def test_kill_is_sigkill_and_takes_the_process_group(tmp_path: Path) -> None:
    # The child starts a grandchild in the same group and prints its pid.
    code = """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"grandchild {child.pid}", flush=True)
    time.sleep(60)
    """
    spec = ProcessSpec(name="parent", argv=python(code), ready=log_ready(r"grandchild \d+"))
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    process.wait_ready(timeout=20)
    grandchild = int(process.log_since_start().split("grandchild ")[1].split()[0])

    assert process.kill() == -signal.SIGKILL
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and _state(grandchild) != "Z":
        assert time.monotonic() < deadline, "the grandchild survived the group kill"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_process_that_exits_before_ready_raises_with_its_log(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="broken",
        argv=python("import sys; print('bad config: HIVE_X', flush=True); sys.exit(3)"),
        ready=log_ready("never"),
    )
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    with pytest.raises(ProcessExited, match=r"(?s)code 3.*bad config: HIVE_X"):
        process.wait_ready(timeout=20)
    assert process.returncode == 3


def test_ready_timeout(tmp_path: Path) -> None:
    spec, _ = http_spec("slow", delay=3600)
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    try:
        with pytest.raises(ReadyTimeout, match="slow was not ready"):
            process.wait_ready(timeout=1.0)
        assert process.is_running
    finally:
        process.stop(grace=5)


def test_restart_appends_to_the_log_and_readiness_only_reads_the_new_run(tmp_path: Path) -> None:
    code = """
    import os, time
    print(f"up {os.getpid()}", flush=True)
    time.sleep(60)
    """
    spec = ProcessSpec(name="svc", argv=python(code), ready=log_ready(r"up \d+"), stop_grace=5)
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    process.wait_ready(timeout=20)
    first_pid = process.pid
    process.restart()
    assert process.pid != first_pid
    assert process.starts == 2
    assert f"up {process.pid}" in process.log_since_start()
    assert f"up {first_pid}" not in process.log_since_start()
    log = (tmp_path / "svc.log").read_text()
    assert log.count("starting svc") == 2
    process.stop()


def test_env_reaches_the_child(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="env",
        argv=python("import os; print('value=' + os.environ['HIVE_PROCSTACK_TEST'], flush=True)"),
        env={"HIVE_PROCSTACK_TEST": "42"},
    )
    process = ManagedProcess(spec, log_dir=tmp_path)
    process.start()
    deadline = time.monotonic() + 20
    while process.is_running:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.returncode == 0
    assert "value=42" in process.log_since_start()


def test_stack_starts_all_stops_by_tier_and_reports_exits(tmp_path: Path) -> None:
    # Each process records, at SIGTERM, whether the lower-tier server is still up.
    server, port = http_spec("server", tier=0, stop_grace=5)
    client_code = f"""
    import signal, sys, time, urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    def up():
        try:
            return opener.open("http://127.0.0.1:{port}/ready", timeout=1).status
        except Exception as exc:
            return repr(exc)
    def on_term(*_):
        print(f"server at SIGTERM: {{up()}}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("client up", flush=True)
    while True:
        time.sleep(0.1)
    """
    client = ProcessSpec(
        name="client", argv=python(client_code), ready=log_ready("client up"), tier=1
    )
    with ProcessStack([server, client], log_dir=tmp_path) as stack:
        stack.start_all(timeout=30)
        assert all(p.is_ready() for p in stack)
        assert stack.exited() == []
        stack["client"].kill()
        assert [p.name for p in stack.exited()] == ["client"]
        stack["client"].start()
        stack.wait_ready(["client"], timeout=20)
    assert sorted(p.name for p in stack.exited()) == ["client", "server"]
    assert stack["server"].returncode == 0  # drained on SIGTERM, not killed
    assert "server at SIGTERM: 200" in (tmp_path / "client.log").read_text()


def test_stack_start_failure_stops_the_others(tmp_path: Path) -> None:
    server, _ = http_spec("server")
    broken = ProcessSpec(name="broken", argv=python("raise SystemExit(2)"), ready=log_ready("x"))
    stack = ProcessStack([server, broken], log_dir=tmp_path)
    with pytest.raises(ProcessExited, match="broken exited with code 2"):
        stack.start_all(timeout=30)
    assert not stack["server"].is_running


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="simple file name"):
        ProcessSpec(name="../x", argv=["true"])
    with pytest.raises(ValueError, match="needs a command"):
        ProcessSpec(name="x", argv=[])
    with pytest.raises(ValueError, match="duplicate"):
        ProcessStack([ProcessSpec(name="x", argv=["true"])] * 2, log_dir=Path("/nonexistent"))


def test_logged_errors_are_the_error_and_critical_json_entries(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    entries = [
        {"event": "started", "level": "info"},
        {"event": "Task exception was never retrieved", "level": "error", "logger": "asyncio"},
        {"event": "relay round failed", "level": "warning"},
        {"event": "out of memory", "level": "critical"},
    ]
    lines = ["=== start 1 ===", *map(json.dumps, entries), "[1, 2]", "{not json"]
    log.write_text("\n".join(lines) + "\n")
    assert logged_errors(log) == [entries[1], entries[3]]
    assert logged_errors(tmp_path / "never-written.log") == []
