"""Built-in task types: echo, sleep, fail, http_get and shell.

Parameters arrive from a ``google.protobuf.Struct`` (every number a double); the worker
turns whole ones into ``int``, and handlers take either where a number is meant. Bad
parameters raise :class:`~hive_worker.handlers.InvalidParameters` (a permanent failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import math
import os
import re
import shlex
import socket
import subprocess
import threading
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http.client import HTTPMessage
from typing import IO, Any

from hive_common.text import shown
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


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

# A ``user:password@`` right after the scheme's ``//``, where urllib takes the authority
# from (tabs and line breaks, which it drops, removed first).
_USERINFO = re.compile(r"\A[^/?#]*//[^/?#]*@")


def _shown(value: str) -> str:
    """``value`` quoted for a message: cut short, control and invisible characters escaped
    by ``repr`` (a bidi override cannot reorder the message)."""
    return repr(shown(value))


def _valid_host(host: str, bracketed: bool) -> bool:
    """An IPv6 address in brackets, else a DNS name or IPv4 address (IDNA allowed)."""
    if bracketed:
        try:
            return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            return False
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.removesuffix(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _http_url(params: Mapping[str, Any]) -> str:
    """The ``url`` parameter, checked in full before any connection (else a malformed
    URL is a network error, retried): http/https, a valid host, a port of 1-65535, no
    whitespace, control or invisible formatting characters, ASCII outside the host, no
    ``user:password@`` (refused first, so that no message repeats it)."""
    url = _text(params, "url")
    if _USERINFO.match(re.sub(r"[\t\r\n]", "", url)):
        raise InvalidParameters(
            "url", "must not contain a user name or password (user:password@host)"
        )
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in url):
        raise InvalidParameters(
            "url", f"must not contain spaces or control characters: {_shown(url)}"
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed or invalid [IPv6] host
        raise InvalidParameters("url", f"is malformed ({exc}): {_shown(url)}") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidParameters("url", "must be an http:// or https:// URL with a host")
    if not _valid_host(host, bracketed=parts.netloc.startswith("[")):
        raise InvalidParameters("url", f"has an invalid host {_shown(host)}")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise InvalidParameters(
            "url", f"has an invalid port (a number from 1 to 65535): {_shown(url)}"
        )
    if not (parts.path + parts.query + parts.fragment).isascii():
        raise InvalidParameters(
            "url", f"must be ASCII outside the host (percent-encode the rest): {_shown(url)}"
        )
    return url


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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What makes an address internal, in the order a refusal names it.
_INTERNAL_KINDS = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


# NAT64's well-known prefix (RFC 6052): a gateway turns 64:ff9b::a.b.c.d into a.b.c.d.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to: IPv4-mapped, 6to4 (2002::/16, which
    Python counts as global whatever it embeds) or NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def internal_address_kind(address: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why ``address`` (an IP address) is one ``http_get`` must not reach ("loopback",
    "link-local", "private", ...), or None for a public address or one inside an
    ``allowed`` network. An IPv6 address embedding an IPv4 one (mapped, 6to4, NAT64)
    counts as that IPv4 address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    if any(ip in network for network in allowed):
        return None
    for attribute, kind in _INTERNAL_KINDS:
        if getattr(ip, attribute):
            return kind
    return None if ip.is_global else "non-public"  # e.g. 100.64.0.0/10 (carrier NAT)


class _DestinationRefused(Exception):
    """A host resolving to an internal address outside the allowed networks."""

    def __init__(self, host: str, kind: str) -> None:
        super().__init__(host, kind)
        self.host = host
        self.kind = kind


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http/https only (urllib also allows ftp), without credentials
    (urllib would take them for part of the host name). Where a redirect leads is checked
    like the first URL when its connection is made."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if _USERINFO.match(re.sub(r"[\t\r\n]", "", newurl)):
            fp.close()
            raise _RedirectRefused("to a URL with a user name or password")
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            fp.close()
            raise _RedirectRefused(f"to a non-HTTP URL: {_shown(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Sockets:
    """The sockets of a request running in a thread, for the event loop to end it:
    :meth:`shut` shuts them down, and any the thread connects later, so that a read
    blocked on one returns at once and the request fails."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sockets: list[socket.socket] = []
        self._shut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self._shut:
                self.shut()

    def shut(self) -> None:
        with self._lock:
            self._shut = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # closed already
                    sock.shutdown(socket.SHUT_RDWR)


class _TrackedConnection(http.client.HTTPConnection):
    """An HTTP connection that adds its socket, once connected, to ``sockets``, and only
    connects to a host whose addresses are all public or in ``allowed``."""

    def __init__(
        self, host: str, *, sockets: _Sockets, allowed: Sequence[Network], **kwargs: Any
    ) -> None:
        super().__init__(host, **kwargs)
        self._sockets = sockets
        self._allowed = allowed
        # connect() (TLS included, which still verifies the host name) opens its socket
        # with this.
        self._create_connection = self._connect_checked

    def _connect_checked(
        self,
        address: tuple[str, int],
        timeout: float | None,
        source_address: tuple[str, int] | None,
    ) -> socket.socket:
        """Resolve the host once, check every address, then connect to those addresses
        (not the name again: a second lookup could answer another address)."""
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            kind = internal_address_kind(str(sockaddr[0]), self._allowed)
            if kind is not None:
                raise _DestinationRefused(host, kind)
        error: OSError = OSError(f"no address for {host!r}")
        for *_, sockaddr in infos:
            try:
                return socket.create_connection((str(sockaddr[0]), port), timeout, source_address)
            except OSError as exc:
                error = exc
        raise error

    def connect(self) -> None:
        super().connect()
        self._sockets.add(self.sock)


class _TrackedHTTPSConnection(_TrackedConnection, http.client.HTTPSConnection):
    """An HTTPS connection that adds its socket, once connected (TLS included), to
    ``sockets``."""


class _TrackingHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """Opens http and https URLs (in place of urllib's handlers for them) over tracked
    connections."""

    def __init__(self, sockets: _Sockets, allowed: Sequence[Network]) -> None:
        super().__init__()
        self._sockets = sockets
        self._allowed = allowed

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(
            partial(_TrackedConnection, sockets=self._sockets, allowed=self._allowed), req
        )

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(
            partial(_TrackedHTTPSConnection, sockets=self._sockets, allowed=self._allowed), req
        )


@dataclass(frozen=True, slots=True)
class HttpGetTask:
    """``{"url": str, "timeout_seconds": n}``: GET an http(s) URL.

    Returns ``status``, ``content_type``, a ``body`` excerpt of at most ``max_body_bytes``
    and ``truncated``. A 4xx answer is a permanent failure (except 408, 425, 429), a 5xx
    or a network error a retryable one; the failure's result carries the same fields.
    A host (of the URL or of a redirect) resolving to an internal address (loopback,
    link-local, private, ... see :func:`internal_address_kind`) outside
    ``allowed_networks`` is a permanent failure, refused before connecting; the
    connection goes to the addresses checked. Proxies from the environment are not used.
    ``timeout_seconds`` is a deadline for the whole request (connecting, the headers, the
    body), past which it is a retryable failure. The request runs in a thread; when the
    handler stops waiting for it (the deadline, a cancel), its connection is shut down
    so that the thread stops as well.
    """

    default_timeout_seconds: float
    max_timeout_seconds: float
    max_body_bytes: int
    allowed_networks: Sequence[Network] = ()

    async def __call__(self, params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        url = _http_url(params)
        timeout = _number(params, "timeout_seconds", default=self.default_timeout_seconds)
        if not 0 < timeout <= self.max_timeout_seconds:
            raise InvalidParameters(
                "timeout_seconds", f"must be above 0 and at most {self.max_timeout_seconds:g}"
            )
        sockets = _Sockets()
        try:
            async with asyncio.timeout(timeout):
                fetched = await asyncio.to_thread(self._fetch, url, timeout, sockets)
        except TimeoutError:
            raise TaskError(f"GET {url} timed out after {timeout:g}s") from None
        finally:
            sockets.shut()  # the thread's request ends now if it still runs (timeout, cancel)
        status, content_type, body = fetched
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

    def _fetch(self, url: str, timeout: float, sockets: _Sockets) -> tuple[int, str, bytes]:
        opener = urllib.request.build_opener(
            # No proxy: the worker checks where it connects, which a proxy would decide.
            urllib.request.ProxyHandler({}),
            _HttpOnlyRedirects(),
            _TrackingHandler(sockets, self.allowed_networks),
        )
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
            raise PermanentTaskError(f"GET {url} redirected {exc}") from exc
        except _DestinationRefused as exc:
            allowed = ", ".join(str(n) for n in self.allowed_networks) or "none"
            raise PermanentTaskError(
                f"GET {url}: host {_shown(exc.host)} refused ({exc.kind} address): http_get "
                f"only reaches public addresses and the networks of HTTP_GET_ALLOW_NETWORKS "
                f"(allowed: {allowed})"
            ) from exc
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
    Past ``timeout_seconds`` (until the program has exited and its output ended) the
    program is killed: a retryable failure whose result has the output read until then
    and ``exit_code`` None.
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
            transport, output = await asyncio.get_running_loop().subprocess_exec(
                lambda: _Output(self.max_output_bytes),
                *argv,
                env=program_environment(os.environ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            # Another worker may have the program: retryable.
            raise TaskError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(output.finished)
        except TimeoutError:
            exit_code = None  # it, or a child of it holding its output, still ran
        else:
            exit_code = transport.get_returncode()
        finally:
            # Kills the program if it still runs (timed out, or cancelled: ticket timeout,
            # shutdown) and closes the pipes, which a child of it may hold open; then waits
            # until it is reaped (no zombie): at once, killed and with its pipes closed.
            transport.close()
            await asyncio.shield(output.finished)
        out, out_cut = _excerpt(output.stdout, self.max_output_bytes)
        err, err_cut = _excerpt(output.stderr, self.max_output_bytes)
        result = {
            "argv": argv,
            "exit_code": exit_code,
            "stdout": out,
            "stderr": err,
            "stdout_truncated": out_cut,
            "stderr_truncated": err_cut,
        }
        if exit_code is None:
            raise TaskError(f"{argv[0]} timed out after {timeout:g}s", result=result)
        if exit_code != 0:
            raise TaskError(f"{argv[0]} exited with {exit_code}", result=result)
        return result


class _Output(asyncio.SubprocessProtocol):
    """A program's stdout and stderr, keeping at most one byte more than ``limit`` of each
    (to flag truncation). It reads whatever comes, so a program never waits on a full
    pipe; ``finished`` is done once the program has exited and both pipes are closed."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept = {1: bytearray(), 2: bytearray()}
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def stdout(self) -> bytes:
        return bytes(self._kept[1])

    @property
    def stderr(self) -> bytes:
        return bytes(self._kept[2])

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        kept = self._kept[fd]
        room = self._limit + 1 - len(kept)
        if room > 0:
            kept += data[:room]

    def connection_lost(self, exc: Exception | None) -> None:
        self.finished.set_result(None)


def builtin_tasks(
    *,
    sleep_max_seconds: float,
    shell_allow_list: Sequence[str],
    shell_max_output_bytes: int,
    shell_timeout_seconds: float,
    http_get_timeout_seconds: float,
    http_get_max_timeout_seconds: float,
    http_get_max_body_bytes: int,
    http_get_allow_networks: Sequence[Network] = (),
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
            allowed_networks=tuple(http_get_allow_networks),
        ),
        "shell": ShellTask(
            allow_list=tuple(shell_allow_list),
            max_output_bytes=shell_max_output_bytes,
            default_timeout_seconds=shell_timeout_seconds,
        ),
    }


__all__ = [
    "HttpGetTask",
    "Network",
    "ShellTask",
    "SleepTask",
    "builtin_tasks",
    "echo",
    "fail",
    "internal_address_kind",
]
