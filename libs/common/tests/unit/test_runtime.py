"""ServiceRuntime with a real grpc.aio server and real uvicorn servers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hive_common.config import HiveSettings
from hive_common.grpc_server import GrpcService, build_grpc_server
from hive_common.http import CheckResult, ReadinessReport, create_http_app
from hive_common.logging import configure_logging
from hive_common.metrics import HttpMetrics, RpcMetrics, new_registry
from hive_common.runtime import ServiceRuntime

SERVICE = "test.Slow"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SlowServicer:
    """``Wait`` blocks until the test releases it, so an RPC can be held in flight."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False

    async def wait(self, request: bytes, context: Any) -> bytes:
        self.entered.set()
        await self.release.wait()
        self.finished = True
        return b"done"

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    def service(self) -> GrpcService:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait),
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
        }

        def register(server: grpc.aio.Server) -> None:
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE, handlers),)
            )

        return GrpcService(name=SERVICE, register=register)


@pytest.fixture(autouse=True)
def quiet_logs() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=stream)
    return stream


@pytest.fixture
def servicer() -> SlowServicer:
    return SlowServicer()


def make_runtime(
    servicer: SlowServicer,
    *,
    metrics_port: int | None = 0,
    readiness: Any = None,
    readiness_interval_seconds: float = 5.0,
    http_keep_alive_seconds: int = 75,
) -> ServiceRuntime:
    registry = new_registry()
    grpc_server = build_grpc_server(services=[servicer.service()], metrics=RpcMetrics(registry))
    app = create_http_app(
        title="t", version="1", readiness=readiness, metrics=HttpMetrics(registry)
    )
    return ServiceRuntime(
        grpc_server=grpc_server,
        http_app=app,
        host="127.0.0.1",
        metrics_registry=registry,
        metrics_port=metrics_port,
        shutdown_grace_seconds=5,
        http_keep_alive_seconds=http_keep_alive_seconds,
        readiness=readiness,
        readiness_interval_seconds=readiness_interval_seconds,
    )


@pytest.fixture
async def runtime(servicer: SlowServicer) -> AsyncIterator[ServiceRuntime]:
    rt = make_runtime(servicer)
    await rt.start()
    try:
        yield rt
    finally:
        servicer.release.set()
        await rt.stop(1)


def call(channel: grpc.aio.Channel, method: str) -> Any:
    """A raw-bytes callable for ``method`` of the test service."""
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def health_of(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        status: int = reply.status
        return status


async def eventually_health(port: int, expected: int) -> None:
    """Watch gRPC health until it reports ``expected`` (bounded; not a timing assertion)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, asyncio.timeout(10):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async for reply in watch:
            if reply.status == expected:
                watch.cancel()
                return


async def test_start_binds_real_ports_and_serves_everything(runtime: ServiceRuntime) -> None:
    assert runtime.started
    ports = (runtime.grpc_port, runtime.http_port, runtime.metrics_port)
    assert all(isinstance(p, int) and p > 0 for p in ports)
    assert len(set(ports)) == 3

    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        assert await call(channel, "Echo")(b"hi") == b"hi"

    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{runtime.http_port}/health")
        assert health.status_code == 200
        metrics = await client.get(f"http://127.0.0.1:{runtime.metrics_port}/metrics")
        assert metrics.status_code == 200
        assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Echo"' in metrics.text
        assert 'http_requests_total{method="GET",route="/health",status="200"}' in metrics.text
        # With a dedicated metrics port the HTTP app has no /metrics route.
        on_http = await client.get(f"http://127.0.0.1:{runtime.http_port}/metrics")
        assert on_http.status_code == 404


async def test_health_not_serving_until_set_serving(runtime: ServiceRuntime) -> None:
    assert runtime.grpc_port is not None
    assert await health_of(runtime.grpc_port) == NOT_SERVING
    assert await health_of(runtime.grpc_port, SERVICE) == NOT_SERVING
    await runtime.set_serving(True)
    assert await health_of(runtime.grpc_port) == SERVING
    assert await health_of(runtime.grpc_port, SERVICE) == SERVING


async def test_metrics_on_http_app_without_metrics_port(servicer: SlowServicer) -> None:
    rt = make_runtime(servicer, metrics_port=None)
    await rt.start()
    try:
        assert rt.metrics_port is None
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{rt.http_port}/metrics")
            again = await client.get(f"http://127.0.0.1:{rt.http_port}/metrics")
        assert response.status_code == 200
        assert "grpc_server_started_total" in response.text
        # Scrapes count as /metrics, not with the unknown paths as "unmatched".
        assert 'http_requests_total{method="GET",route="/metrics",status="200"} 1.0' in again.text
    finally:
        await rt.stop(1)


async def test_graceful_stop_lets_in_flight_rpc_finish(servicer: SlowServicer) -> None:
    rt = make_runtime(servicer)
    order: list[str] = []

    async def close_pool() -> None:
        order.append(f"close_pool finished={servicer.finished}")

    async def close_other() -> None:
        order.append("close_other")

    rt.add_shutdown_callback(close_pool)
    rt.add_shutdown_callback(close_other)
    await rt.start()
    await rt.set_serving(True)
    port = rt.grpc_port
    assert port is not None

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        in_flight = asyncio.ensure_future(call(channel, "Wait")(b""))
        await servicer.entered.wait()
        stopping = asyncio.create_task(rt.stop(30))
        servicer.release.set()
        assert await in_flight == b"done"
        await stopping

    assert not rt.started
    assert order == ["close_other", "close_pool finished=True"]
    await rt.stop()  # idempotent
    assert order == ["close_other", "close_pool finished=True"]


async def test_a_clean_stop_logs_no_error(servicer: SlowServicer, quiet_logs: io.StringIO) -> None:
    # The dedicated metrics server once stopped with no grace at all, which uvicorn logs
    # as an ERROR ("timeout graceful shutdown exceeded") on every shutdown.
    rt = make_runtime(servicer)
    await rt.start()
    async with httpx.AsyncClient() as client:  # a scraper's keep-alive connection
        assert (await client.get(f"http://127.0.0.1:{rt.metrics_port}/metrics")).status_code == 200
        assert (await client.get(f"http://127.0.0.1:{rt.http_port}/health")).status_code == 200
        await rt.stop()
    lines = [json.loads(line) for line in quiet_logs.getvalue().splitlines()]
    assert any(line["event"] == "service stopped" for line in lines)
    assert [line for line in lines if line["level"] in ("error", "critical")] == []


async def test_before_stop_callbacks_run_first_and_can_end_in_flight_work(
    servicer: SlowServicer,
) -> None:
    rt = make_runtime(servicer)
    order: list[str] = []

    async def end_in_flight_work() -> None:
        assert rt.grpc_server is not None
        order.append(f"before_stop serving={rt.grpc_server.serving}")
        servicer.release.set()  # what ending an endless stream does

    async def broken() -> None:
        raise RuntimeError("a failing hook does not stop the stop")

    async def close() -> None:
        order.append(f"close finished={servicer.finished}")

    rt.add_before_stop_callback(end_in_flight_work)
    rt.add_before_stop_callback(broken)
    rt.add_shutdown_callback(close)
    await rt.start()
    await rt.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_port}") as channel:
        in_flight = asyncio.ensure_future(call(channel, "Wait")(b""))
        await servicer.entered.wait()
        with structlog.testing.capture_logs() as logs:
            # Nothing else releases the RPC: only the hook lets it finish inside the grace.
            await rt.stop(30)
        assert await in_flight == b"done"
    assert order == ["before_stop serving=True", "close finished=True"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "before-stop callback failed"
    ]
    await rt.stop()  # idempotent: the hooks ran once
    assert order == ["before_stop serving=True", "close finished=True"]


async def test_stop_reports_not_serving_before_draining(servicer: SlowServicer) -> None:
    rt = make_runtime(servicer)
    await rt.start()
    await rt.set_serving(True)
    assert rt.grpc_server is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_port}") as channel:
        in_flight = asyncio.ensure_future(call(channel, "Wait")(b""))
        await servicer.entered.wait()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(rt.stop(30))
        async with asyncio.timeout(10):
            assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        assert not stopping.done()  # still draining the held RPC
        servicer.release.set()
        assert await in_flight == b"done"
        await stopping


async def test_grace_period_bounds_the_drain(servicer: SlowServicer) -> None:
    rt = make_runtime(servicer)
    await rt.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_port}") as channel:
        in_flight = asyncio.ensure_future(call(channel, "Wait")(b""))
        await servicer.entered.wait()
        await rt.stop(0.2)  # never released: cancelled when the grace period ends
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await in_flight
    assert info.value.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    assert not servicer.finished


async def test_readiness_watcher_drives_grpc_health(servicer: SlowServicer) -> None:
    report: dict[str, CheckResult] = {"postgres": {"status": "ok"}}

    async def readiness() -> ReadinessReport:
        return report

    rt = make_runtime(servicer, readiness=readiness, readiness_interval_seconds=0.02)
    await rt.start()
    try:
        port = rt.grpc_port
        assert port is not None
        # The first evaluation happens inside start().
        assert await health_of(port) == SERVING
        report["mongo"] = {"status": "degraded"}
        report["postgres"] = {"status": "down"}
        await eventually_health(port, NOT_SERVING)
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{rt.http_port}/ready")
        assert ready.status_code == 503
        report["postgres"] = {"status": "ok"}
        await eventually_health(port, SERVING)
    finally:
        await rt.stop(1)


async def test_every_change_of_readiness_is_logged(
    servicer: SlowServicer, quiet_logs: io.StringIO
) -> None:
    # "degraded" (e.g. MongoDB paused under the ticket service) was never logged: only a
    # change of the serving flag was.
    report: dict[str, CheckResult] = {"postgres": {"status": "ok"}}

    async def readiness() -> ReadinessReport:
        return report

    rt = make_runtime(servicer, readiness=readiness, readiness_interval_seconds=0.02)
    await rt.start()

    def changes() -> list[tuple[str, str, bool]]:
        lines = [json.loads(line) for line in quiet_logs.getvalue().splitlines()]
        return [
            (line["level"], line["readiness"], line["serving"])
            for line in lines
            if line["event"] == "readiness changed"
        ]

    try:
        for status in ("degraded", "down", "ok"):
            report["mongo"] = {"status": status}
            for _ in range(200):
                if changes() and changes()[-1][1] == status:
                    break
                await asyncio.sleep(0.01)
    finally:
        await rt.stop(1)
    assert changes() == [
        ("info", "ok", True),
        ("warning", "degraded", True),
        ("warning", "down", False),
        ("info", "ok", True),
    ]


async def test_stop_ends_even_when_a_readiness_check_swallows_its_cancellation(
    servicer: SlowServicer,
) -> None:
    # Some client libraries turn a cancelled call into their own error; the check then
    # reports "down" and returns instead of letting the cancellation through.
    in_check = asyncio.Event()
    release = asyncio.Event()
    swallowed = 0

    async def readiness() -> ReadinessReport:
        nonlocal swallowed
        if in_check.is_set():  # the first evaluation runs inside start()
            try:
                await release.wait()
            except asyncio.CancelledError:
                swallowed += 1
                return {"mongo": {"status": "down", "detail": "operation cancelled"}}
        in_check.set()
        return {"mongo": {"status": "ok"}}

    rt = make_runtime(servicer, readiness=readiness, readiness_interval_seconds=0.01)
    await rt.start()
    assert in_check.is_set()
    await asyncio.sleep(0.1)  # the watcher is now blocked inside a check
    async with asyncio.timeout(30):  # a hang guard, not a timing assertion
        await rt.stop(0)
    assert swallowed == 1
    assert not rt.started


async def test_run_until_signal_stops_gracefully_on_sigterm(servicer: SlowServicer) -> None:
    rt = make_runtime(servicer)
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    rt.add_shutdown_callback(close)
    await rt.start()
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(rt.run_until_signal())
        await asyncio.sleep(0)  # run_until_signal installs its handlers before its first await
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(30):
            await running
    # The servers stopped cleanly (no "server stop failed").
    assert [e for e in logs if e["log_level"] == "error"] == []
    assert not rt.started
    assert closed == [True]
    # Handlers are removed again: the default disposition is back.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_start_failure_cleans_up(servicer: SlowServicer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        registry = new_registry()
        grpc_server = build_grpc_server(services=[servicer.service()])
        rt = ServiceRuntime(
            grpc_server=grpc_server,
            http_app=create_http_app(title="t", version="1"),
            host="127.0.0.1",
            http_port=busy_port,
            metrics_registry=registry,
            metrics_port=0,
        )
        with pytest.raises(OSError, match="in use"):
            await rt.start()
    assert not rt.started
    assert rt.grpc_port is not None
    # The gRPC server that had started was stopped again.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_of(rt.grpc_port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_start_twice_is_refused(runtime: ServiceRuntime) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await runtime.start()


@pytest.mark.parametrize("listener", ["http", "metrics"])
async def test_idle_connections_stay_open_for_the_keep_alive_then_close(
    servicer: SlowServicer, listener: str
) -> None:
    # Real sockets: after 1 s idle (under the 2 s keep-alive) the connection serves the
    # next request; then the server closes it, well before uvicorn's own default (5 s).
    rt = make_runtime(servicer, http_keep_alive_seconds=2)
    await rt.start()
    port = rt.http_port if listener == "http" else rt.metrics_port
    path = b"/health" if listener == "http" else b"/metrics"
    assert port is not None
    loop = asyncio.get_running_loop()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            for _ in range(2):
                await loop.sock_sendall(sock, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
                async with asyncio.timeout(5):
                    assert (await loop.sock_recv(sock, 65536)).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(1)
            async with asyncio.timeout(2.5):  # 1 s of the 2 s keep-alive is left
                assert await loop.sock_recv(sock, 1) == b""
    finally:
        await rt.stop(1)


def test_metrics_without_port_need_a_fastapi_app() -> None:
    with pytest.raises(ValueError, match="FastAPI"):
        ServiceRuntime(metrics_registry=new_registry(), metrics_port=None)


def test_from_settings_uses_ports_and_grace() -> None:
    settings = HiveSettings(
        host="127.0.0.1",
        grpc_port=1,
        http_port=2,
        metrics_port=3,
        shutdown_grace_seconds=7,
        http_keep_alive_seconds=9,
    )
    rt = ServiceRuntime.from_settings(settings, metrics_registry=new_registry())
    assert rt.host == "127.0.0.1"
    assert rt.shutdown_grace_seconds == 7
    assert rt.http_keep_alive_seconds == 9
    assert rt._requested_ports == (1, 2, 3)
