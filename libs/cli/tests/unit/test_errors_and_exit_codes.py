"""Every kind of failure becomes a clear message and a documented exit code."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from hive_cli.cli import DEFAULT_REQUEST_TIMEOUT
from hive_cli.exit_codes import ExitCode, exit_code_for_status
from orchestrator_dynamic.config import OrchestratorSettings

from .conftest import FakeServices, error_body


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, ExitCode.USAGE),
        (413, ExitCode.USAGE),
        (415, ExitCode.USAGE),
        (422, ExitCode.USAGE),
        (404, ExitCode.NOT_FOUND),
        (409, ExitCode.CONFLICT),
        (412, ExitCode.CONFLICT),
        (401, ExitCode.AUTH),
        (403, ExitCode.AUTH),
        (429, ExitCode.UNAVAILABLE),
        (503, ExitCode.UNAVAILABLE),
        (504, ExitCode.UNAVAILABLE),
        (500, ExitCode.SERVER_ERROR),
        (418, ExitCode.SERVER_ERROR),
    ],
)
def test_http_status_to_exit_code(status: int, code: ExitCode) -> None:
    assert exit_code_for_status(status) is code


def test_exit_code_values_are_stable() -> None:
    # Scripts depend on these numbers; changing one is a breaking change.
    assert {c.name: c.value for c in ExitCode} == {
        "OK": 0,
        "PLAN_UNSUCCESSFUL": 1,
        "USAGE": 2,
        "NOT_FOUND": 3,
        "CONFLICT": 4,
        "UNAVAILABLE": 5,
        "AUTH": 6,
        "SERVER_ERROR": 7,
        "WATCH_TIMEOUT": 8,
        "INTERRUPTED": 130,
    }


def test_not_found_prints_the_service_error_and_exits_3() -> None:
    services = FakeServices()
    services.on(
        "GET",
        "/api/v1/plans/nope",
        404,
        error_body("NOT_FOUND", "plan 'nope' does not exist", plan_id="nope"),
    )
    run = services.run("plan", "status", "nope")
    assert run.code == 3
    assert run.out == ""
    assert "error: NOT_FOUND: plan 'nope' does not exist" in run.err
    assert '"plan_id": "nope"' in run.err
    assert "Traceback" not in run.err


def test_validation_errors_print_every_json_path_and_exit_2(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tasks": [{"task_id": "a", "depends_on": ["zz"]}]}))
    services = FakeServices()
    services.on(
        "POST",
        "/api/v1/plans",
        400,
        error_body(
            "INVALID_ARGUMENT",
            "invalid plan",
            field_violations=[
                {"field": "tasks[0].task_type", "description": "is required"},
                {"field": "tasks[0].depends_on[0]", "description": "unknown task 'zz'"},
            ],
        ),
    )
    run = services.run("plan", "submit", str(plan))
    assert run.code == ExitCode.USAGE
    assert "error: INVALID_ARGUMENT: invalid plan" in run.err
    assert "  tasks[0].task_type: is required" in run.err
    assert "  tasks[0].depends_on[0]: unknown task 'zz'" in run.err
    # The file's bytes were sent untouched, with the strict flag only when asked.
    (request,) = services.requests
    assert request.content == plan.read_bytes()
    assert request.headers["content-type"] == "application/json"
    assert "strict" not in request.url.params
    services.run("plan", "submit", str(plan), "--strict")
    assert services.requests[-1].url.params["strict"] == "true"


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [
        (409, "ALREADY_EXISTS", ExitCode.CONFLICT),
        (412, "FAILED_PRECONDITION", ExitCode.CONFLICT),
        (503, "UNAVAILABLE", ExitCode.UNAVAILABLE),
        (500, "INTERNAL", ExitCode.SERVER_ERROR),
    ],
)
def test_service_errors_map_to_exit_codes(status: int, code: str, exit_code: ExitCode) -> None:
    services = FakeServices()
    services.on("POST", "/api/v1/plans/p1/cancel", status, error_body(code, "nope"))
    run = services.run("plan", "cancel", "p1")
    assert run.code == exit_code
    assert f"error: {code}: nope" in run.err


def test_unauthenticated_exits_6_with_a_hint() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/workers", 401, error_body("UNAUTHENTICATED", "invalid token"))
    run = services.run("workers", "list")
    assert run.code == 6
    assert "error: UNAUTHENTICATED: invalid token" in run.err
    assert "hint: " in run.err
    assert "HIVE_JWT_SECRET" in run.err


ORCHESTRATOR_401 = error_body(
    "UNAUTHENTICATED", "missing or wrong API token (Authorization: Bearer <token>)"
)


@pytest.mark.parametrize(
    ("argv", "env", "hint"),
    [
        (
            ["plan", "list"],
            {},
            "hint: the orchestrator requires its API token: set --api-token or "
            "HIVE_ORCHESTRATOR_API_TOKEN (the orchestrator's HIVE_ORCHESTRATOR_API_TOKEN)",
        ),
        (
            ["plan", "list", "--api-token", "wrong"],
            {"HIVE_JWT_SECRET": "a-real-secret-of-at-least-thirty-two-bytes"},
            "hint: check the API token given with --api-token / HIVE_ORCHESTRATOR_API_TOKEN "
            "against the orchestrator's HIVE_ORCHESTRATOR_API_TOKEN",
        ),
    ],
)
def test_an_orchestrator_401_hints_at_its_api_token_not_the_jwt_secret(
    argv: list[str], env: dict[str, str], hint: str
) -> None:
    # The orchestrator checks only its API token; the hint named HIVE_JWT_SECRET.
    services = FakeServices()
    services.on("GET", "/api/v1/plans", 401, ORCHESTRATOR_401)
    run = services.run(*argv, env=env)
    assert run.code == ExitCode.AUTH
    assert run.err.splitlines()[-1] == hint
    assert "JWT" not in run.err


def test_a_body_that_is_not_the_error_shape_still_gives_a_clear_error() -> None:
    services = FakeServices()
    services.routes[("GET", "/api/v1/plans")] = lambda _r: httpx.Response(
        502, text="<html>Bad Gateway</html>"
    )
    run = services.run("plan", "list")
    assert run.code == ExitCode.UNAVAILABLE
    assert "error: HTTP_502: <html>Bad Gateway</html>" in run.err


def test_a_success_that_is_not_json_is_a_server_error() -> None:
    services = FakeServices()
    services.routes[("GET", "/api/v1/plans")] = lambda _r: httpx.Response(200, text="hello")
    run = services.run("plan", "list")
    assert run.code == ExitCode.SERVER_ERROR
    assert "BAD_RESPONSE" in run.err


def test_connection_refused_exits_5_naming_the_service_and_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    services = FakeServices()
    services.routes[("GET", "/api/v1/tickets")] = refuse
    run = services.run("tickets", "list", "--tickets", "http://127.0.0.1:1")
    assert run.code == 5
    assert "tickets at http://127.0.0.1:1 is unreachable" in run.err
    assert "Connection refused" in run.err


def test_a_grpc_port_given_as_the_url_is_named_as_such() -> None:
    def grpc_port(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("illegal request line", request=request)

    services = FakeServices()
    services.routes[("GET", "/api/v1/plans")] = grpc_port
    run = services.run("plan", "list", "--orchestrator", "http://127.0.0.1:50053")
    assert run.code == ExitCode.UNAVAILABLE
    assert run.err.splitlines() == [
        "error: orchestrator at http://127.0.0.1:50053 is unreachable: it answered, but not "
        "in HTTP/1.1 (illegal request line)",
        "hint: is this the orchestrator's HTTP URL, not its gRPC port? (--orchestrator)",
    ]


@pytest.mark.parametrize(
    "answer",
    [
        # Another Hive service: its 404 for a route it does not have.
        httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": "Not Found"}}),
        httpx.Response(404, text="404 page not found"),  # not Hive at all
        httpx.Response(200, text="# HELP python_info ..."),  # a metrics port
    ],
)
def test_the_url_of_another_service_gets_a_hint(answer: httpx.Response) -> None:
    services = FakeServices()
    services.routes[("GET", "/api/v1/workers")] = lambda _r: answer
    run = services.run("workers", "list", "--registry", "http://127.0.0.1:8003")
    assert run.code in (ExitCode.NOT_FOUND, ExitCode.SERVER_ERROR)
    assert run.err.splitlines()[-1] == (
        "hint: is http://127.0.0.1:8003 the registry's HTTP URL? (--registry)"
    )


def test_a_plan_not_found_gets_no_url_hint() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/plans/x", 404, error_body("NOT_FOUND", "plan x not found"))
    run = services.run("plan", "status", "x")
    assert run.code == ExitCode.NOT_FOUND
    assert "hint" not in run.err


PLAN = b'{"tasks": [{"task_id": "a", "task_type": "echo"}]}'


def slow(request: httpx.Request) -> httpx.Response:
    """A service that does not answer in time."""
    raise httpx.ReadTimeout("timed out", request=request)


def test_timeout_exits_5() -> None:
    services = FakeServices()
    services.routes[("POST", "/api/v1/plans")] = slow
    run = services.run("plan", "submit", "-", stdin=PLAN)
    assert run.code == ExitCode.UNAVAILABLE
    # Sent and not answered: not "unreachable", and it may have been stored.
    assert "did not answer in time: timed out" in run.err
    assert "may have been carried out" in run.err
    json_run = services.run("-o", "json", "plan", "submit", "-", stdin=PLAN)
    assert json.loads(json_run.err)["error"]["code"] == "TIMED_OUT"


def test_a_read_that_timed_out_is_not_said_to_have_been_carried_out() -> None:
    services = FakeServices()
    services.routes[("GET", "/api/v1/plans/p1")] = slow
    run = services.run("plan", "status", "p1")
    assert run.code == ExitCode.UNAVAILABLE
    assert run.err.splitlines() == [
        # Said once ("timed out (timed out)" repeated what httpx says).
        "error: orchestrator at http://127.0.0.1:8003 did not answer in time: timed out",
        "hint: --request-timeout waits longer",
    ]
    # A cancel (POST) may have been carried out.
    services.routes[("POST", "/api/v1/plans/p1/cancel")] = slow
    assert "may have been carried out" in services.run("plan", "cancel", "p1").err


def test_connect_timeout_is_unreachable() -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    services = FakeServices()
    services.routes[("GET", "/api/v1/plans/p1")] = unreachable
    run = services.run("plan", "status", "p1")
    assert run.code == ExitCode.UNAVAILABLE
    assert "is unreachable: timed out" in run.err


def test_default_request_timeout_outlasts_the_orchestrators_submit_wait() -> None:
    # At equal values the CLI gave up ("unreachable") just before a stored plan's answer.
    submit_wait = OrchestratorSettings.model_fields["submit_wait_seconds"].default
    assert submit_wait + 5 < DEFAULT_REQUEST_TIMEOUT


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        # Settings that cannot be resolved: reported before any request.
        (["-o", "json", "plan", "status", "x", "--orchestrator", "ftp://x"], {}),
        (["plan", "list"], {"HIVE_OUTPUT": "json", "HIVE_ORCHESTRATOR_URL": "localhost:9703"}),
        (["plan", "list", "--token", "a b"], {"HIVE_OUTPUT": "json"}),
        (["tickets", "list"], {"HIVE_OUTPUT": "json", "HIVE_JWT_SECRET": "short"}),
        # The parser's own errors, wherever -o json is.
        (["plan", "status", "../x"], {"HIVE_OUTPUT": "json"}),
        (["-o", "json", "plan", "list", "--limit", "501"], {}),
        (["plan", "list", "--limit", "501", "--output=json"], {}),
        (["--out", "json", "plan", "frobnicate"], {}),
        (["-ojson", "tickets", "show", ".."], {}),
        (["-o", "json"], {}),
        # The last -o wins, over the environment too.
        (["-o", "table", "plan", "list", "--bogus", "-o", "json"], {"HIVE_OUTPUT": "table"}),
    ],
)
def test_in_json_mode_usage_errors_are_json_on_stderr(argv: list[str], env: dict[str, str]) -> None:
    services = FakeServices()
    run = services.run(*argv, env=env)
    assert run.code == ExitCode.USAGE
    assert run.out == ""
    error = json.loads(run.err)["error"]
    assert error["code"] == "USAGE"
    assert error["message"]
    assert services.requests == []


def test_usage_errors_stay_text_in_table_mode() -> None:
    run = FakeServices().run("-o", "json", "plan", "list", "--limit", "501", "-o", "table")
    assert run.code == ExitCode.USAGE
    assert run.err.startswith("usage: hive plan list")
    run = FakeServices().run("plan", "status", "x", "--orchestrator", "ftp://x")
    assert run.err == "error: --orchestrator must be an http:// or https:// URL, not 'ftp://x'\n"


def test_in_json_mode_a_watch_timeout_is_json_on_stderr() -> None:
    services = FakeServices()
    services.on(
        "GET",
        "/api/v1/plans/p1",
        body={"plan_id": "p1", "status": "RUNNING", "task_count": 1, "tickets": []},
    )
    run = services.run(
        "plan", "watch", "p1", "--interval", "0.01", "--timeout", "0.05", "-o", "json"
    )
    assert run.code == ExitCode.WATCH_TIMEOUT
    assert json.loads(run.out)["status"] == "RUNNING"
    # The progress display goes to stderr in JSON mode; the error follows it.
    error = json.loads(run.err[run.err.index('{\n  "error"') :])["error"]
    assert error == {
        "code": "WATCH_TIMEOUT",
        "message": "plan p1 is still RUNNING; it keeps running (hive plan watch p1)",
        "details": {"plan_id": "p1", "status": "RUNNING"},
    }


def test_in_json_mode_an_internal_error_is_json_on_stderr() -> None:
    def bug(_request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom")

    services = FakeServices()
    services.routes[("GET", "/api/v1/plans")] = bug
    run = services.run("-o", "json", "plan", "list")
    assert run.code == ExitCode.SERVER_ERROR
    assert json.loads(run.err)["error"] == {
        "code": "INTERNAL",
        "message": "internal error in hive: RuntimeError: boom",
        "details": {},
    }
    text = services.run("plan", "list")
    assert text.err == (
        "error: internal error in hive: RuntimeError: boom (HIVE_DEBUG=1 shows the traceback)\n"
    )
