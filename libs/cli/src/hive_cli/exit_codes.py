"""Exit codes scripts can rely on, and the mapping from HTTP answers to them."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status of ``hive``; listed in ``hive --help`` and the README."""

    OK = 0
    PLAN_UNSUCCESSFUL = 1
    USAGE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    UNAVAILABLE = 5
    AUTH = 6
    SERVER_ERROR = 7
    WATCH_TIMEOUT = 8
    INTERRUPTED = 130


def exit_code_for_status(status: int) -> ExitCode:
    """The exit code for an HTTP error status of one of the services."""
    if status in (400, 413, 415, 422):
        return ExitCode.USAGE
    if status == 404:
        return ExitCode.NOT_FOUND
    if status in (409, 412):
        return ExitCode.CONFLICT
    if status in (401, 403):
        return ExitCode.AUTH
    if status in (429, 502, 503, 504):
        return ExitCode.UNAVAILABLE
    return ExitCode.SERVER_ERROR


def describe_exit_codes() -> str:
    """The exit-code table for ``--help``."""
    lines = ["exit codes:"]
    for code in ExitCode:
        doc = _DESCRIPTIONS[code]
        lines.append(f"  {code.value:<4} {doc}")
    return "\n".join(lines)


_DESCRIPTIONS: dict[ExitCode, str] = {
    ExitCode.OK: "success (a watched plan COMPLETED)",
    ExitCode.PLAN_UNSUCCESSFUL: "a watched plan ended FAILED or CANCELLED",
    ExitCode.USAGE: "usage error or invalid input (plan validation errors, with JSON paths)",
    ExitCode.NOT_FOUND: "plan, task, ticket or worker not found",
    ExitCode.CONFLICT: "conflict (same plan id, different body; plan already finished)",
    ExitCode.UNAVAILABLE: "service unreachable, unavailable or timed out",
    ExitCode.AUTH: "credentials missing or rejected (401/403)",
    ExitCode.SERVER_ERROR: "internal service error or unexpected answer",
    ExitCode.WATCH_TIMEOUT: "--timeout elapsed before the watched plan finished",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); a submitted plan keeps running",
}
