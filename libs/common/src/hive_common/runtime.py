"""Run a service's gRPC server, HTTP app and metrics endpoint on one asyncio event loop.

Typical ``__main__``::

    async def main() -> None:
        settings = TicketSettings()
        configure_logging(level=settings.log_level, fmt=settings.log_format)
        settings.warn_if_insecure(get_logger(__name__))
        runtime = await build_runtime(settings)     # app.py: pools, servicers, FastAPI app
        await runtime.run_until_signal()            # SIGTERM / SIGINT -> graceful stop

Serving state: gRPC health starts NOT_SERVING. Either pass ``readiness`` (the same
callable the HTTP ``/ready`` uses) and the runtime re-evaluates it every
``readiness_interval_seconds``, reporting SERVING unless a check is ``down``; or pass none
and call :meth:`ServiceRuntime.set_serving` yourself once dependencies are up (a running
readiness watcher overrides manual calls at its next evaluation).

Shutdown (:meth:`ServiceRuntime.stop`): the before-stop callbacks run first (end work that
would otherwise hold the drain, such as endless server streams), health goes NOT_SERVING for
good, the servers stop accepting, in-flight RPCs and HTTP requests get ``grace`` seconds to
finish (then are cancelled), and finally the registered shutdown callbacks run in reverse
order (close pools last, after nothing can use them).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from hive_common.config import HiveSettings
from hive_common.grpc_server import HiveGrpcServer
from hive_common.http import ReadinessCheck, evaluate_readiness
from hive_common.logging import get_logger
from hive_common.metrics import add_metrics_route, metrics_asgi_app

ShutdownCallback = Callable[[], Awaitable[None]]
_METRICS_STOP_GRACE = 1.0  # seconds (uvicorn's grace is whole seconds)


class _EmbeddedUvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerStoppedUnexpectedly(RuntimeError):
    """One of the service's servers stopped without being asked (the rest were stopped)."""


def _uvicorn_grace(grace: float) -> int:
    """uvicorn's graceful shutdown timeout: whole seconds, and at least 1: at 0 it times
    out at once even with nothing to wait for, and logs "Cancel 0 running task(s), timeout
    graceful shutdown exceeded" at ERROR (a start that failed on a port in use stops the
    HTTP server it had started with no grace: that line came before "service failed")."""
    return max(1, math.ceil(grace))


class _HttpListener:
    """One uvicorn server on a socket we bind ourselves (so port 0 reports its real port)."""

    def __init__(
        self, *, name: str, app: ASGIApp, host: str, port: int, grace: float, keep_alive: int
    ) -> None:
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise OSError(
                exc.errno, f"could not bind the {name} listener to {host}:{port}: {exc.strerror}"
            ) from exc
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # logging is configure_logging()'s job
            access_log=False,  # the app's middleware writes the one line per request
            ws="none",
            lifespan="auto",
            timeout_graceful_shutdown=_uvicorn_grace(grace),
            timeout_keep_alive=keep_alive,
            server_header=False,
        )
        self.server = _EmbeddedUvicornServer(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._serve(), name=f"hive-{self.name}-server")
        # uvicorn exposes no start-up event; poll its flag, failing fast if serve() ended.
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError(f"{self.name} server exited during start-up")
            await asyncio.sleep(0.005)

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.socket])
        except SystemExit as exc:
            # uvicorn sys.exit()s on lifespan start-up failure; keep the event loop alive.
            raise RuntimeError(f"{self.name} server failed to start (exit {exc.code})") from exc

    async def stop(self, grace: float) -> None:
        if self.task is None:
            self.socket.close()
            return
        self.server.config.timeout_graceful_shutdown = _uvicorn_grace(grace)
        self.server.should_exit = True
        try:
            await self.task
        finally:
            self.socket.close()


class ServiceRuntime:
    """gRPC + HTTP (+ optional dedicated metrics port) on one event loop, with graceful stop.

    After :meth:`start`, ``grpc_port``, ``http_port`` and ``metrics_port`` hold the ports
    actually bound (useful with port 0), or ``None`` for a part that is not run. Metrics:
    with ``metrics_registry`` and ``metrics_port=None``, ``GET /metrics`` is added to the
    FastAPI ``http_app``; with a ``metrics_port`` they get their own server.
    """

    def __init__(
        self,
        *,
        grpc_server: HiveGrpcServer | None = None,
        http_app: ASGIApp | None = None,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_registry: CollectorRegistry | None = None,
        metrics_port: int | None = None,
        shutdown_grace_seconds: float = 10.0,
        http_keep_alive_seconds: int = 75,
        readiness: ReadinessCheck | None = None,
        readiness_interval_seconds: float = 5.0,
        readiness_timeout_seconds: float = 5.0,
        logger: Any | None = None,
    ) -> None:
        if (
            metrics_registry is not None
            and metrics_port is None
            and not isinstance(http_app, FastAPI)
        ):
            raise ValueError("metrics_port=None serves /metrics on http_app: pass a FastAPI app")
        self.grpc_server = grpc_server
        self.http_app = http_app
        self.host = host
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.http_keep_alive_seconds = http_keep_alive_seconds
        self.metrics_registry = metrics_registry
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self._readiness = readiness
        self._readiness_interval = readiness_interval_seconds
        self._readiness_status: str | None = None  # as last evaluated
        self._readiness_timeout = readiness_timeout_seconds
        self._logger = logger if logger is not None else get_logger("hive.runtime")
        self._shutdown_callbacks: list[ShutdownCallback] = []
        self._before_stop_callbacks: list[ShutdownCallback] = []
        self._http: _HttpListener | None = None
        self._metrics: _HttpListener | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._stop_lock = asyncio.Lock()
        self._state = "new"  # new -> started -> stopped
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None

    @classmethod
    def from_settings(
        cls,
        settings: HiveSettings,
        *,
        grpc_server: HiveGrpcServer | None = None,
        http_app: ASGIApp | None = None,
        metrics_registry: CollectorRegistry | None = None,
        readiness: ReadinessCheck | None = None,
        readiness_interval_seconds: float = 5.0,
        logger: Any | None = None,
    ) -> ServiceRuntime:
        """A runtime bound to the settings' host, ports, shutdown grace and keep-alive."""
        return cls(
            grpc_server=grpc_server,
            http_app=http_app,
            host=settings.host,
            grpc_port=settings.grpc_port,
            http_port=settings.http_port,
            metrics_registry=metrics_registry,
            metrics_port=settings.metrics_port,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            http_keep_alive_seconds=settings.http_keep_alive_seconds,
            readiness=readiness,
            readiness_interval_seconds=readiness_interval_seconds,
            logger=logger,
        )

    @property
    def started(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._state == "started"

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``callback`` at the end of :meth:`stop` (callbacks run last-added first)."""
        self._shutdown_callbacks.append(callback)

    def add_before_stop_callback(self, callback: ShutdownCallback) -> None:
        """Run ``callback`` at the start of :meth:`stop`, before the servers drain.

        For work the drain would otherwise wait for until the grace period ends (e.g. tell
        endless server streams to finish). Callbacks run in the order added, once; a failing
        one is logged and the stop goes on.
        """
        self._before_stop_callbacks.append(callback)

    async def start(self) -> None:
        """Bind and start every part; on any failure, stop what started and re-raise."""
        if self._state != "new":
            raise RuntimeError(f"runtime already {self._state}")
        self._state = "started"
        grpc_port, http_port, metrics_port = self._requested_ports
        grace = self.shutdown_grace_seconds
        try:
            if self.grpc_server is not None:
                self.grpc_port = self.grpc_server.add_insecure_port(self.host, grpc_port)
                await self.grpc_server.start()
            if (
                self.metrics_registry is not None
                and metrics_port is None
                and isinstance(self.http_app, FastAPI)
            ):
                add_metrics_route(self.http_app, self.metrics_registry)
            if self.http_app is not None:
                self._http = _HttpListener(
                    name="http",
                    app=self.http_app,
                    host=self.host,
                    port=http_port,
                    grace=grace,
                    keep_alive=self.http_keep_alive_seconds,
                )
                await self._http.start()
                self.http_port = self._http.port
            if self.metrics_registry is not None and metrics_port is not None:
                self._metrics = _HttpListener(
                    name="metrics",
                    app=metrics_asgi_app(self.metrics_registry),
                    host=self.host,
                    port=metrics_port,
                    grace=grace,
                    keep_alive=self.http_keep_alive_seconds,
                )
                await self._metrics.start()
                self.metrics_port = self._metrics.port
            if self._readiness is not None:
                await self._evaluate_readiness()
                self._readiness_task = asyncio.create_task(
                    self._watch_readiness(), name="hive-readiness"
                )
        except BaseException:
            await self.stop(0)
            raise
        self._logger.info(
            "service started",
            host=self.host,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
        )

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING through gRPC health (no-op without gRPC)."""
        if self.grpc_server is not None:
            await self.grpc_server.set_serving(serving)

    async def _evaluate_readiness(self) -> None:
        status, report = await evaluate_readiness(
            self._readiness, timeout_seconds=self._readiness_timeout
        )
        serving = status != "down"
        await self.set_serving(serving)
        # Every change of readiness, "degraded" too (a dependency the service runs
        # without, e.g. the audit store): it was logged only when serving flipped.
        if status != self._readiness_status:
            self._readiness_status = status
            log = self._logger.info if status == "ok" else self._logger.warning
            log("readiness changed", serving=serving, readiness=status, checks=report)

    async def _watch_readiness(self) -> None:
        # Also ends on the state, not only on cancellation: a check's client library may
        # turn the cancellation into its own error (then a "down" result) and return.
        while self._state == "started":
            await asyncio.sleep(self._readiness_interval)
            if self._state == "started":
                await self._evaluate_readiness()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (idempotent): before-stop callbacks, NOT_SERVING, drain up to
        ``grace`` s, then shutdown callbacks.

        ``grace`` defaults to ``shutdown_grace_seconds``.
        """
        async with self._stop_lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
            grace = self.shutdown_grace_seconds if grace is None else grace
            self._logger.info("service stopping", grace_seconds=grace)

            for callback in self._before_stop_callbacks:
                try:
                    await callback()
                except Exception:
                    self._logger.exception("before-stop callback failed", callback=repr(callback))

            if self._readiness_task is not None:
                self._readiness_task.cancel()
                # Bounded: a check that swallowed the cancellation finishes its round first.
                await asyncio.wait({self._readiness_task}, timeout=self._readiness_timeout)

            draining: list[Awaitable[None]] = []
            if self.grpc_server is not None:
                draining.append(self.grpc_server.stop(grace))
            if self._http is not None:
                draining.append(self._http.stop(grace))
            results = await asyncio.gather(*draining, return_exceptions=True)
            if self._metrics is not None:
                # Last, so the drain itself can still be scraped; a scrape in flight gets
                # uvicorn's shortest grace (0 would log every stop as an ERROR "timeout
                # graceful shutdown exceeded"); idle connections close at once.
                results.extend(
                    await asyncio.gather(
                        self._metrics.stop(_METRICS_STOP_GRACE), return_exceptions=True
                    )
                )
            for result in results:
                if isinstance(result, BaseException):
                    self._logger.error("server stop failed", exc_info=result)

            for callback in reversed(self._shutdown_callbacks):
                try:
                    await callback()
                except Exception:
                    self._logger.exception("shutdown callback failed", callback=repr(callback))
            self._logger.info("service stopped")

    async def run_until_signal(self) -> None:
        """Start (if needed), serve until SIGTERM / SIGINT, then :meth:`stop` gracefully.

        Returns after the stop. If a server dies on its own, stops everything and raises.
        Signal handlers are installed before anything else and removed on the way out.
        """
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        handled = (signal.SIGTERM, signal.SIGINT)

        def on_signal(sig: signal.Signals) -> None:
            self._logger.info("signal received", signal=sig.name)
            stop_requested.set()

        for sig in handled:
            loop.add_signal_handler(sig, on_signal, sig)
        owned: list[asyncio.Future[Any]] = []
        unexpected = False
        try:
            if self._state == "new":
                await self.start()
            stop_wait = asyncio.ensure_future(stop_requested.wait())
            owned.append(stop_wait)
            watched: list[asyncio.Future[Any]] = [stop_wait]
            for listener in (self._http, self._metrics):
                if listener is not None and listener.task is not None:
                    watched.append(listener.task)
            if self.grpc_server is not None:
                # Shielded: cancelling wait_for_termination() cancels grpc.aio's own
                # shutdown future, and the later server.stop() then fails.
                terminated = asyncio.ensure_future(
                    asyncio.shield(self.grpc_server.server.wait_for_termination())
                )
                owned.append(terminated)
                watched.append(terminated)
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            unexpected = not stop_requested.is_set()
            if unexpected:
                self._logger.error("a server stopped unexpectedly; shutting down")
        finally:
            for future in owned:
                future.cancel()
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.stop()
        if unexpected:
            raise ServerStoppedUnexpectedly("a server of this service stopped unexpectedly")


__all__ = [
    "ServerStoppedUnexpectedly",
    "ServiceRuntime",
    "ShutdownCallback",
]
