"""The FastAPI application skeleton every service's HTTP API starts from.

:func:`create_http_app` gives

* ``GET /health``: 200 while the process runs (liveness / startup probe);
* ``GET /ready``: runs the service's readiness callable; 200 unless a check is ``down``
  (``degraded`` checks are reported but not fatal), 503 otherwise;
* one error shape for everything, ``{"error": {"code", "message", "details"}}``:
  ``HiveError`` -> its ``http_status``; request validation -> 400 ``INVALID_ARGUMENT`` with
  ``details.field_violations`` whose ``field`` is a JSON path (``body.tasks[2].task_id``,
  ``query.page_size``: every service names query parameters so, see
  :func:`query_violations`); Starlette HTTP errors (404 unknown route, 405 ...) -> their status;
  any other exception -> 500 ``INTERNAL`` with a generic message, logged with its stack;
* one canonical log line per request (method, path, route, status, duration_ms,
  request_id from ``x-request-id`` or generated, echoed back in the response header);
* optional HTTP metrics. OpenAPI stays at ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hive_common.errors import FieldViolation, HiveError, InvalidArgument
from hive_common.logging import (
    bind_request_context,
    clear_request_context,
    get_logger,
    request_id_from,
)
from hive_common.metrics import HttpMetrics

CheckStatus = Literal["ok", "degraded", "down"]


class CheckResult(TypedDict):
    """The outcome of one readiness check; ``detail`` is free-form (message, lag, ...)."""

    status: CheckStatus
    detail: NotRequired[Any]


ReadinessReport = Mapping[str, CheckResult]
ReadinessCheck = Callable[[], Awaitable[ReadinessReport]]
"""An async callable returning ``{check name: {"status": ..., "detail": ...}}``."""

IsoDateTime = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
"""A timestamp a response carries as an ISO 8601 string (documented as a date-time)."""

REQUEST_ID_HEADER = "x-request-id"
INTERNAL_ERROR_MESSAGE = "internal error"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before its answer
QUIET_PATHS: tuple[str, ...] = ("/health", "/ready", "/metrics")
"""Probe and scrape paths; their request lines are logged at DEBUG."""

_STATE_ERROR_CODE = "hive_error_code"

_DEPENDENCY_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
_CODE_BY_HTTP_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def overall_status(report: ReadinessReport) -> CheckStatus:
    """``down`` if any check is down, else ``degraded`` if any is, else ``ok``."""
    statuses = {result["status"] for result in report.values()}
    if "down" in statuses:
        return "down"
    if "degraded" in statuses:
        return "degraded"
    return "ok"


async def evaluate_readiness(
    readiness: ReadinessCheck | None, *, timeout_seconds: float
) -> tuple[CheckStatus, dict[str, CheckResult]]:
    """Run ``readiness`` once; a crash or timeout becomes a ``down`` check named ``readiness``."""
    if readiness is None:
        return "ok", {}
    try:
        async with asyncio.timeout(timeout_seconds):
            report = dict(await readiness())
    except TimeoutError:
        report = {"readiness": {"status": "down", "detail": f"timed out after {timeout_seconds}s"}}
    except Exception as exc:
        get_logger("hive.http").exception("readiness check failed")
        report = {"readiness": {"status": "down", "detail": type(exc).__name__}}
    return overall_status(report), report


LAST_ERROR_SECONDS = 0.5
"""How long :func:`check_dependency` gives ``last_error`` (a refused connection fails in
milliseconds; /ready must stay within the probes' timeouts)."""


async def check_dependency(
    probe: Callable[[], Awaitable[object]],
    *,
    timeout_seconds: float = 1.0,
    failed: CheckStatus = "down",
    last_error: Callable[[], Awaitable[str | None]] | None = None,
) -> CheckResult:
    """One dependency's readiness check: ok, or ``failed`` saying why (its error, or no
    answer within ``timeout_seconds``: a database that does not answer used to hold
    /ready until the whole check timed out, naming no dependency). ``last_error``: what
    the client last saw of the dependency, or a quick look of its own (at most
    :data:`LAST_ERROR_SECONDS`), said instead of "no answer" when the probe timed out (a
    driver that retries a refused connection until its own timeout).

    Keep /ready well within the probes' timeouts (compose and Kubernetes give it 3 s): run
    a service's checks concurrently (:func:`asyncio.gather`)."""
    try:
        async with asyncio.timeout(timeout_seconds):
            await probe()
    except TimeoutError:
        seen = None
        if last_error is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAST_ERROR_SECONDS):
                    seen = await last_error()
        return {"status": failed, "detail": seen or f"no answer within {timeout_seconds:g} s"}
    except HiveError as exc:
        return {"status": failed, "detail": exc.message}
    return {"status": "ok"}


def json_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path: ``("body", "tasks", 2, "id")`` ->
    ``body.tasks[2].id``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def validation_violations(errors: Sequence[Any]) -> list[FieldViolation]:
    """FastAPI/pydantic validation errors as field violations with JSON paths."""
    violations: list[FieldViolation] = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            # pydantic puts the character offset in loc; the body as a whole is invalid.
            loc = loc[:1]
        violations.append(FieldViolation(json_path(loc), str(error.get("msg", "invalid"))))
    return violations


def query_violations(violations: Iterable[FieldViolation]) -> list[FieldViolation]:
    """Violations of query parameters named as the HTTP APIs name them, as FastAPI does:
    ``page_size`` -> ``query.page_size`` (the domain names them bare, as gRPC fields)."""
    return [FieldViolation(f"query.{v.field}", v.description) for v in violations]


def error_response(error: HiveError, *, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON response for ``error`` (status from its class)."""
    return JSONResponse(error.to_dict(), status_code=error.http_status, headers=headers)


def _remember_error_code(request: Request, code: str) -> None:
    request.scope.setdefault("state", {})[_STATE_ERROR_CODE] = code


async def _hive_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HiveError)
    _remember_error_code(request, exc.code)
    return error_response(exc)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = InvalidArgument(
        "request validation failed", violations=validation_violations(exc.errors())
    )
    _remember_error_code(request, error.code)
    return error_response(error)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODE_BY_HTTP_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    _remember_error_code(request, code)
    body = {"error": {"code": code, "message": str(exc.detail), "details": {}}}
    headers = exc.headers
    if status == 405:
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return JSONResponse(body, status_code=status, headers=headers)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the path answers (Starlette names only the first
    route's: ``Allow: POST`` on a path with a GET route and a POST route); HEAD with GET,
    as the middleware answers it. Asked of the routes as the router asks them (included
    routers hold their routes inside)."""
    routes = request.app.router.routes
    methods = {
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    }
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _route_path(scope: Scope) -> str:
    """The path template of the route that answered (metrics label), "unmatched" if none.
    FastAPI's own routes (/openapi.json, /docs) are plain Starlette routes, which name
    their endpoint but not themselves: their paths have no parameters."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    return str(scope["path"]) if "endpoint" in scope else "unmatched"


def _without_empty_parameters(query_string: bytes) -> bytes:
    """``query_string`` without its empty parameters (``page_size=``, ``&status&``): a
    parameter given empty is one not given, whatever its type (an empty string filter was
    "unset" while an empty number was a 400)."""
    items = query_string.split(b"&")
    return b"&".join(item for item in items if item.partition(b"=")[2])


class RequestLoggingMiddleware:
    """Pure-ASGI middleware: request id, one log line per request, metrics, last-resort 500.

    Exceptions no handler took (anything but ``HiveError`` / validation / HTTP errors)
    are logged with their stack here and answered with a generic 500 body.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics | None = None,
        logger: Any | None = None,
        quiet_paths: Sequence[str] = QUIET_PATHS,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._logger = logger if logger is not None else get_logger("hive.http")
        self._quiet = frozenset(quiet_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = request_id_from(_incoming_request_id(scope))
        clear_request_context()
        bind_request_context(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False
        # HEAD is GET without the body, on every route that answers GET (FastAPI's routes
        # answer GET only: HEAD was a 405). The log line and metrics keep HEAD.
        head = scope["method"] == "HEAD"
        scope.setdefault("state", {})  # shared with the copy: handlers note error codes in it
        app_scope = {
            **scope,
            "method": "GET" if head else scope["method"],
            "query_string": _without_empty_parameters(scope.get("query_string", b"")),
        }

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(app_scope, receive, send_with_request_id)
        except ClientDisconnect:
            # The client went away before its request was read: there is nobody to answer,
            # and it is not a server error (nginx's 499 in the request line and metrics).
            if not response_started:
                status = CLIENT_CLOSED_REQUEST
        except Exception:
            self._logger.exception(
                "unhandled exception in request", method=scope["method"], path=scope["path"]
            )
            if response_started:
                raise  # too late for a clean 500; let the server drop the connection
            body = {"error": {"code": "INTERNAL", "message": INTERNAL_ERROR_MESSAGE, "details": {}}}
            await send_with_request_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send_with_request_id(
                {"type": "http.response.body", "body": json.dumps(body).encode()}
            )
        finally:
            self._finish(scope, _route_path(app_scope), status, time.perf_counter() - started)

    def _finish(self, scope: Scope, route_path: str, status: int, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.request_finished(scope["method"], route_path, status, seconds)
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "route": route_path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        client = scope.get("client")
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        state = scope.get("state")
        if isinstance(state, dict) and _STATE_ERROR_CODE in state:
            fields["error_code"] = state[_STATE_ERROR_CODE]
        elif status >= 500:
            fields["error_code"] = _CODE_BY_HTTP_STATUS.get(status, "INTERNAL")
        if fields.get("error_code") in _DEPENDENCY_CODES:
            # A dependency away (/ready during a database outage): not a fault of ours,
            # and every probe would add an ERROR line that reads like one.
            self._logger.warning("http_request", **fields)
        elif status >= 500:
            self._logger.error("http_request", **fields)
        elif scope["path"] in self._quiet:
            self._logger.debug("http_request", **fields)
        else:
            self._logger.info("http_request", **fields)


def _incoming_request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.encode():
            return bytes(value).decode("latin-1")
    return None


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "examples": ["INVALID_ARGUMENT", "NOT_FOUND"]},
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "description": "What the error concerns; for INVALID_ARGUMENT "
                    "`field_violations`: [{field, description}], one per problem.",
                },
            },
        }
    },
}
_ERROR_DESCRIPTIONS = {
    400: "Bad input (INVALID_ARGUMENT): `details.field_violations` names every problem",
    401: "No valid `Authorization: Bearer <token>` (UNAUTHENTICATED)",
    403: "The token may not do this (PERMISSION_DENIED)",
    503: "A dependency (the database) does not answer (UNAVAILABLE)",
}
_BEARER = "bearerAuth"


def _document_errors(app: FastAPI, *, bearer_auth: bool) -> None:
    """Make the OpenAPI document tell the truth about errors and authentication: every
    error is the ``{"error": {...}}`` body, bad input is 400 (FastAPI documents a 422
    this API never sends), and with ``bearer_auth`` the ``/api/`` operations need a
    bearer token (so ``/docs`` can send one).

    400 goes on the operations with a query parameter or a body; one that refuses a
    malformed path parameter says so itself (``responses={400: ...}``), like the other
    statuses only some routes send (404, 409, 412 ...): they get the error body here."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["Error"] = _ERROR_SCHEMA
        if bearer_auth:
            components["securitySchemes"] = {
                _BEARER: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        error = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                parameters = operation.get("parameters", [])
                if "requestBody" in operation or any(p["in"] != "path" for p in parameters):
                    responses.setdefault("400", {"description": _ERROR_DESCRIPTIONS[400]})
                if path.startswith("/api/"):
                    # 403 only where a route says so: a token may be valid and still
                    # not allowed there (the others never send it).
                    statuses = (401, 503) if bearer_auth else (503,)
                    for status in statuses:
                        responses.setdefault(
                            str(status), {"description": _ERROR_DESCRIPTIONS[status]}
                        )
                    if bearer_auth:
                        operation["security"] = [{_BEARER: []}]
                for status, response in responses.items():
                    if status[0] in "45":
                        response.update(error)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_http_app(
    *,
    title: str,
    version: str,
    readiness: ReadinessCheck | None = None,
    readiness_timeout_seconds: float = 2.5,
    metrics: HttpMetrics | None = None,
    description: str = "",
    logger: Any | None = None,
    bearer_auth: bool = False,
) -> FastAPI:
    """A FastAPI app with /health, /ready, the shared error handlers and request logging.

    ``readiness`` is awaited on every ``GET /ready`` (bounded by
    ``readiness_timeout_seconds``); keep it cheap (a ``SELECT 1``, a ping). Add the
    service's routers with ``app.include_router(...)``. ``bearer_auth``: the ``/api/``
    routes need a bearer token (documented so in the OpenAPI document).
    """
    # No redirect to the path without its trailing slash: Starlette builds it from the
    # Host header, which any client may set (an open redirect); such a path is a 404.
    app = FastAPI(title=title, version=version, description=description, redirect_slashes=False)
    _document_errors(app, bearer_auth=bearer_auth)
    app.add_middleware(RequestLoggingMiddleware, metrics=metrics, logger=logger)
    app.add_exception_handler(HiveError, _hive_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)

    @app.get("/health", tags=["probes"], summary="Liveness: the process is running")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["probes"],
        summary="Readiness: 200 unless a check is down (then 503)",
        responses={503: {"description": "At least one check is down"}},
    )
    async def ready() -> JSONResponse:
        status, report = await evaluate_readiness(
            readiness, timeout_seconds=readiness_timeout_seconds
        )
        return JSONResponse(
            {"status": status, "checks": report},
            status_code=503 if status == "down" else 200,
        )

    return app


__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "INTERNAL_ERROR_MESSAGE",
    "QUIET_PATHS",
    "REQUEST_ID_HEADER",
    "CheckResult",
    "CheckStatus",
    "IsoDateTime",
    "ReadinessCheck",
    "ReadinessReport",
    "RequestLoggingMiddleware",
    "check_dependency",
    "create_http_app",
    "error_response",
    "evaluate_readiness",
    "json_path",
    "overall_status",
    "query_violations",
    "validation_violations",
]
