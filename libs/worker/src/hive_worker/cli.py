"""``hive-worker``: run the reference worker from the command line.

Every flag overrides the matching ``HIVE_WORKER_*`` environment variable. The
registration secret is read from the environment only (``HIVE_WORKER_REGISTRATION_SECRET``)
so it never shows up in a process listing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from hive_common.config import invalid_settings_message
from hive_common.errors import HiveError, describe_error
from hive_common.heap import freeze_heap
from hive_common.logging import configure_logging, get_logger
from hive_worker.config import WorkerSettings
from hive_worker.sdk import Worker


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option defaults to "not given": env or default applies)."""
    parser = argparse.ArgumentParser(
        prog="hive-worker",
        description="Hive Flow C reference worker: runs echo, sleep, fail, http_get and "
        "shell tickets assigned to it.",
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("--registry", dest="registry_target", help="registry gRPC host:port")
    add("--tickets", dest="tickets_target", help="ticket service gRPC host:port")
    add("--name", help="stable worker name (default: host name)")
    add("--namespace", help="registry namespace")
    add("--capabilities", help="comma-separated capabilities, e.g. python,shell")
    add(
        "--label",
        dest="label",
        action="append",
        metavar="KEY=VALUE",
        help="a label (repeatable)",
    )
    add("--max-concurrent", dest="max_concurrent", type=int, help="tasks run at once")
    add(
        "--heartbeat-interval",
        dest="heartbeat_interval_seconds",
        type=float,
        help="seconds between heartbeats (default: what the registry asks for)",
    )
    add(
        "--drain-grace",
        dest="drain_grace_seconds",
        type=float,
        help="seconds running tasks get to finish after SIGTERM",
    )
    add(
        "--shell-allow",
        dest="shell_allow_list",
        help="comma-separated programs the shell task may run (exact argv[0])",
    )
    add(
        "--http-get-allow",
        dest="http_get_allow_networks",
        help="comma-separated internal networks (CIDRs) http_get may reach, e.g. 10.0.0.0/8",
    )
    add("--sleep-max", dest="sleep_max_seconds", type=float, help="longest allowed sleep task")
    add("--log-level", dest="log_level")
    add("--log-format", dest="log_format", choices=["auto", "json", "pretty"])
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> WorkerSettings:
    """Environment settings overridden by the command line."""
    values: dict[str, Any] = vars(build_parser().parse_args(argv))
    labels = values.pop("label", None)
    if labels is not None:
        # One label per flag, split at its first "=": a value may hold commas.
        pairs = [label.partition("=") for label in labels]
        bad = [
            label
            for label, (key, sep, _) in zip(labels, pairs, strict=True)
            if not sep or not key.strip()
        ]
        values["labels"] = (
            bad[0] if bad else {key.strip(): value.strip() for key, _, value in pairs}
        )  # a bad one is refused by the settings, naming it
    return WorkerSettings(**values)


_EXIT_BOUND_SECONDS = 5.0
"""How long the process may take to end after a drain before it exits anyway."""


def _exit_anyway_after(seconds: float, worker: Worker) -> threading.Timer:
    """Exit 0 ``seconds`` from now if the process has not ended by then: after the drain,
    ``asyncio.run`` waits for handlers that ignore their cancellation and for threads
    (``asyncio.to_thread``) still running, which nothing can stop. Their attempts were
    already reported (worker lost, re-queued), so exiting loses nothing."""

    def expire() -> None:
        get_logger("hive_worker").warning(
            "process still busy after the drain (a handler ignoring its cancellation or "
            "a handler's thread); exiting anyway",
            waited_seconds=seconds,
            tickets=worker.unstopped_handlers,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True  # a process that ends in time does not wait for it
    timer.start()
    return timer


async def _serve(settings: WorkerSettings) -> threading.Timer:
    """Run the worker; the timer that ends the process if the event loop's own ending
    (waiting for what the handlers left) outlasts the bound: cancel it once it is over."""
    worker = Worker(settings=settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await worker.run()
    return _exit_anyway_after(_EXIT_BOUND_SECONDS, worker)


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain, 1 on refusal, 2 on bad settings."""
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        prefix = WorkerSettings.model_config.get("env_prefix", "")
        flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
        flags["labels"] = flags.pop("label")  # the flag is one label, the setting all of them
        print(invalid_settings_message("hive-worker", exc, prefix, flags), file=sys.stderr)
        return 2
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    log = get_logger("hive_worker")
    try:
        # Cancelled once the loop is closed: main() may return to a caller that goes on.
        asyncio.run(_serve(settings)).cancel()
    except HiveError as exc:
        log.error("worker stopped", error=describe_error(exc))
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
