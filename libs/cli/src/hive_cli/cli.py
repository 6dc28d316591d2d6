"""The ``hive`` command: argument parsing, dispatch, output and exit codes.

``main()`` takes its streams, environment and (for tests) an HTTP transport as arguments,
so it can run in-process without touching the process-wide ``sys.stdout``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO

import httpx

from hive_cli.api import ApiError, HiveApi, JsonObject, ServiceClient, ServiceUnreachable
from hive_cli.auth import Credentials, CredentialsError, auth_hint, resolve_credentials
from hive_cli.exit_codes import ExitCode, describe_exit_codes
from hive_cli.progress import display_for, final_summary
from hive_cli.render import (
    error_json,
    error_text,
    explanations_text,
    plan_detail,
    plans_table,
    submission_text,
    ticket_detail,
    tickets_table,
    to_json,
    worker_detail,
    workers_table,
)
from hive_cli.watch import PlanWatcher, WatchTimeout, plan_exit_code

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

DEFAULT_URLS = {
    "orchestrator": "http://127.0.0.1:8003",
    "tickets": "http://127.0.0.1:8002",
    "registry": "http://127.0.0.1:8001",
}
URL_ENV = {
    "orchestrator": "HIVE_ORCHESTRATOR_URL",
    "tickets": "HIVE_TICKETS_URL",
    "registry": "HIVE_REGISTRY_URL",
}
# The orchestrator's id form (plan and task ids): anything else names no plan, and
# characters such as '/' or '..' would not even reach the plan's URL.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Integer literals longer than this cannot be read (Python's default limit).
MAX_INTEGER_DIGITS = 4300
# The orchestrator answers 400 to a larger plans page (the ticket service and the registry
# cap a larger page size at their configured maximum instead).
MAX_PLANS_PAGE_SIZE = 500
# Above the orchestrator's SUBMIT_WAIT_SECONDS (10 s), which a plan submission may spend
# waiting for its tickets before it answers (at 10 s the CLI gave up on a stored plan).
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_WATCH_INTERVAL = 1.0
# The largest value of any SECONDS option (a week): far more than any real wait, and far
# below what a socket timeout or time.sleep() can take (about 292 years, as nanoseconds).
MAX_SECONDS = 7 * 24 * 3600.0

DESCRIPTION = """\
Operate Hive Flow C: submit plans and watch them run, inspect plans, tickets and workers.

Services are reached over HTTP; defaults are the local development ports.
Credentials: the ticket service and registry need a JWT service token: --token or
HIVE_TOKEN, else the CLI signs a short-lived one with HIVE_JWT_SECRET (the services' shared
secret; without it, the public development secret the services default to). The
orchestrator takes --api-token / HIVE_ORCHESTRATOR_API_TOKEN when it is configured with one.
"""


class UsageError(Exception):
    """Bad command line or unreadable input: exit code 2."""


def usage_error_json(message: str, **details: str) -> JsonObject:
    """A usage error (exit 2) as ``--output json`` reports it."""
    return {"error": {"code": "USAGE", "message": message, "details": details}}


class HiveArgumentParser(argparse.ArgumentParser):
    """argparse that writes to the streams given to :func:`main` and raises instead of
    exiting, so ``main`` can run in-process; with ``json_errors`` its errors are JSON."""

    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    json_errors: bool = False

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        body = usage_error_json(message, usage=" ".join(self.format_usage().split()))
        _report(self.err, True, body, message)
        raise SystemExit(ExitCode.USAGE)

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            (self.err if file is sys.stderr or file is None else self.out).write(message)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        self.out.write(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self.err.write(message)
        raise SystemExit(status)


@dataclass(frozen=True)
class Streams:
    out: TextIO
    err: TextIO
    stdin: IO[bytes] | None


def _global_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS defaults: the options work before or after the subcommand, and the value
    # given last wins; real defaults (env, then built-in) are applied after parsing.
    group = parser.add_argument_group("global options")
    for service in ("orchestrator", "tickets", "registry"):
        group.add_argument(
            f"--{service}",
            metavar="URL",
            type=_given("URL"),
            default=argparse.SUPPRESS,
            help=f"{service} HTTP API (env {URL_ENV[service]}, default {DEFAULT_URLS[service]})",
        )
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="output format (env HIVE_OUTPUT, default table)",
    )
    group.add_argument(
        "--token",
        type=_given("token"),
        default=argparse.SUPPRESS,
        help="JWT service token for the ticket service and registry (env HIVE_TOKEN)",
    )
    group.add_argument(
        "--api-token",
        type=_given("token"),
        default=argparse.SUPPRESS,
        help="orchestrator API token (env HIVE_ORCHESTRATOR_API_TOKEN)",
    )
    group.add_argument(
        "--request-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help=f"per-request HTTP timeout (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )


def _given(what: str) -> Callable[[str], str]:
    """An option's value that must not be empty: ``--orchestrator ""`` (a script's unset
    variable) used to fall back to the environment or the default without a word."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return text

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also nan
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SECONDS:.0f} seconds (7 days): {text!r}"
        )
    return value


def _page_size(maximum: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}: {text!r}")
        return value

    return parse


def _id_argument(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        if not ID_PATTERN.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid {what}: use letters, digits and . _ : -, "
                "starting with a letter or digit"
            )
        return text

    return parse


_plan_id = _id_argument("plan id")
_task_id = _id_argument("task id")


def _uuid_argument(what: str, where: str = "") -> Callable[[str], str]:
    """Ticket and worker ids are UUIDs: anything else names nothing, and ``.``, ``..`` or
    ``<id>/events`` would reach another route. Sent in the canonical form."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        try:
            return str(uuid.UUID(text))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid {what}: it must be a UUID{where}"
            ) from None

    return parse


_ticket_id = _uuid_argument("ticket id")
_worker_id = _uuid_argument("worker id", " (`hive workers list` shows them)")


def _label_filter(text: str) -> str:
    """``KEY=VALUE`` (the registry checks the key and the value themselves)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def _filter_value(what: str) -> Callable[[str], str]:
    """A listing filter: an empty one would silently list everything (e.g. ``--worker
    "$W"`` with ``W`` unset), so it is refused. (Such options default to None: argparse
    runs a string default through ``type``.)"""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return text

    return parse


def _status_filter(text: str) -> str:
    if not any(s.strip() for s in text.split(",")):
        raise argparse.ArgumentTypeError(f"status must not be empty: {text!r}")
    return text


def _paging_options(parser: argparse.ArgumentParser, *, max_page_size: int | None = None) -> None:
    """``max_page_size``: the service refuses larger pages (else it lowers them itself)."""
    help_text = "page size (default and maximum: the service's)"
    if max_page_size:
        help_text = f"page size (default: the service's; at most {max_page_size})"
    parser.add_argument(
        "--limit", type=_page_size(max_page_size), default=0, metavar="N", help=help_text
    )
    parser.add_argument("--page-token", default="", help="continue from a previous page")
    parser.add_argument("--all", action="store_true", help="follow every page")


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=_seconds,
        default=DEFAULT_WATCH_INTERVAL,
        metavar="SECONDS",
        help=f"poll interval (default {DEFAULT_WATCH_INTERVAL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop watching after this long (exit 8); the plan keeps running",
    )


def build_parser(
    *, out: TextIO = sys.stdout, err: TextIO = sys.stderr, json_errors: bool = False
) -> HiveArgumentParser:
    """The whole ``hive`` command tree; ``json_errors``: usage errors as JSON on ``err``."""
    parsers: list[HiveArgumentParser] = []

    def bind(parser: HiveArgumentParser) -> HiveArgumentParser:
        parser.out, parser.err, parser.json_errors = out, err, json_errors
        parsers.append(parser)
        return parser

    root = bind(
        HiveArgumentParser(
            prog="hive",
            description=DESCRIPTION,
            epilog=describe_exit_codes(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _global_options(root)
    groups = root.add_subparsers(dest="group", metavar="{plan,tickets,workers}", required=True)

    def leaf(
        sub: argparse._SubParsersAction[HiveArgumentParser], name: str, help_text: str
    ) -> HiveArgumentParser:
        parser = bind(
            sub.add_parser(
                name,
                help=help_text,
                description=help_text,
                epilog=describe_exit_codes(),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
        _global_options(parser)
        return parser

    plan = bind(groups.add_parser("plan", help="submit, watch and inspect plans"))
    _global_options(plan)
    plan_cmds = plan.add_subparsers(dest="command", metavar="COMMAND", required=True)

    submit = leaf(plan_cmds, "submit", "submit a plan file (JSON; '-' reads standard input)")
    submit.add_argument("file", help="plan file, or - for standard input")
    submit.add_argument("--watch", "-w", action="store_true", help="follow the plan to the end")
    submit.add_argument(
        "--strict",
        action="store_true",
        help="reject the plan if a required capability has no live worker",
    )
    _watch_options(submit)

    status = leaf(plan_cmds, "status", "a plan's status and its tickets")
    status.add_argument("plan_id", type=_plan_id)

    watch = leaf(plan_cmds, "watch", "follow a submitted plan until it finishes")
    watch.add_argument("plan_id", type=_plan_id)
    _watch_options(watch)

    listing = leaf(plan_cmds, "list", "plans, newest first")
    listing.add_argument(
        "--status",
        action="append",
        type=_status_filter,
        default=[],
        help="only these statuses (repeat or a,b)",
    )
    _paging_options(listing, max_page_size=MAX_PLANS_PAGE_SIZE)

    cancel = leaf(plan_cmds, "cancel", "cancel a plan and every ticket in flight")
    cancel.add_argument("plan_id", type=_plan_id)

    explain = leaf(
        plan_cmds, "explain", "why tasks are not running (or why one task is where it is)"
    )
    explain.add_argument("plan_id", type=_plan_id)
    explain.add_argument("task_id", nargs="?", type=_task_id, help="one task only")
    explain.add_argument(
        "--all",
        action="store_true",
        help="every task, running and finished too (not with TASK)",
    )

    tickets = bind(groups.add_parser("tickets", help="execution tickets (ticket service)"))
    _global_options(tickets)
    ticket_cmds = tickets.add_subparsers(dest="command", metavar="COMMAND", required=True)
    tickets_list = leaf(ticket_cmds, "list", "list tickets, oldest first")
    tickets_list.add_argument(
        "--plan", type=_plan_id, default=None, metavar="PLAN_ID", help="only this plan"
    )
    tickets_list.add_argument(
        "--status",
        action="append",
        type=_status_filter,
        default=[],
        help="only these statuses (repeat or a,b)",
    )
    tickets_list.add_argument(
        "--worker",
        type=_worker_id,  # a name listed nothing, silently
        default=None,
        metavar="WORKER_ID",
        help="only this worker (its id)",
    )
    _paging_options(tickets_list)
    tickets_show = leaf(ticket_cmds, "show", "one ticket: status, error, parameters and result")
    tickets_show.add_argument("ticket_id", type=_ticket_id)
    tickets_show.add_argument(
        "--events", action="store_true", help="and its audit history, oldest first"
    )

    workers = bind(groups.add_parser("workers", help="registered workers (service registry)"))
    _global_options(workers)
    worker_cmds = workers.add_subparsers(dest="command", metavar="COMMAND", required=True)
    workers_list = leaf(worker_cmds, "list", "list registered workers")
    workers_list.add_argument(
        "--capability",
        type=_filter_value("capability"),
        default=None,
        help="only workers with this capability",
    )
    workers_list.add_argument(
        "--status",
        action="append",
        type=_status_filter,
        default=[],
        help="HEALTHY, UNHEALTHY, DRAINING (repeat or a,b)",
    )
    workers_list.add_argument(
        "--label",
        action="append",
        type=_label_filter,
        default=[],
        metavar="KEY=VALUE",
        help="only workers with this label (repeat: all of them)",
    )
    workers_list.add_argument(
        "--namespace", type=_filter_value("namespace"), default=None, help="registry namespace"
    )
    _paging_options(workers_list)
    workers_show = leaf(worker_cmds, "show", "one worker: status, capabilities, load, record")
    workers_show.add_argument("worker_id", type=_worker_id)

    return root


@dataclass(frozen=True)
class Settings:
    """Global options resolved against the environment and the defaults."""

    urls: dict[str, str]
    output: str
    request_timeout: float
    credentials: Credentials


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flags win over the environment, which wins over the built-in defaults."""
    urls = {}
    for service, default in DEFAULT_URLS.items():
        flag = getattr(args, service, None)
        url = flag or env.get(URL_ENV[service]) or default
        # What the user set: the flag, or else the environment variable.
        source = f"--{service}" if flag else URL_ENV[service]
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"{source} must be an http:// or https:// URL, not {url!r}")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise UsageError(f"{source}: invalid URL {url!r}: {exc}") from exc
        if not parsed.host:
            raise UsageError(f"{source}: invalid URL {url!r}: no host")
        if parsed.port is not None and not 0 < parsed.port <= 65535:
            raise UsageError(f"{source}: invalid URL {url!r}: port must be 1-65535")
        urls[service] = url
    output = getattr(args, "output", None) or env.get("HIVE_OUTPUT") or "table"
    if output not in ("table", "json"):
        raise UsageError(f"HIVE_OUTPUT must be table or json, not {output!r}")
    try:
        credentials = resolve_credentials(
            token=getattr(args, "token", None), api_token=getattr(args, "api_token", None), env=env
        )
    except CredentialsError as exc:
        raise UsageError(str(exc)) from exc
    timeout = getattr(args, "request_timeout", None) or DEFAULT_REQUEST_TIMEOUT
    return Settings(urls, output, timeout, credentials)


def build_api(settings: Settings, *, transport: httpx.BaseTransport | None = None) -> HiveApi:
    credentials = settings.credentials

    def client(name: str, token: Callable[[], str | None]) -> ServiceClient:
        return ServiceClient(
            name=name,
            base_url=settings.urls[name],
            token=token,
            timeout=settings.request_timeout,
            transport=transport,
        )

    return HiveApi(
        orchestrator=client("orchestrator", credentials.orchestrator()),
        tickets=client("tickets", credentials.service()),
        registry=client("registry", credentials.service()),
    )


def _statuses(values: Sequence[str]) -> list[str]:
    return [s.strip().upper() for value in values for s in value.split(",") if s.strip()]


def read_plan(path: str, stdin: IO[bytes] | None) -> bytes:
    """The plan file's bytes; a local check that it is JSON gives a clearer error than the
    server's, which still validates everything else."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            if stdin is None:
                raise UsageError("no standard input to read the plan from")
            raw = stdin.read()
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read plan file {name}: {exc.strerror or exc}") from exc
    try:
        # The orchestrator reads UTF-8 only; json.loads(bytes) would also guess UTF-16/32.
        # What else the orchestrator refuses (duplicate keys, lone surrogates ...) it
        # reports with its path.
        json.loads(raw.decode("utf-8"), parse_int=_bounded_int)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:  # from _bounded_int
        raise UsageError(f"{name} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise UsageError(f"{name} nests too deeply to be a plan") from exc
    return raw


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"number too large: an integer of {digits} digits")
    return int(text)


class Command:
    """One run of ``hive``: the parsed arguments, settings, API and streams."""

    def __init__(
        self, args: argparse.Namespace, settings: Settings, api: HiveApi, streams: Streams
    ) -> None:
        self.args = args
        self.settings = settings
        self.api = api
        self.streams = streams
        # The plan being watched, for the Ctrl-C message.
        self.watching: str | None = None

    @property
    def json_output(self) -> bool:
        return self.settings.output == "json"

    def emit(self, body: object, text: Callable[[], str]) -> None:
        self.streams.out.write((to_json(body) if self.json_output else text()) + "\n")

    def info(self, text: str) -> None:
        """Human-only remarks; stderr, so stdout stays clean for pipes."""
        self.streams.err.write(text + "\n")

    def run(self) -> int:
        handler: Callable[[], int] = getattr(self, f"_{self.args.group}_{self.args.command}")
        return handler()

    # plan ...
    def _plan_submit(self) -> int:
        raw = read_plan(self.args.file, self.streams.stdin)
        body = self.api.submit_plan(raw, strict=self.args.strict)
        if not self.args.watch:
            self.emit(body, lambda: submission_text(body))
            return ExitCode.OK
        if not self.json_output:
            self.streams.out.write(submission_text(body) + "\n\n")
            self.streams.out.flush()
        final, elapsed = self._watch(str(body["plan_id"]))
        if self.json_output:
            final = {
                **final,
                "created": body.get("created"),
                "ticket_ids": {t.get("task_id"): t.get("ticket_id") for t in final["tickets"]},
                "warnings": body.get("warnings", []),
            }
        return self._finish_watch(final, elapsed)

    def _plan_watch(self) -> int:
        return self._finish_watch(*self._watch(self.args.plan_id))

    def _watch(self, plan_id: str) -> tuple[JsonObject, float]:
        """The terminal snapshot and the seconds spent watching."""
        # Progress is for people: stdout in table mode, stderr when stdout carries JSON.
        stream = self.streams.err if self.json_output else self.streams.out
        watcher = PlanWatcher(
            api=self.api,
            display=display_for(stream),
            interval=self.args.interval,
            timeout=self.args.timeout,
        )
        self.watching = plan_id
        started = time.monotonic()
        final = watcher.watch(plan_id)
        return final, time.monotonic() - started

    def _finish_watch(self, final: JsonObject, elapsed: float) -> int:
        self.emit(final, lambda: final_summary(final, elapsed=elapsed))
        return plan_exit_code(final)

    def _plan_status(self) -> int:
        plan = self.api.get_plan(self.args.plan_id)
        self.emit(plan, lambda: plan_detail(plan))
        return ExitCode.OK

    def _plan_list(self) -> int:
        body = self._pages(
            "plans",
            lambda token: self.api.list_plans(
                page_size=self.args.limit,
                page_token=token,
                statuses=_statuses(self.args.status),
            ),
        )
        return self._emit_page(body, "plans", plans_table)

    def _plan_cancel(self) -> int:
        body = self.api.cancel_plan(self.args.plan_id)

        def text() -> str:
            if body.get("cancel_requested"):
                return f"plan {body.get('plan_id')}: cancel requested ({body.get('status')})"
            return f"plan {body.get('plan_id')} was already cancelled"

        self.emit(body, text)
        return ExitCode.OK

    def _plan_explain(self) -> int:
        if self.args.task_id and self.args.all:
            # One task's explanation is given whatever its status: --all would change nothing.
            raise UsageError("--all explains every task of a plan: leave it out with a TASK")
        if self.args.task_id:
            body = self.api.explain_task(self.args.plan_id, self.args.task_id)
        else:
            body = self.api.explain_plan(self.args.plan_id, all_tasks=self.args.all)
        self.emit(body, lambda: explanations_text(body))
        return ExitCode.OK

    # tickets / workers
    def _tickets_list(self) -> int:
        body = self._pages(
            "tickets",
            lambda token: self.api.list_tickets(
                plan_id=self.args.plan or "",
                statuses=_statuses(self.args.status),
                worker_id=self.args.worker or "",
                page_size=self.args.limit,
                page_token=token,
            ),
        )
        return self._emit_page(body, "tickets", tickets_table)

    def _tickets_show(self) -> int:
        ticket = self.api.get_ticket(self.args.ticket_id)
        events = None
        truncated = False
        if self.args.events:
            history = self.api.ticket_events(self.args.ticket_id)
            events = list(history.get("events") or [])
            truncated = bool(history.get("truncated"))
        body = ticket if events is None else {**ticket, "events": events, "truncated": truncated}
        self.emit(body, lambda: ticket_detail(ticket, events, truncated=truncated))
        return ExitCode.OK

    def _workers_list(self) -> int:
        body = self._pages(
            "workers",
            lambda token: self.api.list_workers(
                capability=self.args.capability or "",
                statuses=_statuses(self.args.status),
                labels=self.args.label,
                namespace=self.args.namespace or "",
                page_size=self.args.limit,
                page_token=token,
            ),
        )
        return self._emit_page(body, "workers", workers_table)

    def _workers_show(self) -> int:
        worker = self.api.get_worker(self.args.worker_id)
        self.emit(worker, lambda: worker_detail(worker))
        return ExitCode.OK

    def _pages(self, key: str, fetch: Callable[[str], JsonObject]) -> JsonObject:
        """One page, or with ``--all`` every page merged into one answer."""
        body = fetch(self.args.page_token)
        if not self.args.all:
            return body
        items: list[Any] = list(body.get(key) or [])
        while body.get("next_page_token"):
            body = fetch(str(body["next_page_token"]))
            items.extend(body.get(key) or [])
        return {key: items, "next_page_token": ""}

    def _emit_page(
        self, body: JsonObject, key: str, render: Callable[[list[JsonObject]], str]
    ) -> int:
        items = list(body.get(key) or [])
        if self.json_output:
            self.emit(body, str)
            return ExitCode.OK
        if items:
            self.streams.out.write(render(items) + "\n")
        else:
            self.info(f"no {key} found")
        if body.get("next_page_token"):
            self.info(f"more {key}: add --page-token {body['next_page_token']} (or --all)")
        return ExitCode.OK


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Run ``hive`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if stdin is None:
        stdin = getattr(sys.stdin, "buffer", None)
    environment = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    # Known before parsing, so that every error, the parser's own too, follows it.
    json_errors = output_of(argv, environment) == "json"
    parser = build_parser(out=out, err=err, json_errors=json_errors)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE

    command: Command | None = None
    try:
        settings = resolve_settings(args, environment)
        json_errors = settings.output == "json"
        with build_api(settings, transport=transport) as api:
            command = Command(args, settings, api, Streams(out, err, stdin))
            return command.run()
    except UsageError as exc:
        _report(err, json_errors, usage_error_json(str(exc)), f"error: {exc}")
        return ExitCode.USAGE
    except ApiError as exc:
        hint = None
        if exc.exit_code is ExitCode.AUTH and command is not None:
            hint = auth_hint(command.settings.credentials, exc.service)
        elif exc.from_another_service:
            hint = f"is {exc.url} the {exc.service}'s HTTP URL? (--{exc.service})"
        _report(err, json_errors, error_json(exc), error_text(exc, hint=hint))
        return exc.exit_code
    except ServiceUnreachable as exc:
        _report(err, json_errors, error_json(exc), error_text(exc))
        return ExitCode.UNAVAILABLE
    except WatchTimeout as exc:
        plan_id = exc.plan.get("plan_id")
        message = f"{exc}; it keeps running (hive plan watch {plan_id})"
        body = {
            "error": {
                "code": "WATCH_TIMEOUT",
                "message": message,
                "details": {"plan_id": plan_id, "status": exc.plan.get("status")},
            }
        }
        _report(err, json_errors, body, f"timed out: {message}")
        if json_errors:
            out.write(to_json(exc.plan) + "\n")
        return ExitCode.WATCH_TIMEOUT
    except KeyboardInterrupt:
        watching = command.watching if command is not None else None
        message = "interrupted"
        if watching:
            message += f"; plan {watching} keeps running (hive plan watch {watching})"
        details = {"plan_id": watching} if watching else {}
        body = {"error": {"code": "INTERRUPTED", "message": message, "details": details}}
        _report(err, json_errors, body, f"\n{message}")
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a bug in the CLI: one line, not a stack trace
        if environment.get("HIVE_DEBUG"):
            raise
        message = f"internal error in hive: {type(exc).__name__}: {exc}"
        body = {"error": {"code": "INTERNAL", "message": message, "details": {}}}
        _report(err, json_errors, body, f"error: {message} (HIVE_DEBUG=1 shows the traceback)")
        return ExitCode.SERVER_ERROR


def output_of(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The output format (``-o``/``--output``, else ``HIVE_OUTPUT``) read from the raw
    command line, as argparse would (``-ojson``, ``--output=json``, ``--out json``; the last
    one wins), for errors found before or while the command line is parsed."""
    output = env.get("HIVE_OUTPUT") or "table"
    args = iter(argv)
    for arg in args:
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if name == "-o" or (name.startswith("--ou") and "--output".startswith(name)):
            output = value if equals else next(args, output)
        elif arg.startswith("-o"):
            output = arg[2:]
    return output


def _report(err: TextIO, as_json: bool, body: JsonObject, text: str) -> None:
    err.write((to_json(body) if as_json else text) + "\n")
    err.flush()
