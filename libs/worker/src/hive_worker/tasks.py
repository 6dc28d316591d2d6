"""Built-in task types: echo, sleep, fail, http_get and shell.

Parameters arrive from a ``google.protobuf.Struct``, so every number is a float; handlers
accept whole floats where an integer is meant. Bad parameters raise
:class:`~hive_worker.handlers.InvalidParameters` (a permanent failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shlex
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPMessage
from typing import IO, Any

from hive_worker.handlers import (
    InvalidParameters,
    PermanentTaskError,
    TaskContext,
    TaskError,
    TaskHandler,
)

# Statuses worth retrying although they are 4xx.
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})


def _number(params: Mapping[str, Any], name: str, *, default: float | None = None) -> float:
    value = params.get(name, default)
    if value is None:
        raise InvalidParameters(name, "is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameters(name, "must be a number")
    return float(value)


def _text(params: Mapping[str, Any], name: str, *, default: str | None = None) -> str:
    value = params.get(name, default)
    if value is None:
        raise InvalidParameters(name, "is required")
    if not isinstance(value, str):
        raise InvalidParameters(name, "must be a string")
    return value


def _flag(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidParameters(name, "must be true or false")
    return value


def _excerpt(data: bytes, limit: int) -> tuple[str, bool]:
    """The first ``limit`` bytes as text (invalid UTF-8 replaced) and whether it was cut."""
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


async def echo(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Return the parameters unchanged."""
    return dict(params)


@dataclass(frozen=True, slots=True)
class SleepTask:
    """``{"seconds": n}``: wait ``n`` seconds (0 <= n <= ``max_seconds``)."""

    max_seconds: float

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        seconds = _number(params, "seconds")
        if not 0 <= seconds <= self.max_seconds:
            raise InvalidParameters("seconds", f"must be between 0 and {self.max_seconds:g}")
        await asyncio.sleep(seconds)
        return {"slept_seconds": seconds}


async def fail(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """``{"message": str, "permanent": bool}``: always fail, for testing retries."""
    message = _text(params, "message", default="failed on purpose")
    raise TaskError(message, permanent=_flag(params, "permanent"))


class _RedirectRefused(Exception):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http/https only (urllib also allows ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise _RedirectRefused(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True, slots=True)
class HttpGetTask:
    """``{"url": str, "timeout_seconds": n}``: GET an http(s) URL.

    Returns ``status``, ``content_type``, a ``body`` excerpt of at most ``max_body_bytes``
    and ``truncated``. A 4xx answer is a permanent failure (except 408, 425, 429), a 5xx
    or a network error a retryable one; the failure's result carries the same fields.
    """

    default_timeout_seconds: float
    max_timeout_seconds: float
    max_body_bytes: int

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        url = _text(params, "url")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidParameters("url", "must be an http:// or https:// URL with a host")
        timeout = _number(params, "timeout_seconds", default=self.default_timeout_seconds)
        if not 0 < timeout <= self.max_timeout_seconds:
            raise InvalidParameters(
                "timeout_seconds", f"must be above 0 and at most {self.max_timeout_seconds:g}"
            )
        status, content_type, body = await asyncio.to_thread(self._fetch, url, timeout)
        text, truncated = _excerpt(body, self.max_body_bytes)
        result = {
            "url": url,
            "status": status,
            "content_type": content_type,
            "body": text,
            "truncated": truncated,
        }
        if status >= 400:
            permanent = status < 500 and status not in _RETRYABLE_CLIENT_STATUSES
            raise TaskError(f"GET {url} answered {status}", permanent=permanent, result=result)
        return result

    def _fetch(self, url: str, timeout: float) -> tuple[int, str, bytes]:
        opener = urllib.request.build_opener(_HttpOnlyRedirects())
        request = urllib.request.Request(url, method="GET", headers={"User-Agent": "hive-worker"})
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(self.max_body_bytes + 1)
                return response.status, response.headers.get_content_type(), body
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                if 300 <= exc.code < 400:
                    # A redirect urllib would not follow: a loop, or to a scheme it refuses.
                    raise PermanentTaskError(
                        f"GET {url}: redirect not followed ({exc.code}: {exc.reason})"
                    ) from exc
                body = exc.read(self.max_body_bytes + 1) if exc.fp is not None else b""
                content_type = exc.headers.get_content_type() if exc.headers else ""
                return exc.code, content_type, body
        except _RedirectRefused as exc:
            raise PermanentTaskError(f"GET {url} redirected to a non-HTTP URL: {exc}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TaskError(f"GET {url} failed: {reason}") from exc


def program_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The environment of a ``shell`` task's program: the worker's own without its
    configuration (``HIVE_*``: the registration secret among it), which a program run on
    a plan's behalf has no business reading."""
    return {k: v for k, v in environment.items() if not k.startswith("HIVE_")}


@dataclass(frozen=True, slots=True)
class ShellTask:
    """``{"cmd": "make test"}`` or ``{"argv": ["make", "test"]}``, optional
    ``timeout_seconds``: run a program WITHOUT a shell.

    ``cmd`` is split with :func:`shlex.split`; ``argv[0]`` must equal an entry of the
    allow-list exactly (no path or basename matching, so ``/tmp/x/make`` is not
    ``make``). Returns ``exit_code`` and bounded ``stdout`` / ``stderr``; a non-zero exit
    is a retryable failure carrying the same fields, a disallowed program a permanent one.
    The program gets the worker's environment without ``HIVE_*`` (see
    :func:`program_environment`).
    """

    allow_list: Sequence[str]
    max_output_bytes: int
    default_timeout_seconds: float

    def argv(self, params: Mapping[str, Any]) -> list[str]:
        """The validated argument vector (raises :class:`InvalidParameters`)."""
        if ("cmd" in params) == ("argv" in params):
            raise InvalidParameters("cmd", "give exactly one of cmd (a string) or argv (a list)")
        if "cmd" in params:
            try:
                argv = shlex.split(_text(params, "cmd"))
            except ValueError as exc:
                raise InvalidParameters("cmd", f"cannot be split: {exc}") from exc
            name = "cmd"
        else:
            raw = params["argv"]
            if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
                raise InvalidParameters("argv", "must be a list of strings")
            argv, name = list(raw), "argv"
        if not argv or not argv[0]:
            raise InvalidParameters(name, "names no program")
        if argv[0] not in self.allow_list:
            allowed = ", ".join(self.allow_list) or "none"
            raise PermanentTaskError(
                f"program {argv[0]!r} is not in the shell allow-list (allowed: {allowed})"
            )
        return argv

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        argv = self.argv(params)
        timeout = _number(params, "timeout_seconds", default=self.default_timeout_seconds)
        if timeout <= 0:
            raise InvalidParameters("timeout_seconds", "must be above 0")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=program_environment(os.environ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            # Another worker may have the program: retryable.
            raise TaskError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                stdout, stderr, _ = await asyncio.gather(
                    self._bounded(process.stdout), self._bounded(process.stderr), process.wait()
                )
        except TimeoutError:
            await _kill(process)
            raise TaskError(f"{argv[0]} timed out after {timeout:g}s") from None
        except BaseException:  # cancelled (ticket timeout, shutdown): never leave it running
            await _kill(process)
            raise
        out, out_cut = _excerpt(stdout, self.max_output_bytes)
        err, err_cut = _excerpt(stderr, self.max_output_bytes)
        result = {
            "argv": argv,
            "exit_code": process.returncode,
            "stdout": out,
            "stderr": err,
            "stdout_truncated": out_cut,
            "stderr_truncated": err_cut,
        }
        if process.returncode != 0:
            raise TaskError(f"{argv[0]} exited with {process.returncode}", result=result)
        return result

    async def _bounded(self, stream: asyncio.StreamReader) -> bytes:
        """Read to EOF keeping at most one byte more than the limit (to flag truncation)."""
        kept = bytearray()
        while chunk := await stream.read(65536):
            room = self.max_output_bytes + 1 - len(kept)
            if room > 0:
                kept += chunk[:room]
        return bytes(kept)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    # Shielded: a cancelled caller still reaps the child (no zombie).
    with contextlib.suppress(Exception):
        await asyncio.shield(process.wait())


def builtin_tasks(
    *,
    sleep_max_seconds: float,
    shell_allow_list: Sequence[str],
    shell_max_output_bytes: int,
    shell_timeout_seconds: float,
    http_get_timeout_seconds: float,
    http_get_max_timeout_seconds: float,
    http_get_max_body_bytes: int,
) -> dict[str, TaskHandler]:
    """The built-in handlers by task type, configured."""
    return {
        "echo": echo,
        "sleep": SleepTask(max_seconds=sleep_max_seconds),
        "fail": fail,
        "http_get": HttpGetTask(
            default_timeout_seconds=min(http_get_timeout_seconds, http_get_max_timeout_seconds),
            max_timeout_seconds=http_get_max_timeout_seconds,
            max_body_bytes=http_get_max_body_bytes,
        ),
        "shell": ShellTask(
            allow_list=tuple(shell_allow_list),
            max_output_bytes=shell_max_output_bytes,
            default_timeout_seconds=shell_timeout_seconds,
        ),
    }


__all__ = ["HttpGetTask", "ShellTask", "SleepTask", "builtin_tasks", "echo", "fail"]
