"""Argument parsing, option precedence and usage errors."""

from __future__ import annotations

import httpx
import pytest

from hive_cli.api import HiveApi, ServiceClient
from hive_cli.cli import DEFAULT_URLS, Settings, build_parser, resolve_settings
from hive_cli.exit_codes import ExitCode

from .conftest import FakeServices


def settings_for(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return resolve_settings(build_parser().parse_args(list(argv)), env or {})


def test_defaults_are_the_local_dev_ports() -> None:
    settings = settings_for("plan", "list")
    assert settings.urls == {
        "orchestrator": "http://127.0.0.1:8003",
        "tickets": "http://127.0.0.1:8002",
        "registry": "http://127.0.0.1:8001",
    }
    assert settings.urls == DEFAULT_URLS
    assert settings.output == "table"


def test_flag_beats_environment_beats_default() -> None:
    env = {
        "HIVE_ORCHESTRATOR_URL": "http://orch.env:1",
        "HIVE_TICKETS_URL": "http://tickets.env:2",
        "HIVE_OUTPUT": "json",
    }
    settings = settings_for("--orchestrator", "http://orch.flag:9", "plan", "list", env=env)
    assert settings.urls["orchestrator"] == "http://orch.flag:9"
    assert settings.urls["tickets"] == "http://tickets.env:2"
    assert settings.urls["registry"] == DEFAULT_URLS["registry"]
    assert settings.output == "json"
    assert settings_for("-o", "table", "plan", "list", env=env).output == "table"


def test_global_options_work_before_and_after_the_subcommand() -> None:
    before = settings_for("--output", "json", "--registry", "http://r:1", "workers", "list")
    after = settings_for("workers", "list", "--output", "json", "--registry", "http://r:1")
    assert before.output == after.output == "json"
    assert before.urls["registry"] == after.urls["registry"] == "http://r:1"
    # Between the group and its command too ("invalid choice: 'json'" before).
    between = settings_for("workers", "-o", "json", "--registry", "http://r:1", "list")
    assert between.output == "json"
    assert between.urls["registry"] == "http://r:1"
    services = FakeServices()
    services.on("GET", "/api/v1/plans", body={"plans": [], "next_page_token": ""})
    run = services.run("plan", "-o", "json", "list")
    assert run.code == ExitCode.OK, run.err
    assert run.json() == {"plans": [], "next_page_token": ""}


def test_subcommand_arguments() -> None:
    args = build_parser().parse_args(
        ["plan", "submit", "p.json", "--watch", "--strict", "--interval", "0.2", "--timeout", "5"]
    )
    assert (args.group, args.command, args.file) == ("plan", "submit", "p.json")
    assert args.watch
    assert args.strict
    assert (args.interval, args.timeout) == (0.2, 5.0)
    args = build_parser().parse_args(["plan", "explain", "p1", "build"])
    assert (args.plan_id, args.task_id, args.all) == ("p1", "build", False)
    args = build_parser().parse_args(
        ["tickets", "list", "--plan", "p1", "--status", "failed,running", "--status", "PENDING"]
    )
    assert (args.plan, args.status) == ("p1", ["failed,running", "PENDING"])


def test_statuses_are_split_and_upper_cased_into_repeated_query_keys() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/tickets", body={"tickets": [], "next_page_token": ""})
    run = services.run("tickets", "list", "--status", "failed,running", "--status", "pending")
    assert run.code == ExitCode.OK
    (request,) = services.requests
    assert request.url.params.get_list("status") == ["FAILED", "RUNNING", "PENDING"]
    assert "plan_id" not in request.url.params  # empty filters are not sent


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["plan"],
        ["plan", "frobnicate"],
        ["plan", "status"],
        ["plan", "list", "--limit", "0"],
        ["plan", "submit", "p.json", "--interval", "-1"],
        ["-o", "yaml", "plan", "list"],
        ["workers", "list", "--bogus"],
    ],
)
def test_usage_errors_exit_2_with_usage_on_stderr(argv: list[str]) -> None:
    run = FakeServices().run(*argv)
    assert run.code == 2
    assert "usage: hive" in run.err
    assert run.out == ""


def test_bad_url_and_bad_env_output_are_usage_errors() -> None:
    services = FakeServices()
    run = services.run("--orchestrator", "127.0.0.1:8003", "plan", "list")
    assert run.code == ExitCode.USAGE
    assert "--orchestrator must be an http:// or https:// URL" in run.err
    # Set in the environment: the variable is named, not a flag never passed.
    run = services.run("plan", "list", env={"HIVE_ORCHESTRATOR_URL": "notaurl"})
    assert run.code == ExitCode.USAGE
    assert "HIVE_ORCHESTRATOR_URL must be an http:// or https:// URL, not 'notaurl'" in run.err
    run = services.run("plan", "list", env={"HIVE_OUTPUT": "yaml"})
    assert run.code == ExitCode.USAGE
    assert services.requests == []


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://", "https://host:port", "http://127.0.0.1:99999"]
)
def test_an_unparsable_url_is_a_usage_error(url: str) -> None:
    services = FakeServices()
    run = services.run("--orchestrator", url, "plan", "list")
    assert run.code == ExitCode.USAGE, run.err
    assert f"--orchestrator: invalid URL {url!r}" in run.err
    assert "internal error" not in run.err
    assert services.requests == []


UUID = "6f1f0a3e-8a47-4cf8-9a0f-3c1d1fbb7a11"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "status", ""], "plan id must not be empty"),
        (["plan", "watch", ""], "plan id must not be empty"),
        (["plan", "explain", ""], "plan id must not be empty"),
        (["plan", "cancel", ""], "plan id must not be empty"),
        (["plan", "status", ".."], "'..' is not a valid plan id"),
        (["plan", "cancel", "a/b"], "'a/b' is not a valid plan id"),
        (["plan", "explain", "p1", "a/b"], "'a/b' is not a valid task id"),
        (["plan", "explain", "p1", ""], "task id must not be empty"),
        # An empty filter (a script's unset variable) used to be left out of the query, so
        # every ticket or worker was listed.
        (["tickets", "list", "--plan", ""], "plan id must not be empty"),
        (["tickets", "list", "--plan", "a/b"], "'a/b' is not a valid plan id"),
        (["tickets", "list", "--worker", ""], "worker id must not be empty"),
        (["tickets", "list", "--worker", " "], "worker id must not be empty"),
        (["tickets", "list", "--status", ""], "status must not be empty"),
        (["plan", "list", "--status", ","], "status must not be empty"),
        (["workers", "list", "--capability", ""], "capability must not be empty"),
        (["workers", "list", "--namespace", ""], "namespace must not be empty"),
        (["workers", "list", "--status", ""], "status must not be empty"),
        # An empty URL or token used to fall back to the environment or the default.
        (["--orchestrator", "", "plan", "list"], "URL must not be empty"),
        (["plan", "list", "--tickets", " "], "URL must not be empty"),
        (["--registry", "", "workers", "list"], "URL must not be empty"),
        (["--token", "", "tickets", "list"], "token must not be empty"),
        (["--api-token", "", "plan", "list"], "token must not be empty"),
        # The orchestrator answers 400 to a larger page.
        (["plan", "list", "--limit", "501"], "--limit: must be at most 500: '501'"),
        # A ticket id is a UUID: '.' and '..' were dot segments (the listing, or 404 for
        # the route), '<id>/events' reached the events route, all with exit 0 or 3.
        (["tickets", "show", ""], "ticket id must not be empty"),
        (["tickets", "show", "."], "'.' is not a valid ticket id: it must be a UUID"),
        (["tickets", "show", ".."], "'..' is not a valid ticket id: it must be a UUID"),
        (["tickets", "show", f"{UUID}/events"], "is not a valid ticket id: it must be a UUID"),
        (["tickets", "show", "nope"], "'nope' is not a valid ticket id: it must be a UUID"),
        (["workers", "show", ".."], "'..' is not a valid worker id: it must be a UUID"),
        # A single task's explanation is the same with or without --all: refused, not ignored.
        (["plan", "explain", "p1", "build", "--all"], "leave it out with a TASK"),
    ],
)
def test_ids_and_filters_that_cannot_be_sent_are_refused_before_any_request(
    argv: list[str], message: str
) -> None:
    services = FakeServices()
    run = services.run(*argv)
    assert run.code == ExitCode.USAGE, run.err
    assert message in run.err
    assert services.requests == []


def test_a_ticket_id_is_sent_in_its_canonical_form() -> None:
    services = FakeServices()
    services.on("GET", f"/api/v1/tickets/{UUID}", body={"ticket_id": UUID})
    for form in (UUID.upper(), UUID.replace("-", ""), f"{{{UUID}}}"):
        assert services.run("tickets", "show", form).code == ExitCode.OK
    assert {r.url.path for r in services.requests} == {f"/api/v1/tickets/{UUID}"}


def test_no_id_can_address_another_route() -> None:
    # Below the command line's checks: '.' and '..' are percent-encoded, or the URL would
    # resolve them (/api/v1/tickets/. is the listing); '/' is percent-encoded as before.
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    def client(name: str) -> ServiceClient:
        return ServiceClient(
            name=name,
            base_url="http://h:1",
            token=lambda: None,
            timeout=1,
            transport=httpx.MockTransport(record),
        )

    api = HiveApi(
        orchestrator=client("orchestrator"), tickets=client("tickets"), registry=client("registry")
    )
    for odd in (".", ".."):
        api.get_plan(odd)
        api.cancel_plan(odd)
        api.explain_plan(odd)
        api.explain_task(odd, odd)
        api.get_ticket(odd)
        api.ticket_events(odd)
        api.get_worker(odd)
    api.get_ticket("a/events")
    assert [r.url.raw_path.decode() for r in sent] == [
        "/api/v1/plans/%2E",
        "/api/v1/plans/%2E/cancel",
        "/api/v1/plans/%2E/explain",
        "/api/v1/plans/%2E/tasks/%2E/explain",
        "/api/v1/tickets/%2E",
        "/api/v1/tickets/%2E/events",
        "/api/v1/workers/%2E",
        "/api/v1/plans/%2E%2E",
        "/api/v1/plans/%2E%2E/cancel",
        "/api/v1/plans/%2E%2E/explain",
        "/api/v1/plans/%2E%2E/tasks/%2E%2E/explain",
        "/api/v1/tickets/%2E%2E",
        "/api/v1/tickets/%2E%2E/events",
        "/api/v1/workers/%2E%2E",
        "/api/v1/tickets/a%2Fevents",
    ]
    api.close()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e10", "1e300", "604801", "0", "-1"])
@pytest.mark.parametrize(
    "option",
    [
        ["--request-timeout", "{}", "plan", "list"],
        ["plan", "watch", "p1", "--interval", "{}"],
        ["plan", "watch", "p1", "--timeout", "{}"],
        ["plan", "submit", "p.json", "--watch", "--interval", "{}"],
    ],
    ids=["request-timeout", "watch-interval", "watch-timeout", "submit-interval"],
)
def test_seconds_options_refuse_values_that_are_not_finite_positive_and_bounded(
    option: list[str], value: str
) -> None:
    # inf or 1e10 used to reach socket.settimeout() / time.sleep(): OverflowError, exit 7.
    services = FakeServices()
    run = services.run(*(value if arg == "{}" else arg for arg in option))
    assert run.code == ExitCode.USAGE, run.err
    assert "internal error" not in run.err
    assert "usage: hive" in run.err
    assert services.requests == []


def test_seconds_options_accept_up_to_a_week() -> None:
    settings = settings_for("--request-timeout", "604800", "plan", "list")
    assert settings.request_timeout == 604800.0
    args = build_parser().parse_args(
        ["plan", "watch", "p1", "--interval", "0.05", "--timeout", "1e5"]
    )
    assert (args.interval, args.timeout) == (0.05, 100000.0)


def test_page_sizes_up_to_each_service_limit_are_sent() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/plans", body={"plans": [], "next_page_token": None})
    services.on("GET", "/api/v1/tickets", body={"tickets": [], "next_page_token": ""})
    assert services.run("plan", "list", "--limit", "500").code == ExitCode.OK
    # The ticket service caps a larger page itself.
    assert services.run("tickets", "list", "--limit", "5000").code == ExitCode.OK
    assert [r.url.params["page_size"] for r in services.requests] == ["500", "5000"]
    assert "at most 500" in services.run("plan", "list", "--help").out


def test_help_lists_exit_codes_on_stdout_and_exits_0() -> None:
    run = FakeServices().run("--help")
    assert run.code == 0
    assert "exit codes:" in run.out
    for code in ExitCode:
        assert f"\n  {code.value:<4} " in run.out
    sub = FakeServices().run("plan", "submit", "--help")
    assert sub.code == 0
    assert "--watch" in sub.out
    assert "exit codes:" in sub.out


def test_a_worker_filter_is_a_worker_id_not_a_name() -> None:
    # A name listed nothing ("no tickets found", exit 0).
    services = FakeServices()
    run = services.run("tickets", "list", "--worker", "worker-1")
    assert run.code == ExitCode.USAGE
    assert "'worker-1' is not a valid worker id: it must be a UUID" in run.err
    assert "hive workers list" in run.err
    assert services.requests == []


def test_workers_can_be_listed_by_label() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/workers", body={"workers": [], "next_page_token": ""})
    run = services.run("workers", "list", "--label", "zone=eu", "--label", "gpu=a100")
    assert run.code == ExitCode.OK, run.err
    [request] = services.requests
    assert request.url.params.get_list("label") == ["zone=eu", "gpu=a100"]
    bad = services.run("workers", "list", "--label", "zone")
    assert bad.code == ExitCode.USAGE
    assert "'zone' is not KEY=VALUE" in bad.err
