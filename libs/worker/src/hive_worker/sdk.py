"""The reference worker: register, heartbeat, watch own assignments, run handlers, report.

Life of one assignment (DESIGN.md sections 4 and 6)::

    ASSIGNED event for this worker --(a free slot of max_concurrent)--> GenerateToken
      --> report RUNNING (ticket token, attempt-fenced)
      --> handler(params, ctx) within the ticket's timeout
      --> report COMPLETED {result} | FAILED {error_message, permanent}

Reports go in UpdateTicketStatuses calls, with the reports of the worker's other tickets
made at the same time (:mod:`hive_worker.reports`); each is answered on its own.

Outages delay work and lose nothing: the ticket watch resumes from its last cursor (and
starts with a snapshot, so assignments made while the worker was away are picked up),
every call is retried on UNAVAILABLE, and a result is reported until the ticket service
gives a definite answer. A watch message the worker cannot decode (e.g. a ticket nested
deeper than protobuf's limit) is logged and skipped: the watch starts again from "now",
without a snapshot (which could hold the same ticket); an assignment in the skipped
stretch is only delayed, re-queued by the ticket service when its lease expires.
When a ticket moves on without this worker (cancelled, re-queued after a lease expiry,
assigned elsewhere), its handler is cancelled and nothing is reported.

Draining (SIGTERM, :meth:`Worker.drain`): heartbeat ``draining=true``, take no new work,
let running tasks finish within ``drain_grace_seconds`` (then cancel them and report
them FAILED, retryable), deregister, return. Accepted tickets that had not started yet
are left ASSIGNED; their assignment lease expires and the ticket service re-queues them
(there is no RPC for a worker to hand an assignment back without using up an attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from hive_common.clients import (
    CallPolicy,
    ReconnectPolicy,
    RegistryClient,
    TicketClient,
    TicketWatch,
    status_update_request,
    to_struct,
)
from hive_common.errors import (
    Aborted,
    FailedPrecondition,
    HiveError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    UndecodableResponse,
    describe_error,
)
from hive_common.logging import get_logger
from hive_common.retry import is_retryable
from hive_common.structs import MAX_EXACT_INTEGER, struct_to_dict
from hive_worker.config import WorkerSettings
from hive_worker.handlers import TaskContext, TaskError, TaskHandler, TaskRegistry
from hive_worker.registration import (
    is_name_in_use,
    new_instance_id,
    retry_after,
    unhealthy_window,
)
from hive_worker.reports import MAX_MESSAGE_BYTES, ReportBatcher
from hive_worker.tasks import builtin_tasks
from neuralhive.registry.v1 import registry_service_pb2 as rpb
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

HandlerT = TypeVar("HandlerT", bound=TaskHandler)

ERROR_MESSAGE_LIMIT = 4000
"""The ticket service refuses longer error messages."""

MAX_RESULT_NESTING = 32
"""How deep objects and arrays may nest in a result (the result itself is level 1): the
ticket service refuses deeper ones, and protobuf cannot even encode much deeper ones."""

_TERMINAL = frozenset(
    {pb.TICKET_STATUS_COMPLETED, pb.TICKET_STATUS_FAILED, pb.TICKET_STATUS_CANCELLED}
)
_DEFINITE_REFUSALS = (FailedPrecondition, PermissionDenied, NotFound)
_FINISHED_MEMORY = 4096
_SHUTDOWN_REPORT_SECONDS = 10.0
_NAME_WAIT_MARGIN = 2.0
"""Beyond the registry's unhealthy window, when waiting for a name to be released."""
_NAME_RETRY_MAX = 2.0
"""Longest pause between registrations while waiting for a name (a holder that
deregisters frees it at once)."""
_DEREGISTER_SECONDS = 5.0
_UNREACHABLE_WARNING_GAP = 30.0
"""Least seconds between two "registry unreachable" warnings."""
_HANDLER_STOP_SECONDS = 5.0
"""How long a cancelled handler gets to stop before the worker goes on without it."""
_MESSAGE_MARGIN = 64 * 1024
"""Room in a gRPC message for what a report's size leaves out (headers, framing)."""


def _refusal_hint(exc: HiveError) -> dict[str, str]:
    """What to check when the registry refuses Register (only when there is a clue)."""
    if isinstance(exc, Unauthenticated | PermissionDenied):
        return {
            "hint": "check HIVE_WORKER_REGISTRATION_SECRET and the registry's "
            "registration secret / JWT secret"
        }
    if isinstance(exc, InvalidArgument):
        return {"hint": "fix the settings the error names (name, namespace, capabilities ...)"}
    if is_name_in_use(exc):
        return {
            "hint": "another running worker process uses this name: give this one another "
            "name (--name / HIVE_WORKER_NAME; the default is the host name), or stop the other"
        }
    return {}


class Phase(enum.Enum):
    """Where one accepted assignment is."""

    QUEUED = "queued"  # waiting for a free slot
    STARTING = "starting"  # getting a token, marking RUNNING
    RUNNING = "running"  # the handler runs
    REPORTING = "reporting"  # sending the outcome


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to report for one attempt."""

    completed: bool
    result: dict[str, Any] | None = None
    error_message: str = ""
    permanent: bool = False
    # The worker, not the task, ended the attempt (a drain): it uses no retry.
    worker_lost: bool = False

    @classmethod
    def failure(
        cls,
        message: str,
        *,
        permanent: bool = False,
        result: dict[str, Any] | None = None,
        worker_lost: bool = False,
    ) -> Outcome:
        return cls(
            completed=False,
            error_message=message,
            permanent=permanent,
            result=result,
            worker_lost=worker_lost,
        )


@dataclass(eq=False)
class _Run:
    """One accepted (ticket, attempt)."""

    ticket: pb.ExecutionTicket
    worker_id: str
    phase: Phase = Phase.QUEUED
    task: asyncio.Task[None] | None = None
    handler_task: asyncio.Task[Mapping[str, Any]] | None = None
    token: str = ""
    token_expires_at: datetime | None = None
    abandoned: bool = False  # the ticket moved on: stop, report nothing
    released: bool = False  # draining before it started: drop it
    interrupted: bool = False  # drain grace over: stop, report FAILED
    accepted_version: int = 0
    log: Any = field(default=None)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.ticket.ticket_id, self.ticket.attempt)

    def superseded_by(self, ticket: pb.ExecutionTicket) -> bool:
        """True when ``ticket`` (newer than what this run started from) left this run."""
        if ticket.version <= self.accepted_version:
            return False
        if ticket.attempt != self.ticket.attempt:
            return ticket.attempt > self.ticket.attempt
        return ticket.status in _TERMINAL or ticket.worker_id != self.worker_id

    def stop_handler(self) -> None:
        self.stop_requested.set()
        if self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()

    def take_token(self, token: pb.TicketToken | None) -> None:
        """Use the ticket token delivered with the assignment, if it is for this attempt."""
        if token is None or not token.token or token.attempt != self.ticket.attempt:
            return
        self.token = token.token
        self.token_expires_at = (
            token.expires_at.ToDatetime(tzinfo=UTC) if token.HasField("expires_at") else None
        )


def _token_lifetime(response: rpb.RegisterResponse) -> float | None:
    """Seconds the worker token in ``response`` lasts (``None``: no expiry given).

    Measured on the registry's clock, from the moment it registered the worker (the
    worker's last heartbeat) to the token's expiry, so that this host's clock being off
    does not count; by this host's clock if the response has no such moment.
    """
    if not response.HasField("token_expires_at"):
        return None
    expires_at = response.token_expires_at.ToDatetime(tzinfo=UTC)
    if response.worker.HasField("last_heartbeat_at"):
        issued_at = response.worker.last_heartbeat_at.ToDatetime(tzinfo=UTC)
    else:
        issued_at = datetime.now(UTC)
    return (expires_at - issued_at).total_seconds()


_LOAD_REPORT_GAP = 0.5
"""Seconds between heartbeats sent early because the worker's load changed."""


async def _wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``.

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives just as
    the event is set, which kept the heartbeat loop alive through a drain.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _clean_text(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL characters.
    return value.replace("\x00", "\ufffd")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _nests_deeper(value: object, levels: int) -> bool:
    """True when ``value`` nests objects/arrays more than ``levels`` deep (counting itself).
    Looks no deeper than that, so a very deep (or circular) value costs nothing more."""
    if not isinstance(value, Mapping | list | tuple):
        return False
    if levels == 0:
        return True
    items = value.values() if isinstance(value, Mapping) else value
    return any(_nests_deeper(item, levels - 1) for item in items)


def _refuse_inexact(value: object, path: str) -> None:
    """``ValueError`` naming the path of what the JSON round trip and ``Struct`` would
    change without a word: a key that is not a string (``1`` became ``"1"``, colliding
    with a ``"1"``), an integer a double does not hold exactly."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{path}: keys must be strings, not {type(key).__name__} ({key!r})"
                )
            _refuse_inexact(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_inexact(item, f"{path}[{index}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_EXACT_INTEGER:
        raise ValueError(
            f"{path}: integers beyond ±2^53 cannot be passed on exactly (JSON numbers "
            "travel as doubles); send it as a string"
        )


def normalise_result(value: object) -> dict[str, Any]:
    """A handler's return value as a storable JSON object (``TypeError``/``ValueError``)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"a handler must return a dict, not {type(value).__name__}")
    if _nests_deeper(value, MAX_RESULT_NESTING):
        raise ValueError(
            f"objects and arrays nest more than {MAX_RESULT_NESTING} levels deep "
            "(the ticket service's limit)"
        )
    _refuse_inexact(value, "result")
    decoded = json.loads(json.dumps(dict(value), allow_nan=False))
    cleaned: dict[str, Any] = _clean_json(decoded)
    return cleaned


class _HandlerRaised(Exception):
    """Carries what a handler raised that must not end its asyncio task as such:
    ``KeyboardInterrupt`` / ``SystemExit`` escape the event loop and stop the whole worker,
    and a ``CancelledError`` the worker did not cause would read as the worker's cancel."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


async def _guarded(
    handler: TaskHandler, params: dict[str, Any], ctx: TaskContext
) -> Mapping[str, Any]:
    """Run ``handler`` so that whatever it raises is an ordinary failure of the task,
    except a cancellation asked for by the worker (a timeout, a drain, a ticket moved on)."""
    try:
        return await handler(params, ctx)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the worker cancelled it
        raise _HandlerRaised(exc) from exc
    except Exception:
        raise
    except BaseException as exc:
        raise _HandlerRaised(exc) from exc


def _task_failure(error: TaskError) -> Outcome:
    """The outcome of a handler's :class:`TaskError` (its result checked like any result)."""
    if error.result is None:
        return Outcome.failure(error.message, permanent=error.permanent)
    try:
        result = normalise_result(error.result)
    except (TypeError, ValueError) as exc:
        return Outcome.failure(
            f"{error.message} (result dropped: {exc})", permanent=error.permanent
        )
    return Outcome.failure(error.message, permanent=error.permanent, result=result)


def _without_result(outcome: Outcome, reason: str) -> Outcome:
    """What to report instead of ``outcome`` when its result cannot be stored: a result
    that does not change when retried, so a completed task fails for good."""
    if outcome.completed:
        return Outcome.failure(f"the result was refused: {reason}", permanent=True)
    return Outcome.failure(
        f"{outcome.error_message} (result dropped: {reason})", permanent=outcome.permanent
    )


def _error_text(message: str) -> str:
    text = _clean_text(message) or "failed"
    if len(text) > ERROR_MESSAGE_LIMIT:
        text = text[: ERROR_MESSAGE_LIMIT - 1] + "…"
    return text


class Worker:
    """A Hive Flow C worker: built-in task types plus your own handlers.

    ::

        worker = Worker(settings=WorkerSettings(capabilities=["python"]))

        @worker.task("resize")
        async def resize(params: dict, ctx: TaskContext) -> dict:
            return {"width": params["width"] // 2}

        await worker.run()      # until SIGTERM / SIGINT or worker.drain()

    ``registry`` / ``tickets`` clients may be passed in (tests, custom channels); by
    default :meth:`run` connects to the configured targets and closes them at the end.
    """

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        registry: RegistryClient | None = None,
        tickets: TicketClient | None = None,
        builtin_task_types: bool = True,
    ) -> None:
        self.settings = settings
        self.tasks = TaskRegistry()
        if builtin_task_types:
            for task_type, handler in builtin_tasks(
                sleep_max_seconds=settings.sleep_max_seconds,
                shell_allow_list=settings.shell_allow_list,
                shell_max_output_bytes=settings.shell_max_output_bytes,
                shell_timeout_seconds=settings.shell_timeout_seconds,
                http_get_timeout_seconds=settings.http_get_timeout_seconds,
                http_get_max_timeout_seconds=settings.http_get_max_timeout_seconds,
                http_get_max_body_bytes=settings.http_get_max_body_bytes,
                http_get_allow_networks=settings.http_get_allow_networks,
            ).items():
                self.tasks.register(task_type, handler)
        self._registry = registry
        self._tickets = tickets
        self._log = get_logger("hive_worker", worker=settings.name)
        self._worker_id: str | None = None
        # Tells the registry "the same process again" when re-registering (same worker id)
        # from another process under this name (refused while that one is alive).
        self.instance_id = new_instance_id()
        """This process's id at the registry (random, per :class:`Worker` object)."""
        self._worker_token: str | None = None
        # How long the worker token lasts (None: no expiry given) and when it came
        # (event loop time): see _token_expiring.
        self._token_lifetime: float | None = None
        self._token_received_at = 0.0
        self._server_interval: float = 5.0
        self._warned_interval: float | None = None  # the registry interval warned about
        # The assignment watch now open; whether the ticket service refused the last one
        # (until one delivers); whether heartbeats said it does not deliver.
        self._watch: TicketWatch | None = None
        self._watch_refused = False
        self._reported_unreachable = False
        self._runs: dict[tuple[str, int], _Run] = {}
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._drain_requested = asyncio.Event()
        self._draining = False
        self._ready = asyncio.Event()
        self._heartbeat_wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_cursor: tuple[str, str] = ("", "")  # (worker_id, cursor)
        self._signals = 0
        self._ran = False  # run() is once per Worker
        self._background: set[asyncio.Task[None]] = set()
        # Handlers cancelled that did not stop (they ignore cancellation): ticket, attempt.
        self._unstopped: dict[asyncio.Task[Mapping[str, Any]], str] = {}
        self._backoff = ReconnectPolicy(max_backoff_seconds=settings.reconnect_max_backoff_seconds)
        self._reports = ReportBatcher(
            lambda reports: self._ticket_client.update_ticket_statuses(reports)
        )
        self.succeeded_total = 0
        """Attempts reported COMPLETED since this process started."""
        self.failed_total = 0
        """Attempts reported FAILED since this process started."""

    # ------------------------------------------------------------------ public API

    def task(self, task_type: str) -> Callable[[HandlerT], HandlerT]:
        """Decorator registering an async ``(params, ctx) -> dict`` handler for ``task_type``."""

        def register(handler: HandlerT) -> HandlerT:
            self.tasks.register(task_type, handler)
            return handler

        return register

    def add_task(self, task_type: str, handler: TaskHandler, *, replace: bool = False) -> None:
        """Register ``handler`` for ``task_type`` (``replace=True`` overrides a built-in)."""
        self.tasks.register(task_type, handler, replace=replace)

    @property
    def worker_id(self) -> str | None:
        """The id the registry gave this worker (``None`` before registration)."""
        return self._worker_id

    @property
    def in_flight(self) -> int:
        """Accepted attempts not finished yet (queued for a slot or running)."""
        return len(self._runs)

    @property
    def load(self) -> int:
        """What heartbeats report as ``in_flight``: accepted attempts that hold or wait for
        a slot, not those whose outcome is being reported (their slot is as good as free:
        the ticket service may already have applied the outcome, and the orchestrator
        counts the slot free from then on)."""
        return sum(1 for run in self._runs.values() if run.phase is not Phase.REPORTING)

    @property
    def unstopped_handlers(self) -> list[str]:
        """``"<ticket_id> attempt <n>"`` of handlers cancelled (timeout, drain, ticket moved
        on) that have not stopped: they ignore cancellation. The worker went on without
        them (their slot is free, their outcome reported); they still run in the loop."""
        return sorted(self._unstopped.values())

    @property
    def draining(self) -> bool:
        """True once a drain has started."""
        return self._draining

    async def wait_ready(self) -> str:
        """Wait until registered and watching; returns the worker id."""
        await self._ready.wait()
        assert self._worker_id is not None
        return self._worker_id

    def drain(self) -> None:
        """Start a graceful stop (what SIGTERM does); :meth:`run` returns when done."""
        self._drain_requested.set()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Serve until drained. Raises a :class:`HiveError` if registration is refused.

        Once per :class:`Worker`: a second call raises ``RuntimeError`` (its drain and
        its closed report queue would end it at once); build a new Worker to run again.
        """
        if self._ran:
            raise RuntimeError(
                "this Worker has already run (a Worker runs once): create a new Worker"
            )
        self._ran = True
        loop = asyncio.get_running_loop()
        owned = self._open_clients()
        installed: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
        heartbeat: asyncio.Task[None] | None = None
        if self.settings.registration_secret is None:
            self._log.warning(
                "no registration secret",
                detail="set HIVE_WORKER_REGISTRATION_SECRET to the registry's registration "
                "secret; without it the registry refuses to register this worker",
            )
        try:
            registered = await self._register_until_done()
            if not registered:
                return  # drained before the registry ever answered
            self._log = self._log.bind(worker_id=self._worker_id)
            self._log.info(
                "worker registered",
                capabilities=list(self.settings.capabilities),
                task_types=self.tasks.task_types(),
                max_concurrent=self.settings.max_concurrent,
                heartbeat_interval_seconds=self._interval,
            )
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="hive-worker-heartbeat")
            self._start_watch()
            self._ready.set()
            failure = await self._until_drain_or_failure(heartbeat)
            await self._shutdown(heartbeat)
            heartbeat = None
            if failure is not None:
                raise failure
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            await self._cancel_all()
            for sig in installed:
                loop.remove_signal_handler(sig)
            for client in owned:
                await client.close()
            # Clients this run created are closed (and forgotten).
            if self._registry in owned:
                self._registry = None
            if self._tickets in owned:
                self._tickets = None

    # ------------------------------------------------------------------ wiring

    def _open_clients(self) -> list[RegistryClient | TicketClient]:
        policy = CallPolicy(
            timeout_seconds=self.settings.call_timeout_seconds,
            deadline_seconds=self.settings.call_deadline_seconds,
        )
        reconnect = ReconnectPolicy(max_backoff_seconds=self.settings.reconnect_max_backoff_seconds)
        owned: list[RegistryClient | TicketClient] = []
        if self._registry is None:
            self._registry = RegistryClient.connect(
                self.settings.registry_target,
                token_provider=self._current_worker_token,
                policy=policy,
                reconnect=reconnect,
            )
            owned.append(self._registry)
        if self._tickets is None:
            self._tickets = TicketClient.connect(
                self.settings.tickets_target,
                token_provider=self._current_worker_token,
                policy=policy,
                reconnect=reconnect,
            )
            owned.append(self._tickets)
        return owned

    def _current_worker_token(self) -> str | None:
        return self._worker_token

    @property
    def _registry_client(self) -> RegistryClient:
        assert self._registry is not None
        return self._registry

    @property
    def _ticket_client(self) -> TicketClient:
        assert self._tickets is not None
        return self._tickets

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            self._log.info("signal received; draining", signal=sig.name)
            self.drain()
        else:
            # A second signal: stop waiting for running tasks.
            self._log.warning("second signal; interrupting running tasks", signal=sig.name)
            for run in list(self._runs.values()):
                run.interrupted = True
                run.stop_handler()

    async def _until_drain_or_failure(self, heartbeat: asyncio.Task[None]) -> BaseException | None:
        """Wait for a drain request; a background loop dying also ends the wait."""
        drain = asyncio.create_task(self._drain_requested.wait())
        try:
            while True:
                watch = self._watch_task
                waiting: set[asyncio.Task[Any]] = {drain, heartbeat}
                if watch is not None:
                    waiting.add(watch)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if drain in done:
                    return None
                for task in done:
                    if task is watch and self._watch_task is not watch:
                        continue  # replaced on purpose (re-registered under a new id)
                    error = task.exception() if not task.cancelled() else None
                    self._log.error("worker loop stopped", loop=task.get_name(), error=repr(error))
                    return error or RuntimeError(f"{task.get_name()} stopped")
        finally:
            drain.cancel()

    # ------------------------------------------------------------------ registration

    async def _register(self, *, deadline: float | None = None) -> None:
        secret = self.settings.registration_secret
        response = await self._registry_client.register(
            name=self.settings.name,
            namespace=self.settings.namespace,
            capabilities=self.settings.capabilities,
            labels=self.settings.labels,
            max_concurrent=self.settings.max_concurrent,
            version=self.settings.version,
            token=secret.get_secret_value() if secret is not None else None,
            instance_id=self.instance_id,
            deadline=deadline,
        )
        previous = self._worker_id
        self._worker_id = response.worker.worker_id
        self._worker_token = response.token
        self._token_lifetime = _token_lifetime(response)
        self._token_received_at = asyncio.get_running_loop().time()
        self._use_server_interval(response.heartbeat_interval_seconds)
        self._heartbeat_wake.set()  # re-registration reset in_flight at the registry
        if previous is not None and previous != self._worker_id:
            self._log = self._log.bind(worker_id=self._worker_id)
            self._log.warning(
                "registered under a new worker id; watching its assignments",
                previous_worker_id=previous,
            )
            self._start_watch()

    async def _register_until_done(self) -> bool:
        """Register, retrying transient failures until it works or a drain is requested
        (which also interrupts a call in flight: a stop never waits out its deadline).

        A name another live process holds is retried for the registry's unhealthy window:
        after a crash, the previous process's registration stays live that long, then this
        process takes the name over. A name still held after that is a refusal.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        warned_at: float | None = None
        name_wait_ends: float | None = None
        while not self._drain_requested.is_set():
            try:
                # One attempt's time per call: this loop retries, and says so (below).
                return await self._unless_drained(
                    self._register(deadline=self.settings.call_timeout_seconds)
                )
            except HiveError as exc:
                if is_name_in_use(exc):
                    now = loop.time()
                    if name_wait_ends is None:
                        # The window plus a margin for the holder's last heartbeat in flight.
                        name_wait_ends = now + unhealthy_window(exc) + _NAME_WAIT_MARGIN
                        self._log.info(
                            "worker name held by another running instance; waiting in case "
                            "it is this worker's previous process that stopped without "
                            "deregistering",
                            name=self.settings.name,
                            error=exc.message,
                            gives_up_in_seconds=round(name_wait_ends - now, 1),
                        )
                    if now < name_wait_ends:
                        pause = min(retry_after(exc) + 0.25, _NAME_RETRY_MAX, name_wait_ends - now)
                        await _wait_event(self._drain_requested, max(pause, 0.05))
                        continue
                if not is_retryable(exc):
                    self._log.error(
                        "registration refused", error=describe_error(exc), **_refusal_hint(exc)
                    )
                    raise
                failures += 1
                if warned_at is None or loop.time() - warned_at >= _UNREACHABLE_WARNING_GAP:
                    warned_at = loop.time()
                    self._log.warning(
                        f"registry {self.settings.registry_target} unreachable; retrying",
                        attempt=failures,
                        error=describe_error(exc),
                    )
                await self._pause(failures)
        return False

    async def _unless_drained(self, call: Awaitable[None]) -> bool:
        """Await ``call``; True once done, False (``call`` cancelled) if a drain comes first."""
        task = asyncio.ensure_future(call)
        drained = asyncio.create_task(self._drain_requested.wait())
        try:
            await asyncio.wait({task, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(drained, return_exceptions=True)
        if task.cancelled() or not task.done():
            await asyncio.gather(task, return_exceptions=True)
            self._log.info("registration abandoned: stopping")
            return False
        task.result()  # the call's error, if any
        return True

    async def _pause(self, failures: int) -> None:
        """Back off (full jitter), waking early on a drain request."""
        await _wait_event(self._drain_requested, self._backoff.backoff(failures))

    # ------------------------------------------------------------------ heartbeat

    @property
    def _interval(self) -> float:
        # The registry's interval caps the configured one: beating less often than it
        # asks makes the registry mark the worker UNHEALTHY (after a few missed beats,
        # 15 s by default) and remove it later, so it flaps in and out of discovery.
        configured = self.settings.heartbeat_interval_seconds
        if configured is None:
            return self._server_interval
        return min(configured, self._server_interval)

    def _use_server_interval(self, seconds: int) -> None:
        """Adopt the registry's interval; warn (once per value) when it caps the setting."""
        if seconds <= 0:
            return
        self._server_interval = float(seconds)
        configured = self.settings.heartbeat_interval_seconds
        if configured is None or configured <= seconds or self._warned_interval == seconds:
            return
        self._warned_interval = float(seconds)
        self._log.warning(
            "heartbeat interval longer than the registry asks for; using the registry's",
            configured_seconds=configured,
            registry_seconds=seconds,
            hint=f"set HIVE_WORKER_HEARTBEAT_INTERVAL_SECONDS (--heartbeat-interval) to at "
            f"most {seconds} or leave it unset: the registry marks a worker that misses "
            "heartbeats UNHEALTHY, then removes it",
        )

    async def _heartbeat_loop(self) -> None:
        """Heartbeat every interval (start to start), and early when woken (a change of
        load, a drain), but then at most once per :data:`_LOAD_REPORT_GAP`.

        The gap is taken out of the interval, not added to it: a pause after every
        heartbeat made them ``interval + 0.5 s`` apart, and a registry that allows one
        missed beat listed an idle worker UNHEALTHY a third of the time.
        """
        loop = asyncio.get_running_loop()
        started = loop.time() - self._interval  # the first one goes at once
        while True:
            await _wait_event(self._heartbeat_wake, started + self._interval - loop.time())
            if self._heartbeat_wake.is_set():
                # Coalesce in-flight changes: at 0.1 s a busy worker sent ~10 a second.
                # Nothing waits for them: the orchestrator counts the slots it sees freed
                # and taken from ticket events.
                gap = min(_LOAD_REPORT_GAP, self._interval)
                await asyncio.sleep(max(0.0, started + gap - loop.time()))
            self._heartbeat_wake.clear()
            started = loop.time()
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        assert self._worker_id is not None
        try:
            if not self._draining and self._token_expiring():
                self._log.info("worker token about to expire; registering again")
                await self._register()
            response = await self._registry_client.heartbeat(
                worker_id=self._worker_id,
                in_flight=self._reported_load(),
                succeeded_total=self.succeeded_total,
                failed_total=self.failed_total,
                draining=self._draining,
            )
            self._use_server_interval(response.heartbeat_interval_seconds)
        except (NotFound, Unauthenticated) as exc:
            if self._draining:
                self._log.info("registry no longer knows this worker while draining")
                return
            self._log.warning("heartbeat refused; registering again", error=describe_error(exc))
            try:
                await self._register()
            except HiveError as again:
                if is_name_in_use(again):
                    # Another process took the name over while this one was silent (paused,
                    # frozen): that one does the work now; this one stops (run() raises).
                    self._log.error(
                        "worker name taken over by another process; stopping",
                        error=describe_error(again),
                    )
                    raise
                self._log.error("re-registration failed", error=describe_error(again))
        except HiveError as exc:
            self._log.warning("heartbeat failed", error=describe_error(exc))

    def _reported_load(self) -> int:
        """:attr:`load`, or every slot while the assignment watch does not deliver (the
        ticket service unreachable, or refusing the watch): a worker that cannot see its
        assignments must not attract any (each would cost an attempt and a lease, and a
        plan could fail for it)."""
        watch = self._watch
        # Draining: no new work comes anyway; the load says what is left.
        unreachable = not self._draining and (
            self._watch_refused or (watch is not None and watch.down)
        )
        if unreachable != self._reported_unreachable:
            self._reported_unreachable = unreachable
            if unreachable:
                self._log.warning(
                    "assignment watch not delivering: reporting no free slot until it is back"
                )
            else:
                self._log.info("assignment watch back: reporting free slots again")
        return self.settings.max_concurrent if unreachable else self.load

    def _token_expiring(self) -> bool:
        """Whether to register again for a fresh worker token: a few heartbeats before it
        expires, but never in the first half of its life. A token living no longer than
        that margin (the registry's minimum TTL is 60 s) counted as expiring as soon as it
        was issued: the worker registered again on every heartbeat."""
        if self._token_lifetime is None:
            return False
        margin = min(max(60.0, 3 * self._interval), self._token_lifetime / 2)
        age = asyncio.get_running_loop().time() - self._token_received_at
        return age >= self._token_lifetime - margin

    # ------------------------------------------------------------------ watch

    def _start_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._draining:
            self._watch_task = None
            return
        self._watch_task = asyncio.create_task(self._watch_loop(), name="hive-worker-watch")

    async def _watch_loop(self) -> None:
        failures = 0
        from_now = False  # after an undecodable message: no cursor, no snapshot
        while not self._draining:
            worker_id = self._worker_id
            assert worker_id is not None
            watched, cursor = self._watch_cursor
            if watched != worker_id:
                cursor = ""
            # Assignments come with their ticket token: no GenerateToken call per task.
            # Our own reports are not echoed back (we know them from their answers).
            watch = self._ticket_client.watch_tickets(
                worker_id=worker_id,
                cursor=cursor,
                include_snapshot=not cursor and not from_now,
                include_ticket_tokens=True,
                exclude_own_changes=True,
            )
            from_now = False
            self._watch = watch
            # Heartbeat at once when it starts or stops delivering (see _reported_load).
            watch.on_live_change = functools.partial(self._watch_live_changed, watch)
            try:
                async for event in watch:
                    failures = 0
                    self._watch_cursor = (worker_id, watch.cursor)
                    self._on_event(event)
            except UndecodableResponse as exc:
                # Resuming from this cursor (or a snapshot) would meet the same message
                # again: skip it by starting from "now". Back off only if that repeats
                # with nothing delivered in between.
                failures += 1
                self._log.error(
                    "ticket watch got a message it cannot decode; skipping it",
                    cursor=watch.cursor,
                    error=describe_error(exc),
                )
                self._watch_cursor = (worker_id, "")
                from_now = True
                if failures > 1:
                    await self._pause(failures)
            except HiveError as exc:
                # Transient failures are handled inside the watch; this is a refusal.
                failures += 1
                self._log.warning("ticket watch refused", error=describe_error(exc))
                self._watch_refused = True
                if isinstance(exc, InvalidArgument):
                    # A cursor the service no longer accepts (older than its event
                    # retention): start again with a snapshot of our tickets.
                    self._watch_cursor = (worker_id, "")
                self._heartbeat_wake.set()
                if isinstance(exc, Unauthenticated | PermissionDenied):
                    # A fresh worker token (or a new id, which restarts this watch).
                    with contextlib.suppress(HiveError):
                        await self._register()
                await self._pause(failures)
            finally:
                await watch.aclose()

    def _watch_live_changed(self, watch: TicketWatch) -> None:
        if watch.live:
            self._watch_refused = False
        self._heartbeat_wake.set()

    def _on_event(self, event: pb.TicketEvent) -> None:
        ticket = event.ticket
        token = event.ticket_token if event.HasField("ticket_token") else None
        for run in [r for r in self._runs.values() if r.ticket.ticket_id == ticket.ticket_id]:
            if run.superseded_by(ticket):
                self._abandon(run, ticket)
        if ticket.worker_id != self._worker_id:
            return
        key = (ticket.ticket_id, ticket.attempt)
        if key in self._runs or key in self._finished:
            return
        # (A RUNNING ticket of this worker id is always this process's: another process
        # of the name registers under a new id, see the registry.)
        if ticket.status == pb.TICKET_STATUS_ASSIGNED:
            if self._draining:
                self._log.info("draining; not taking assignment", ticket_id=ticket.ticket_id)
                return
            self._accept(ticket, token)

    def _abandon(self, run: _Run, ticket: pb.ExecutionTicket) -> None:
        if run.phase is Phase.REPORTING or run.abandoned:
            return  # our own report caused this change, or already stopping
        run.abandoned = True
        run.log.info(
            "ticket moved on; stopping",
            status=pb.TicketStatus.Name(ticket.status),
            current_attempt=ticket.attempt,
        )
        if run.phase is Phase.RUNNING:
            run.stop_handler()
        elif run.task is not None:
            run.task.cancel()

    def _accept(self, ticket: pb.ExecutionTicket, token: pb.TicketToken | None) -> None:
        assert self._worker_id is not None
        run = _Run(
            ticket=ticket,
            worker_id=self._worker_id,
            accepted_version=ticket.version,
            log=self._log.bind(
                ticket_id=ticket.ticket_id,
                plan_id=ticket.plan_id,
                task_id=ticket.task_id,
                attempt=ticket.attempt,
            ),
        )
        run.take_token(token)
        self._runs[run.key] = run
        run.task = asyncio.create_task(self._execute(run), name=f"hive-task-{ticket.ticket_id}")
        # Not in _execute's finally: a task cancelled before its first step (an assignment
        # cancelled at once) never runs its body, and its slot stayed counted for good.
        run.task.add_done_callback(lambda _: self._finished_run(run))
        self._heartbeat_wake.set()

    def _finished_run(self, run: _Run) -> None:
        if self._runs.get(run.key) is run:
            del self._runs[run.key]
        self._remember(run.key)
        self._heartbeat_wake.set()

    def _remember(self, key: tuple[str, int]) -> None:
        self._finished[key] = None
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    # ------------------------------------------------------------------ one attempt

    async def _execute(self, run: _Run) -> None:
        outcome: Outcome | None = None
        try:
            async with self._slots:
                if self._draining:
                    run.log.info("draining; assignment not started")
                    return
                run.phase = Phase.STARTING
                if not await self._mark_running(run):
                    return
                run.phase = Phase.RUNNING
                outcome = await self._invoke_handler(run)
                if outcome is None:
                    return
                run.phase = Phase.REPORTING
                self._heartbeat_wake.set()  # the load changed
                await self._report(run, outcome)
        except asyncio.CancelledError:
            if run.abandoned or run.released:
                return  # we cancelled it on purpose
            raise
        except Exception as exc:
            run.log.exception("unexpected error while handling the assignment")
            await self._report_unexpected(run, exc, outcome)
        finally:
            if run.handler_task is not None and not run.handler_task.done():
                run.handler_task.cancel()

    async def _report_unexpected(
        self, run: _Run, error: Exception, outcome: Outcome | None
    ) -> None:
        """Report FAILED after an unexpected error (else the ticket stays RUNNING until its
        timeout). If reporting ``outcome`` is what failed (e.g. a result protobuf cannot
        encode), it is reported without its result."""
        reason = describe_error(error)
        if run.phase is Phase.REPORTING and outcome is not None and outcome.result is not None:
            failure = _without_result(outcome, reason)
        else:
            failure = Outcome.failure(f"unexpected error in the worker: {reason}")
        run.phase = Phase.REPORTING
        try:
            await self._report(run, failure)
        except Exception:
            run.log.exception("could not report the unexpected error")

    async def _until_definite(self, run: _Run, what: str, call: Callable[[], Any]) -> Any:
        """Await ``call()`` until it succeeds or fails with a non-transient error.

        ABORTED is transient here: the worker names no ``expected_version``, so the ticket
        service says it only for a change that lost to concurrent ones ("retry the
        request"); the next try is decided on the ticket as it is then (a finished task's
        outcome was dropped on it)."""
        failures = 0
        while True:
            try:
                return await call()
            except HiveError as exc:
                if not (is_retryable(exc) or isinstance(exc, Aborted)):
                    raise
                failures += 1
                why = "conflicting changes" if isinstance(exc, Aborted) else "unavailable"
                run.log.warning(
                    f"{what}: ticket service {why}; retrying", error=describe_error(exc)
                )
                await asyncio.sleep(self._backoff.backoff(failures))

    async def _refresh_token(self, run: _Run) -> None:
        ticket_id = run.ticket.ticket_id
        response: pb.GenerateTokenResponse = await self._until_definite(
            run, "token", lambda: self._ticket_client.generate_token(ticket_id=ticket_id)
        )
        if response.attempt != run.ticket.attempt:
            raise FailedPrecondition(
                f"the ticket is at attempt {response.attempt}, not {run.ticket.attempt}"
            )
        run.token = response.token
        run.token_expires_at = (
            response.expires_at.ToDatetime(tzinfo=UTC) if response.HasField("expires_at") else None
        )

    def _token_fresh(self, run: _Run) -> bool:
        if not run.token:
            return False
        if run.token_expires_at is None:
            return True
        return datetime.now(UTC) < run.token_expires_at - timedelta(seconds=30)

    async def _mark_running(self, run: _Run) -> bool:
        ticket = run.ticket
        try:
            if not self._token_fresh(run):
                await self._refresh_token(run)
            start = status_update_request(
                ticket_id=ticket.ticket_id, status=pb.TICKET_STATUS_RUNNING, attempt=ticket.attempt
            )
            updated: pb.ExecutionTicket = await self._until_definite(
                run, "start", lambda: self._send_report(start, run)
            )
        except _DEFINITE_REFUSALS as exc:
            run.log.info("assignment no longer valid; not starting", error=describe_error(exc))
            return False
        except HiveError as exc:
            # Unexpected (e.g. tokens refused): leave it; the assignment lease re-queues it.
            run.log.error("could not start the assignment", error=describe_error(exc))
            return False
        run.ticket = updated
        run.accepted_version = max(run.accepted_version, updated.version)
        run.log.info("task started", task_type=ticket.task_type)
        return True

    def _handler_timeout(self, ticket: pb.ExecutionTicket) -> float | None:
        if ticket.timeout_seconds <= 0:
            return None
        # Leave a little of the RUNNING lease for reporting the outcome in time.
        return ticket.timeout_seconds - min(5.0, 0.1 * ticket.timeout_seconds)

    async def _invoke_handler(self, run: _Run) -> Outcome | None:
        ticket = run.ticket
        if run.interrupted:
            return Outcome.failure("the worker stopped before the task started", worker_lost=True)
        handler = self.tasks.get(ticket.task_type)
        if handler is None:
            known = ", ".join(self.tasks.task_types()) or "none"
            return Outcome.failure(
                f"unknown task type {ticket.task_type!r} (this worker runs: {known})",
                permanent=True,
            )
        params: dict[str, Any] = struct_to_dict(ticket.parameters)
        ctx = TaskContext(
            ticket_id=ticket.ticket_id,
            plan_id=ticket.plan_id,
            task_id=ticket.task_id,
            task_type=ticket.task_type,
            attempt=ticket.attempt,
            max_retries=ticket.max_retries,
            timeout_seconds=float(ticket.timeout_seconds),
            worker_id=run.worker_id,
            description=ticket.description,
            logger=run.log,
            lost_runs=ticket.lost_runs,
        )
        timeout = self._handler_timeout(ticket)
        handler_task: asyncio.Task[Mapping[str, Any]] = asyncio.ensure_future(
            _guarded(handler, params, ctx)
        )
        run.handler_task = handler_task
        stop = asyncio.ensure_future(run.stop_requested.wait())
        try:
            await asyncio.wait(
                {handler_task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        timed_out = not handler_task.done() and not run.stop_requested.is_set()
        if not handler_task.done():
            run.stop_handler()
            await asyncio.wait({handler_task}, timeout=_HANDLER_STOP_SECONDS)
            if not handler_task.done():
                self._leave_behind(run, handler_task)
        if timed_out or not handler_task.done() or handler_task.cancelled():
            if run.abandoned:
                return None
            if timed_out:
                # The task's timeout, not the handler's share of it (see _handler_timeout).
                return Outcome.failure(
                    f"timed out: the task's timeout is {ticket.timeout_seconds}s"
                )
            return Outcome.failure("the worker stopped before the task finished", worker_lost=True)
        error = handler_task.exception()
        if isinstance(error, _HandlerRaised):
            error = error.error
        if isinstance(error, TaskError):
            return _task_failure(error)
        if error is not None:
            run.log.warning("task raised", error=repr(error), exc_info=error)
            return Outcome.failure(describe_error(error))
        try:
            return Outcome(completed=True, result=normalise_result(handler_task.result()))
        except (TypeError, ValueError) as exc:
            return Outcome.failure(f"the handler returned an invalid result: {exc}", permanent=True)

    def _leave_behind(self, run: _Run, handler_task: asyncio.Task[Mapping[str, Any]]) -> None:
        """Go on without a cancelled handler that does not stop (it swallows the
        cancellation, or waits for something that cannot be cancelled): else its slot,
        its outcome and the end of a drain would wait for it for ever."""
        run.log.warning(
            "handler did not stop when cancelled; going on without it",
            waited_seconds=_HANDLER_STOP_SECONDS,
        )
        self._unstopped[handler_task] = f"{run.ticket.ticket_id} attempt {run.ticket.attempt}"
        handler_task.add_done_callback(self._forget_unstopped)

    def _forget_unstopped(self, handler_task: asyncio.Task[Mapping[str, Any]]) -> None:
        self._unstopped.pop(handler_task, None)
        if not handler_task.cancelled():
            handler_task.exception()  # retrieved: it was reported already

    async def _report(self, run: _Run, outcome: Outcome) -> None:
        outcome = self._fitting(run, outcome)
        for _ in range(3):  # a fresh token or a rejected result may take another round
            if not self._token_fresh(run):
                try:
                    await self._refresh_token(run)
                except _DEFINITE_REFUSALS as exc:
                    run.log.warning(
                        "ticket moved on; outcome not reported", error=describe_error(exc)
                    )
                    return
                except HiveError as exc:
                    run.log.error(
                        "no ticket token; outcome not reported", error=describe_error(exc)
                    )
                    return
            try:
                await self._until_definite(run, "report", self._sender(run, outcome))
            except Unauthenticated:
                run.token = ""  # expired meanwhile: get a new one and try again
                continue
            except (InvalidArgument, ResourceExhausted) as exc:
                if outcome.result is None:
                    run.log.error(
                        "outcome refused by the ticket service", error=describe_error(exc)
                    )
                    return
                # e.g. a result over the size limit (or larger than a gRPC message):
                # report without it; it will not change.
                outcome = _without_result(outcome, exc.message)
                continue
            except _DEFINITE_REFUSALS as exc:
                run.log.warning("ticket moved on; outcome not applied", error=describe_error(exc))
                return
            except HiveError as exc:  # e.g. INTERNAL: retrying the same report will not help
                run.log.error("outcome refused by the ticket service", error=describe_error(exc))
                return
            if outcome.completed:
                self.succeeded_total += 1
                run.log.info("task completed")
            elif outcome.worker_lost:  # the worker stopping: not a failure of its own
                run.log.info("attempt handed back", error=outcome.error_message)
            else:
                self.failed_total += 1
                run.log.info(
                    "task failed", error=outcome.error_message, permanent=outcome.permanent
                )
            return
        run.log.error("outcome could not be reported")

    def _sender(self, run: _Run, outcome: Outcome) -> Callable[[], Any]:
        """Reports ``outcome`` with the run's current token when called."""
        update = status_update_request(
            ticket_id=run.ticket.ticket_id,
            status=pb.TICKET_STATUS_COMPLETED if outcome.completed else pb.TICKET_STATUS_FAILED,
            attempt=run.ticket.attempt,
            result=None if outcome.result is None else _clean_json(outcome.result),
            error_message="" if outcome.completed else _error_text(outcome.error_message),
            permanent=outcome.permanent,
            worker_lost=outcome.worker_lost,
        )
        return lambda: self._send_report(update, run)

    def _fitting(self, run: _Run, outcome: Outcome) -> Outcome:
        """``outcome``, or without its result when the report or its answer (the ticket,
        result included) would not fit in a gRPC message: such a call would fail with
        RESOURCE_EXHAUSTED, each time."""
        if outcome.result is None:
            return outcome
        size = to_struct(_clean_json(outcome.result)).ByteSize() + run.ticket.ByteSize()
        limit = MAX_MESSAGE_BYTES - _MESSAGE_MARGIN
        if size <= limit:
            return outcome
        return _without_result(
            outcome,
            f"the result is too large to report ({size} bytes with the ticket encoded, "
            f"more than the {limit} a gRPC message carries)",
        )

    def _send_report(
        self, update: pb.UpdateTicketStatusRequest, run: _Run
    ) -> Awaitable[pb.ExecutionTicket]:
        """The update with the run's current ticket token, in the next UpdateTicketStatuses
        call (see :mod:`hive_worker.reports`)."""
        return self._reports.report(
            pb.TicketStatusReport(update=update, ticket_token=run.token),
            # The answer returns the ticket whole: its parameters, besides the result.
            answer_bytes=run.ticket.ByteSize(),
        )

    # ------------------------------------------------------------------ drain

    async def _shutdown(self, heartbeat: asyncio.Task[None]) -> None:
        self._draining = True
        log = self._log
        log.info("draining", in_flight=len(self._runs))
        # The watch stays open while attempts run: a cancel of one must still stop it
        # (assignments it brings now are not taken, see _on_event).
        for run in list(self._runs.values()):
            if run.phase is Phase.QUEUED and run.task is not None:
                run.released = True
                run.task.cancel()
        self._heartbeat_wake.set()  # tell the registry now: no new assignments

        pending = [r.task for r in self._runs.values() if r.task is not None]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.settings.drain_grace_seconds)
            if still:
                log.warning("drain grace over; interrupting running tasks", count=len(still))
                for run in list(self._runs.values()):
                    run.interrupted = True
                    run.stop_handler()
                _, still = await asyncio.wait(still, timeout=_SHUTDOWN_REPORT_SECONDS)
                if still:
                    # Their outcome is lost (e.g. the ticket service is down): the lease
                    # expiry or the orchestrator's lost-worker check brings them back.
                    log.warning(
                        "stopping without reporting these tickets' outcome",
                        tickets=[
                            f"{r.ticket.ticket_id} attempt {r.ticket.attempt} ({r.phase.name})"
                            for r in self._runs.values()
                            if r.task in still
                        ],
                    )
                for task in still:
                    task.cancel()
                await asyncio.gather(*still, return_exceptions=True)

        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        if self._worker_id is not None:
            try:
                # Short: with the registry down, expiry removes us anyway.
                await self._registry_client.deregister(
                    worker_id=self._worker_id, deadline=_DEREGISTER_SECONDS
                )
                log.info("deregistered")
            except HiveError as exc:
                log.warning(
                    "deregistration failed; the registry will expire us", error=describe_error(exc)
                )
        if self._unstopped:
            log.warning(
                "handlers ignoring their cancellation still run; not waiting for them",
                tickets=self.unstopped_handlers,
            )

    async def _cancel_all(self) -> None:
        tasks = [r.task for r in self._runs.values() if r.task is not None]
        tasks.extend(self._background)
        if self._watch_task is not None:
            tasks.append(self._watch_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._reports.aclose()


__all__ = [
    "ERROR_MESSAGE_LIMIT",
    "MAX_RESULT_NESTING",
    "Outcome",
    "Phase",
    "Worker",
    "normalise_result",
]
