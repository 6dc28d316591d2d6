"""Prometheus helpers bound to a per-service :class:`CollectorRegistry`.

Nothing here touches ``prometheus_client.REGISTRY``: tests run several servers in one
process, and each service owns exactly the metrics it registers. Build one registry in
``app.py`` with :func:`new_registry`, pass it to :class:`RpcMetrics` / :class:`HttpMetrics`
and to your own collectors, then expose it either on its own port
(:func:`metrics_asgi_app`, served by :class:`hive_common.runtime.ServiceRuntime`) or as a
route of the FastAPI app (:func:`add_metrics_route`).
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.asgi import make_asgi_app
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

# Latency buckets (seconds) from 1 ms to 30 s: RPCs here are database-bound, streams are
# measured until they end and land in the top buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def new_registry() -> CollectorRegistry:
    """A fresh registry for one service (never the process-global default)."""
    return CollectorRegistry(auto_describe=True)


def split_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class RpcMetrics:
    """gRPC server metrics (names follow the go-grpc-prometheus convention).

    * ``grpc_server_started_total{grpc_service, grpc_method, grpc_type}``
    * ``grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code}``
    * ``grpc_server_handling_seconds{grpc_service, grpc_method, grpc_code}`` (histogram)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            ("grpc_service", "grpc_method", "grpc_type"),
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            ("grpc_service", "grpc_method", "grpc_type", "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status (whole stream for streams).",
            ("grpc_service", "grpc_method", "grpc_code"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def rpc_started(self, full_method: str, rpc_type: str) -> None:
        """Count an RPC that reached its handler."""
        service, method = split_method(full_method)
        self.started.labels(service, method, rpc_type).inc()

    def rpc_finished(self, full_method: str, rpc_type: str, code: str, seconds: float) -> None:
        """Record an RPC's final status code (e.g. ``"OK"``) and duration."""
        service, method = split_method(full_method)
        self.handled.labels(service, method, rpc_type, code).inc()
        self.handling_seconds.labels(service, method, code).observe(seconds)


_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


class HttpMetrics:
    """HTTP server metrics, labelled by route template (not raw path) to bound cardinality.

    * ``http_requests_total{method, route, status}``
    * ``http_request_duration_seconds{method, route}`` (histogram)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests completed, by status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self.duration_seconds = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one completed request. A method outside the standard ones counts as
        ``other``: any token is a valid HTTP method, and each one used to add series
        that were never dropped (anyone could grow /metrics without a token: the 405
        comes before authentication)."""
        if method not in _HTTP_METHODS:
            method = "other"
        self.requests.labels(method, route, str(status)).inc()
        self.duration_seconds.labels(method, route).observe(seconds)


def render_latest(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in the Prometheus text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_asgi_app(registry: CollectorRegistry) -> ASGIApp:
    """A stand-alone ASGI app serving ``registry`` (for a dedicated metrics port)."""
    app: ASGIApp = make_asgi_app(registry=registry)
    return app


def add_metrics_route(app: FastAPI, registry: CollectorRegistry, *, path: str = "/metrics") -> None:
    """Serve ``registry`` at ``GET path`` on ``app`` (hidden from the OpenAPI schema)."""

    async def metrics(_: Request) -> Response:
        body, content_type = render_latest(registry)
        return Response(content=body, media_type=content_type)

    # An API route (not a plain Starlette one): the request metrics name it by its path,
    # not as "unmatched" with the unknown paths.
    app.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)


__all__ = [
    "LATENCY_BUCKETS",
    "HttpMetrics",
    "RpcMetrics",
    "add_metrics_route",
    "metrics_asgi_app",
    "new_registry",
    "render_latest",
    "split_method",
]
