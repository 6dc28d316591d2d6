"""Built-in task types, each against the real thing it touches (a local HTTP server on
127.0.0.1:0, real child processes) but no Hive service."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hive_worker.handlers import InvalidParameters, PermanentTaskError, TaskContext, TaskError
from hive_worker.tasks import (
    HttpGetTask,
    ShellTask,
    SleepTask,
    builtin_tasks,
    echo,
    fail,
    internal_address_kind,
)

PY = sys.executable


def ctx(task_type: str = "t") -> TaskContext:
    return TaskContext(
        ticket_id="00000000-0000-0000-0000-000000000001",
        plan_id="p",
        task_id="t1",
        task_type=task_type,
        attempt=1,
        max_retries=0,
        timeout_seconds=60,
        worker_id="w",
    )


# ---------------------------------------------------------------- echo, sleep, fail


async def test_echo_returns_its_parameters() -> None:
    params: dict[str, Any] = {"a": 1.0, "nested": {"b": [True, None, "x"]}}
    assert await echo(params, ctx()) == params


async def test_sleep_sleeps_within_bounds() -> None:
    task = SleepTask(max_seconds=5)
    assert await task({"seconds": 0.0}, ctx()) == {"slept_seconds": 0.0}
    assert await task({"seconds": 0.01}, ctx()) == {"slept_seconds": 0.01}


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "is required"),
        ({"seconds": "1"}, "must be a number"),
        ({"seconds": True}, "must be a number"),
        ({"seconds": -1.0}, "between 0 and 5"),
        ({"seconds": 5.5}, "between 0 and 5"),
    ],
)
async def test_sleep_refuses_bad_seconds(params: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidParameters, match=problem) as raised:
        await SleepTask(max_seconds=5)(params, ctx())
    assert raised.value.permanent
    assert raised.value.field == "seconds"


async def test_fail_is_retryable_by_default_and_permanent_on_request() -> None:
    with pytest.raises(TaskError) as retryable:
        await fail({"message": "boom"}, ctx())
    assert (retryable.value.message, retryable.value.permanent) == ("boom", False)
    with pytest.raises(TaskError) as permanent:
        await fail({"permanent": True}, ctx())
    assert (permanent.value.message, permanent.value.permanent) == ("failed on purpose", True)
    with pytest.raises(InvalidParameters):
        await fail({"permanent": "yes"}, ctx())


# ---------------------------------------------------------------- http_get


DRIP_STARTED: defaultdict[str, threading.Event] = defaultdict(threading.Event)
CLIENT_GONE: defaultdict[str, threading.Event] = defaultdict(threading.Event)
REQUESTED: list[str] = []  # the paths the test server was asked for


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path
        REQUESTED.append(path)
        if path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"status page")
        elif path == "/big":
            self._send(200, b"x" * 100)
        elif path == "/slow":
            time.sleep(1.0)
            self._send(200, b"late")
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://example.invalid/file")
            self.end_headers()
        elif path == "/to-ok":
            self.send_response(302)
            self.send_header("Location", "/status/200")
            self.end_headers()
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif path == "/to-credentials":
            self.send_response(302)
            self.send_header("Location", f"http://admin:s3cr3t@{self.headers['Host']}/status/200")
            self.end_headers()
        elif path in ("/loop", "/to-file"):
            self.send_response(302)
            self.send_header("Location", "/loop" if path == "/loop" else "file:///etc/hostname")
            self.end_headers()
        elif path.startswith("/drip/"):
            self._drip(path)
        else:
            self._send(200, "héllo".encode())

    def _drip(self, path: str) -> None:
        """``/drip/headers/…`` or ``/drip/body/…``: the headers, or a 100000-byte body, one
        byte every 0.25 s (for 20 s at most); ``CLIENT_GONE[path]`` is set once writing
        fails: the client closed the connection."""
        DRIP_STARTED[path].set()
        if path.startswith("/drip/body/"):
            start = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
        else:
            start = b"HTTP/1.1 200 OK\r\nX-Drip: "
        try:
            self.wfile.write(start)
            for _ in range(80):
                time.sleep(0.25)
                self.wfile.write(b"x")
        except (BrokenPipeError, ConnectionResetError):
            CLIENT_GONE[path].set()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def http_task(max_body: int = 1024, allowed: tuple[Any, ...] = LOOPBACK) -> HttpGetTask:
    """An http_get task allowed to reach the test server (on 127.0.0.1) by default."""
    return HttpGetTask(
        default_timeout_seconds=5,
        max_timeout_seconds=10,
        max_body_bytes=max_body,
        allowed_networks=allowed,
    )


async def test_http_get_returns_status_and_body(http_base: str) -> None:
    result = await http_task()({"url": f"{http_base}/"}, ctx())
    assert result["status"] == 200
    assert result["body"] == "héllo"
    assert result["content_type"] == "text/plain"
    assert result["truncated"] is False


async def test_http_get_bounds_the_body(http_base: str) -> None:
    result = await http_task(max_body=10)({"url": f"{http_base}/big"}, ctx())
    assert result["body"] == "x" * 10
    assert result["truncated"] is True


async def test_http_get_follows_http_redirects(http_base: str) -> None:
    result = await http_task()({"url": f"{http_base}/to-ok"}, ctx())
    assert (result["status"], result["body"]) == (200, "status page")


@pytest.mark.parametrize(
    ("status", "permanent"), [(404, True), (400, True), (429, False), (503, False)]
)
async def test_http_get_error_statuses_fail(http_base: str, status: int, permanent: bool) -> None:
    with pytest.raises(TaskError) as raised:
        await http_task()({"url": f"{http_base}/status/{status}"}, ctx())
    assert raised.value.permanent is permanent
    assert raised.value.result is not None
    assert raised.value.result["status"] == status
    assert raised.value.result["body"] == "status page"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "http://", "example.com", ""]
)
async def test_http_get_only_takes_http_urls(url: str) -> None:
    with pytest.raises(InvalidParameters, match="url"):
        await http_task()({"url": url}, ctx())


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1", "is malformed (Invalid IPv6 URL)"),
        ("http://[zz]/", "is malformed"),
        ("http://127.0.0.1:abc/", "has an invalid port (a number from 1 to 65535)"),
        ("http://127.0.0.1:99999/", "has an invalid port"),
        ("http://127.0.0.1:0/", "has an invalid port"),
        ("http://a b/", "must not contain spaces or control characters"),
        ("http://%00/", "has an invalid host '%00'"),
        ("http://a..b/", "has an invalid host"),
        ("http://\u202eexample.com/", "must not contain spaces or control characters"),
        ("http://127.0.0.1:1/\x7f", "must not contain spaces or control characters"),
        ("http://127.0.0.1:1/caf\u00e9", "must be ASCII outside the host"),
        ("http://example.com/" + "x" * 500 + " ", "must not contain spaces"),
    ],
)
async def test_http_get_refuses_a_malformed_url_before_connecting(url: str, problem: str) -> None:
    # These used to reach urllib: retryable failures (every retry used) with raw
    # exception text, or a dial to port 99999.
    with pytest.raises(InvalidParameters) as raised:
        await http_task()({"url": url}, ctx())
    message = raised.value.message
    assert message.startswith(f"parameters.url: {problem}")
    assert len(message) < 200  # the bad value is echoed, bounded
    assert message.isprintable()  # control characters and a bidi override are escaped


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]:8080/x",
        "https://example.com:443/a?b=c#d",
        "http://bücher.de/",
        "https://example.com/a@b?next=//c:d@e#f@g",  # an @ outside the authority is fine
    ],
)
async def test_http_get_url_check_takes_valid_urls(url: str) -> None:
    task = HttpGetTask(default_timeout_seconds=5, max_timeout_seconds=10, max_body_bytes=1)
    # Valid: the URL passes; the timeout parameter is what is refused.
    with pytest.raises(InvalidParameters, match="timeout_seconds"):
        await task({"url": url, "timeout_seconds": 0}, ctx())


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:s3cr3t@127.0.0.1:9501/health",
        "https://s3cr3t@example.com/",
        "http://admin:s3cr3t@[::1",  # malformed as well: the credentials are not shown
        "http://admin:s3cr3t@example.com/a b",  # so is a space
        "http:/\t/admin:s3cr3t@example.com/",  # urllib drops the tab
        "HTTP://a@b:s3cr3t@example.com/",
    ],
)
async def test_http_get_refuses_credentials_without_showing_them(url: str) -> None:
    # They passed the check, then urllib took them for part of the host name: a name
    # resolution error, retried, with the credentials in the plan's error and the logs.
    with pytest.raises(InvalidParameters) as raised:
        await http_task()({"url": url}, ctx())
    message = raised.value.message
    assert message.startswith("parameters.url: must not contain a user name or password")
    assert "s3cr3t" not in message


async def test_http_get_refuses_a_redirect_to_a_url_with_credentials(http_base: str) -> None:
    with pytest.raises(PermanentTaskError, match="user name or password") as raised:
        await http_task()({"url": f"{http_base}/to-credentials"}, ctx())
    assert "s3cr3t" not in raised.value.message


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("[fd00::1]", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
    ],
)
async def test_http_get_refuses_internal_destinations_by_default(
    http_base: str, host: str, kind: str
) -> None:
    # Any plan author could read the worker's loopback services, the cloud metadata and
    # the private network, and port-scan them through the error messages.
    port = http_base.rsplit(":", 1)[1]
    path = f"/internal/{host}"
    with pytest.raises(PermanentTaskError) as raised:
        await http_task(allowed=())({"url": f"http://{host}:{port}{path}"}, ctx())
    message = raised.value.message
    assert f"host '{host.strip('[]')}' refused ({kind} address)" in message
    assert "(allowed: none)" in message
    assert path not in REQUESTED  # refused before connecting


async def test_http_get_checks_every_redirect(http_base: str) -> None:
    # The first URL is allowed, the redirect's host is not: it used to be followed.
    allowed = (ipaddress.ip_network("127.0.0.1/32"),)
    with pytest.raises(PermanentTaskError) as raised:
        await http_task(allowed=allowed)(
            {"url": f"{http_base}/to-metadata", "timeout_seconds": 2}, ctx()
        )
    assert "host '169.254.169.254' refused (link-local address)" in raised.value.message
    assert "(allowed: 127.0.0.1/32)" in raised.value.message


async def test_http_get_allowed_networks_let_internal_addresses_through(http_base: str) -> None:
    allowed = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1"))
    result = await http_task(allowed=allowed)({"url": f"{http_base}/status/200"}, ctx())
    assert result["status"] == 200


async def test_http_get_connects_to_the_address_it_checked(
    http_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: a name answering an allowed address to the check, then an internal
    # one to a second lookup when connecting. The name is looked up once.
    port = int(http_base.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1", "169.254.169.254"])
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            host = next(answers)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    allowed = (ipaddress.ip_network("127.0.0.1/32"),)
    result = await http_task(allowed=allowed)(
        {"url": f"http://rebind.test:{port}/status/200", "timeout_seconds": 2}, ctx()
    )
    assert result["status"] == 200
    assert lookups == ["rebind.test"]


async def test_http_get_ignores_proxies_of_the_environment(
    http_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would choose the destination the worker checked.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    result = await http_task()({"url": f"{http_base}/status/200"}, ctx())
    assert result["status"] == 200


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("255.255.255.255", "reserved"),
        # 6to4 and NAT64 addresses lead to the IPv4 address they embed.
        ("2002:7f00:1::", "loopback"),
        ("2002:a00:1::1", "private"),
        ("2002:808:808::", None),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("64:ff9b::808:808", None),
    ],
)
def test_internal_address_kind(address: str, kind: str | None) -> None:
    assert internal_address_kind(address) == kind


def test_internal_address_kind_allowed_networks() -> None:
    allowed = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert internal_address_kind("10.9.9.9", allowed) is None
    assert internal_address_kind("::ffff:10.9.9.9", allowed) is None
    assert internal_address_kind("fd00::1", allowed) is None
    assert internal_address_kind("192.168.0.1", allowed) == "private"


async def test_http_get_refuses_a_redirect_to_another_scheme(http_base: str) -> None:
    with pytest.raises(PermanentTaskError, match="redirected to a non-HTTP URL: 'ftp://"):
        await http_task()({"url": f"{http_base}/to-ftp"}, ctx())


@pytest.mark.parametrize("path", ["/loop", "/to-file"])
async def test_http_get_fails_on_a_redirect_it_does_not_follow(http_base: str, path: str) -> None:
    # urllib answers a redirect loop, or one to file:, with the redirect itself: it was
    # a COMPLETED task with status 302 and an empty body.
    with pytest.raises(PermanentTaskError, match="302"):
        await http_task()({"url": f"{http_base}{path}"}, ctx())


async def test_http_get_timeout_is_a_retryable_failure(http_base: str) -> None:
    with pytest.raises(TaskError) as raised:
        await http_task()({"url": f"{http_base}/slow", "timeout_seconds": 0.2}, ctx())
    assert not raised.value.permanent


@pytest.mark.parametrize("phase", ["headers", "body"])
async def test_http_get_timeout_is_a_deadline_for_the_whole_request(
    http_base: str, phase: str
) -> None:
    # Each byte comes long before a socket timeout: timeout_seconds used to bound each
    # read only, so a dripping server held the task until the ticket timed out.
    path = f"/drip/{phase}/deadline"
    with pytest.raises(TaskError, match=r"timed out after 1s") as raised:
        async with asyncio.timeout(15):  # a hang guard
            await http_task()({"url": f"{http_base}{path}", "timeout_seconds": 1}, ctx())
    assert not raised.value.permanent
    # The thread that read stops too: it closes the connection.
    assert await asyncio.to_thread(CLIENT_GONE[path].wait, 10)


async def test_http_get_cancelled_stops_reading(http_base: str) -> None:
    path = "/drip/body/cancel"
    fetch = asyncio.ensure_future(http_task()({"url": f"{http_base}{path}"}, ctx()))
    assert await asyncio.to_thread(DRIP_STARTED[path].wait, 10)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    # The thread doing the request used to go on reading, holding a thread of the pool.
    assert await asyncio.to_thread(CLIENT_GONE[path].wait, 10)


@pytest.mark.parametrize("seconds", [0, -1, 11, "5"])
async def test_http_get_timeout_must_be_in_range(http_base: str, seconds: object) -> None:
    with pytest.raises(InvalidParameters, match="timeout_seconds"):
        await http_task()({"url": http_base, "timeout_seconds": seconds}, ctx())


async def test_http_get_unreachable_is_retryable() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there any more
    with pytest.raises(TaskError) as raised:
        await http_task()({"url": f"http://127.0.0.1:{port}/"}, ctx())
    assert not raised.value.permanent


# ---------------------------------------------------------------- shell


def shell(max_output: int = 1024, timeout: float = 30) -> ShellTask:
    return ShellTask(
        allow_list=(PY, "/definitely/not/here"),
        max_output_bytes=max_output,
        default_timeout_seconds=timeout,
    )


async def test_shell_runs_an_allowed_program_without_a_shell() -> None:
    # "$HOME" and ";" reach the program verbatim: no shell interprets them.
    result = await shell()(
        {"argv": [PY, "-c", "import sys; print(sys.argv[1:])", "$HOME", ";", "x"]}, ctx()
    )
    assert result["exit_code"] == 0
    assert result["stdout"].strip() == "['$HOME', ';', 'x']"
    assert result["stderr"] == ""


async def test_shell_programs_do_not_get_the_workers_configuration_or_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # They used to inherit the whole environment: a plan could read the registration
    # secret (and with it take over worker names) through any allowed program that prints
    # its environment.
    monkeypatch.setenv("HIVE_WORKER_REGISTRATION_SECRET", "s3cret-registration")
    monkeypatch.setenv("HIVE_JWT_SECRET", "s3cret-jwt")
    monkeypatch.setenv("SOME_TOOL_SETTING", "kept")
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    result = await shell(max_output=1 << 20)({"argv": [PY, "-c", script]}, ctx())
    seen = json.loads(result["stdout"])
    assert not [k for k in seen if k.startswith("HIVE_")]
    assert "s3cret" not in result["stdout"]
    assert seen["SOME_TOOL_SETTING"] == "kept"
    assert seen["PATH"] == os.environ["PATH"]


async def test_shell_cmd_is_split_with_shlex() -> None:
    result = await shell()({"cmd": f"{PY} -c 'print(\"a b\")'"}, ctx())
    assert result["argv"] == [PY, "-c", 'print("a b")']
    assert result["stdout"].strip() == "a b"


async def test_shell_bounds_output() -> None:
    result = await shell(max_output=5)(
        {"argv": [PY, "-c", "import sys; print('y' * 100000); print('e' * 9, file=sys.stderr)"]},
        ctx(),
    )
    assert result["stdout"] == "yyyyy"
    assert result["stdout_truncated"] is True
    assert result["stderr"] == "eeeee"
    assert result["stderr_truncated"] is True


async def test_shell_non_zero_exit_is_a_retryable_failure_with_output() -> None:
    with pytest.raises(TaskError) as raised:
        await shell()({"argv": [PY, "-c", "import sys; print('out'); sys.exit(3)"]}, ctx())
    assert not raised.value.permanent
    assert raised.value.result is not None
    assert raised.value.result["exit_code"] == 3
    assert raised.value.result["stdout"].strip() == "out"


@pytest.mark.parametrize(
    "params",
    [
        {"cmd": "rm -rf /"},
        {"cmd": "python3 -c 1"},  # a bare name is not the allowed absolute path
        {"argv": [f"/tmp/evil/{PY.rsplit('/', 1)[1]}"]},  # nor is a same-named program
        {"cmd": f"sh -c '{PY} -c 1'"},
    ],
)
async def test_shell_refuses_programs_outside_the_allow_list(params: dict[str, Any]) -> None:
    with pytest.raises(PermanentTaskError, match="not in the shell allow-list"):
        await shell()(params, ctx())


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "cmd"),
        ({"cmd": "a", "argv": ["a"]}, "cmd"),
        ({"cmd": "unbalanced 'quote"}, "cmd"),
        ({"cmd": ""}, "cmd"),
        ({"argv": "a b"}, "argv"),
        ({"argv": [PY, 1]}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": [PY], "timeout_seconds": 0}, "timeout_seconds"),
    ],
)
async def test_shell_refuses_bad_parameters(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParameters) as raised:
        await shell()(params, ctx())
    assert raised.value.field == field


async def test_shell_with_an_empty_allow_list_runs_nothing() -> None:
    task = ShellTask(allow_list=(), max_output_bytes=10, default_timeout_seconds=1)
    with pytest.raises(PermanentTaskError, match=r"allowed: none"):
        await task({"argv": [PY, "-c", "1"]}, ctx())


@contextlib.contextmanager
def nothing_left_behind() -> Iterator[None]:
    """Fails when the block leaves an unclosed transport (a ResourceWarning) or an error
    only the event loop sees (such as "Task exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            yield
            gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert reported == []


async def test_shell_timeout_kills_the_program_and_keeps_its_output() -> None:
    script = "import sys, time; print('started'); print('warn', file=sys.stderr); time.sleep(30)"
    with nothing_left_behind(), pytest.raises(TaskError, match="timed out after 1s") as raised:
        await shell()({"argv": [PY, "-u", "-c", script], "timeout_seconds": 1}, ctx())
    assert not raised.value.permanent
    assert raised.value.result == {
        "argv": [PY, "-u", "-c", script],
        "exit_code": None,
        "stdout": "started\n",
        "stderr": "warn\n",
        "stdout_truncated": False,
        "stderr_truncated": False,
    }


# Writes without end: its pipe is always full.
_FLOOD = "import sys\nwhile True: sys.stdout.write('y' * 65536)"


async def test_shell_timeout_ends_a_program_that_keeps_writing() -> None:
    # The timeout used to stop reading the output, then wait for the killed program's
    # full pipe to close, which it never did: the task hung until the ticket timeout.
    with nothing_left_behind(), pytest.raises(TaskError, match="timed out after 1s") as raised:
        async with asyncio.timeout(15):  # a hang guard
            await shell(max_output=5)({"argv": [PY, "-c", _FLOOD], "timeout_seconds": 1}, ctx())
    assert raised.value.result is not None
    assert raised.value.result["exit_code"] is None
    assert (raised.value.result["stdout"], raised.value.result["stdout_truncated"]) == (
        "yyyyy",
        True,
    )


async def test_shell_cancelled_ends_a_program_that_keeps_writing() -> None:
    with nothing_left_behind():
        run = asyncio.ensure_future(shell()({"argv": [PY, "-c", _FLOOD]}, ctx()))
        await asyncio.sleep(0.5)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(15):  # a hang guard
                await run


async def test_shell_timeout_does_not_wait_for_a_child_holding_the_output() -> None:
    # The program exits at once, but a child of it keeps stdout open: the output never
    # ends, so the task times out, and does not hang waiting for the end.
    script = (
        "import subprocess, sys; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(10)']); "
        "print('parent done')"
    )
    with nothing_left_behind(), pytest.raises(TaskError, match="timed out after 1s") as raised:
        async with asyncio.timeout(15):  # a hang guard
            await shell()({"argv": [PY, "-c", script], "timeout_seconds": 1}, ctx())
    assert raised.value.result is not None
    assert raised.value.result["stdout"] == "parent done\n"


async def test_shell_missing_program_is_retryable() -> None:
    with pytest.raises(TaskError, match="cannot start") as raised:
        await shell()({"argv": ["/definitely/not/here"]}, ctx())
    assert not raised.value.permanent


def test_builtin_task_types() -> None:
    handlers = builtin_tasks(
        sleep_max_seconds=1,
        shell_allow_list=["make"],
        shell_max_output_bytes=10,
        shell_timeout_seconds=1,
        http_get_timeout_seconds=100,
        http_get_max_timeout_seconds=5,
        http_get_max_body_bytes=10,
        http_get_allow_networks=[ipaddress.ip_network("10.0.0.0/8")],
    )
    assert sorted(handlers) == ["echo", "fail", "http_get", "shell", "sleep"]
    http = handlers["http_get"]
    assert isinstance(http, HttpGetTask)
    assert http.default_timeout_seconds == 5  # capped by the maximum
    assert http.allowed_networks == (ipaddress.ip_network("10.0.0.0/8"),)
