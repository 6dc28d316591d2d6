"""Per-service registries and the two ways of exposing them."""

from __future__ import annotations

import httpx
import prometheus_client
import pytest
from fastapi import FastAPI

from hive_common.metrics import (
    HttpMetrics,
    RpcMetrics,
    add_metrics_route,
    metrics_asgi_app,
    new_registry,
    render_latest,
    split_method,
)


def test_registries_are_independent_and_global_is_untouched() -> None:
    first, second = new_registry(), new_registry()
    a, b = RpcMetrics(first), RpcMetrics(second)
    a.rpc_started("/pkg.Svc/Do", "unary_unary")
    a.rpc_finished("/pkg.Svc/Do", "unary_unary", "OK", 0.01)
    labels = {"grpc_service": "pkg.Svc", "grpc_method": "Do", "grpc_type": "unary_unary"}
    assert first.get_sample_value("grpc_server_started_total", labels) == 1
    assert second.get_sample_value("grpc_server_started_total", labels) is None
    assert b.registry is second
    assert prometheus_client.REGISTRY.get_sample_value("grpc_server_started_total", labels) is None


def test_same_registry_refuses_duplicates() -> None:
    registry = new_registry()
    RpcMetrics(registry)
    HttpMetrics(registry)  # different names: fine
    with pytest.raises(ValueError, match="Duplicated"):
        RpcMetrics(registry)


def test_rpc_histogram_by_method_and_code() -> None:
    registry = new_registry()
    metrics = RpcMetrics(registry)
    metrics.rpc_finished("/pkg.Svc/Do", "unary_unary", "NOT_FOUND", 0.002)
    metrics.rpc_finished("/pkg.Svc/Do", "unary_unary", "NOT_FOUND", 0.2)
    labels = {"grpc_service": "pkg.Svc", "grpc_method": "Do", "grpc_code": "NOT_FOUND"}
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 2
    assert (
        registry.get_sample_value("grpc_server_handling_seconds_bucket", {**labels, "le": "0.005"})
        == 1
    )


@pytest.mark.parametrize(
    ("full", "expected"),
    [
        (
            "/neuralhive.ticket.v1.TicketService/GetTicket",
            ("neuralhive.ticket.v1.TicketService", "GetTicket"),
        ),
        ("garbage", ("unknown", "garbage")),
    ],
)
def test_split_method(full: str, expected: tuple[str, str]) -> None:
    assert split_method(full) == expected


def test_render_latest() -> None:
    registry = new_registry()
    HttpMetrics(registry).request_finished("GET", "/x", 200, 0.1)
    body, content_type = render_latest(registry)
    assert content_type.startswith("text/plain")
    assert b'http_requests_total{method="GET",route="/x",status="200"} 1.0' in body


def test_http_methods_outside_the_standard_ones_share_one_label() -> None:
    registry = new_registry()
    metrics = HttpMetrics(registry)
    for n in range(50):
        metrics.request_finished(f"XMETHOD{n}", "/api/v1/plans", 405, 0.001)
    metrics.request_finished("DELETE", "/api/v1/plans", 405, 0.001)
    body = render_latest(registry)[0].decode()
    assert "XMETHOD" not in body
    assert 'http_requests_total{method="other",route="/api/v1/plans",status="405"} 50.0' in body
    assert 'http_requests_total{method="DELETE",route="/api/v1/plans",status="405"} 1.0' in body


async def test_metrics_route_on_fastapi_app() -> None:
    registry = new_registry()
    HttpMetrics(registry).request_finished("GET", "/x", 200, 0.1)
    app = FastAPI()
    add_metrics_route(app, registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/metrics")
        schema = (await c.get("/openapi.json")).json()
    assert response.status_code == 200
    assert "http_requests_total" in response.text
    assert "/metrics" not in schema["paths"]


async def test_standalone_metrics_app() -> None:
    registry = new_registry()
    RpcMetrics(registry).rpc_started("/a.B/C", "unary_stream")
    app = metrics_asgi_app(registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/metrics")
    assert response.status_code == 200
    assert (
        'grpc_server_started_total{grpc_method="C",grpc_service="a.B",grpc_type="unary_stream"} 1.0'
        in response.text
    )
