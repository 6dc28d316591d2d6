"""The plan driver: C2 (ticket creation) to C5 (monitoring) for the plans this replica owns.

One asyncio component per process:

* a **claim loop** takes ownership of plans nobody drives (new plans, plans released at
  shutdown, plans whose owner died and whose lease expired) with ``claim_unowned``; a plan
  submitted through this replica is claimed at once (:meth:`PlanDriver.adopt`);
* a **renew loop** extends the leases of every driven plan; a lease that could not be
  renewed is lost and the plan is dropped (the epoch fences any late write);
* **one WatchTickets stream** for the whole replica (the service token may watch every
  ticket) routes each event to the inbox of the plan it belongs to, if this replica drives
  it; a **WatchWorkers stream** wakes plans waiting for a worker, and so does any ticket
  that leaves ASSIGNED/RUNNING (a slot freed by one plan may serve another);
* the **main loop** wakes on any of that (or on a timer), folds inbox events with
  ``merge_observation`` into each plan's ``PlanProgress``, decides once per plan and
  wakes, starts backoffs, cancels, dispatches all ready tickets of all plans in one round
  (one DiscoverWorkers per capability set, a shared ``CapacityLedger``) and persists what
  changed, with the plan's assignments when it has any (one statement: the observations
  are not needed in PostgreSQL before dispatching, as a takeover re-reads them from the
  ticket service anyway), then the plan status (stored once per round, only when it
  changed; for a plan that dispatched, as its assignments left it).

The ticket service is the truth: the first round of a plan taken up (and every
``resync_interval``) re-reads its tickets with ListTickets; the watch only makes changes
arrive sooner. A listing
made before the watch knew its position is made again as soon as it does, so a change is
never left to the next periodic resync. Every
remote call is idempotent, so a round that failed halfway (a dependency outage) is simply
run again later; nothing is kept only in memory that cannot be rebuilt from PostgreSQL
and the ticket service.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TypeVar

from hive_common.batching import bounded_batches
from hive_common.clients import RegistryClient, TicketClient, TicketWatch, status_update_request
from hive_common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HiveError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    UndecodableResponse,
    describe_error,
)
from hive_common.logging import get_logger
from neuralhive.registry.v1 import registry_service_pb2 as registry_pb
from neuralhive.ticket.v1 import ticket_service_pb2 as ticket_pb
from orchestrator_dynamic.domain.clock import Clock, utc_now
from orchestrator_dynamic.domain.plan import Priority
from orchestrator_dynamic.domain.records import PlanLease, PlanOwnershipLost, StoredPlan
from orchestrator_dynamic.domain.scheduler import (
    OCCUPYING,
    Assignment,
    CapacityLedger,
    FreedSlot,
    PlanGraph,
    PlanProgress,
    PlanStatus,
    SchedulingDecision,
    SchedulingPolicy,
    TicketState,
    TicketStatus,
    WorkerCandidate,
    assign_round,
    freed_at,
    merge_observation,
)
from orchestrator_dynamic.engine.convert import ticket_spec, ticket_state, worker_candidate
from orchestrator_dynamic.engine.health import REGISTRY, TICKET_SERVICE, DependencyHealth
from orchestrator_dynamic.engine.metrics import OrchestratorMetrics
from orchestrator_dynamic.storage.plans import PlanRepository

_log = get_logger("orchestrator_dynamic.driver")
T = TypeVar("T")
_OfTask = TypeVar("_OfTask", TicketState, Assignment)

_PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}
_TRANSIENT = (Unavailable, DeadlineExceeded)
# A round fails on these and is tried again after ERROR_RETRY_SECONDS, as in an outage:
# a whole call ABORTED is a conflict with concurrent changes ("retry the request"; an
# assignment refused for its version comes per ticket, in the call's answer).
_POSTPONING = (*_TRANSIENT, Aborted)
# Workers per DiscoverWorkers answer (the registry's default cap).
_DISCOVERY_RESULTS = 100
_WORKER_WAKE_EVENTS = frozenset(
    {registry_pb.WORKER_EVENT_TYPE_REGISTERED, registry_pb.WORKER_EVENT_TYPE_UPDATED}
)
# A worker gone with tickets still on it -> why they are handed back (see _worker_lost).
_WORKER_GONE_EVENTS = {
    # Silent past its TTL, or silent past the unhealthy window and its name taken over.
    registry_pb.WORKER_EVENT_TYPE_EXPIRED: (
        "the registry expired it (no heartbeat for its TTL, or its name taken over by a new "
        "process after it went silent)"
    ),
    # E.g. assignments a draining worker received but does not start.
    registry_pb.WORKER_EVENT_TYPE_DEREGISTERED: "it deregistered while holding the ticket",
}
# How long a freed slot is remembered for worker_candidate (heartbeats come far more often).
_FREED_SLOT_MEMORY = timedelta(seconds=60)

TICKET_CALL_BYTES = 2 * 1024 * 1024
"""Besides ``ticket_batch_size``, what one BatchCreateTickets or AssignTickets call carries
of tickets, as the serialized size of their specs: the request, and the answer (the
tickets, each its spec plus ~100 bytes), stay within half of the 4 MiB a gRPC message may
have by default. A ticket larger than that goes alone (C1's parameter limit keeps one
well under the message limit)."""


@dataclass(frozen=True, slots=True)
class DriverSettings:
    owner_id: str
    lease_ttl: timedelta = timedelta(seconds=30)
    lease_renew_interval: float = 10.0
    claim_interval: float = 5.0
    claim_batch: int = 100
    resync_interval: float = 30.0
    dispatch_retry: float = 5.0
    # A DiscoverWorkers answer is reused this long (seconds; 0 = not at all), unless a
    # registry event or a lagging registry (below) says the workers changed. Reusing it
    # keeps spare capacity right: it is the registry's count as of each worker's last
    # heartbeat, plus the slots freed since that heartbeat, capped by what this
    # orchestrator knows to be on the worker (worker_candidate).
    discovery_cache: float = 0.25
    # A slot freed on a worker reaches the registry with the worker's next heartbeat (sent
    # right after it reports), which may land after our DiscoverWorkers: until the
    # registry shows the freed worker with a spare slot again (at most this long), plans
    # still waiting for a worker look again after registry_lag_retry.
    registry_lag_window: float = 2.0
    registry_lag_retry: float = 0.1
    error_retry: float = 1.0
    ticket_batch_size: int = 500
    assign_lease_seconds: int = 0
    namespace: str = ""


@dataclass
class DrivenPlan:
    """A plan this replica owns, with what it knows of its tickets."""

    lease: PlanLease
    # What is known of the plan's tickets (change it with progress.record).
    progress: PlanProgress
    cancel_requested: bool
    status: PlanStatus
    error_message: str | None
    created_at: datetime
    activated: asyncio.Event = field(default_factory=asyncio.Event)
    # Events delivered by the watch and not yet folded.
    inbox: list[ticket_pb.TicketEvent] = field(default_factory=list)
    # Observations folded into ``tickets`` but not yet stored: kept until a write
    # succeeds, so a database hiccup loses nothing.
    unsaved: dict[str, TicketState] = field(default_factory=dict)
    # Task id -> when its ticket was assigned to the worker it now occupies (ASSIGNED or
    # RUNNING there; ticket-service time): what a slot freed on that worker counts from.
    assigned_at: dict[str, datetime] = field(default_factory=dict)
    # Loop time at which to run the plan's round again (0: now).
    due: float = 0.0
    # Rounds failed in a row for want of anything but a dependency (each retried later
    # than the one before), and whether this round failed.
    failed_rounds: int = 0
    round_failed: bool = False
    resync_due: float = 0.0
    # Ready tickets that found no worker in the plan's last dispatch round.
    waiting_for_workers: int = 0
    lost: bool = False
    # Workers gone while this plan had tickets on them -> why (see _hand_back).
    lost_workers: dict[str, str] = field(default_factory=dict)
    # Task id -> the worker its last attempt ended on without finishing (failed, lost,
    # timed out): the next attempt goes elsewhere if another worker has room.
    retry_elsewhere: dict[str, str] = field(default_factory=dict)
    # Task id -> the serialized size of its TicketSpec, once built (see _spec).
    spec_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def plan_id(self) -> str:
        return self.lease.plan_id

    @property
    def graph(self) -> PlanGraph:
        return self.progress.graph

    @property
    def tickets(self) -> Mapping[str, TicketState]:
        return self.progress.states

    @property
    def priority(self) -> Priority:
        return self.graph.plan.priority


class PlanDriver:
    """Drives owned plans to completion; see the module docstring."""

    def __init__(
        self,
        *,
        repository: PlanRepository,
        tickets: TicketClient,
        registry: RegistryClient,
        policy: SchedulingPolicy,
        settings: DriverSettings,
        health: DependencyHealth,
        metrics: OrchestratorMetrics,
        clock: Clock = utc_now,
    ) -> None:
        self._metrics = metrics
        self._repo = repository
        self._tickets = tickets
        self._registry = registry
        self._policy = policy
        self._settings = settings
        self._health = health
        self._clock = clock
        self._plans: dict[str, DrivenPlan] = {}
        self._wake = asyncio.Event()
        self._claim_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Whether the replica's ticket watch knows its position (every change from there on
        # reaches us), and how many times a watch started from "now" got there: a resync
        # only counts if the watch was positioned, and still the same one, when it read.
        self._watch_positioned = False
        self._watch_generation = 0
        # Workers on which one of our tickets freed a slot -> loop time it happened, until
        # DiscoverWorkers shows them with a spare slot (see DriverSettings.registry_lag_window).
        self._freed_workers: dict[str, float] = {}
        # Workers the registry listed (see _find_lost_workers) -> loop time until which
        # they are not asked about again.
        self._seen_live: dict[str, float] = {}
        # Slots seen freed per worker (sorted by freed_at), to add to the registry's count
        # until the worker's next heartbeat reports them (see worker_candidate).
        self._freed_slots: dict[str, list[FreedSlot]] = {}
        # Capabilities -> (loop time, DiscoverWorkers answer) (see DriverSettings).
        self._discovered: dict[frozenset[str], tuple[float, list[registry_pb.RankedWorker]]] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def owner_id(self) -> str:
        return self._settings.owner_id

    @property
    def claim_interval(self) -> float:
        """Seconds between two claims of unowned plans (CLAIM_INTERVAL_SECONDS)."""
        return self._settings.claim_interval

    def driven_plan_ids(self) -> list[str]:
        return sorted(self._plans)

    async def start(self) -> None:
        for name, job in (
            ("tickets", self._ticket_watch_loop),
            ("main", self._main_loop),
            ("claim", self._claim_loop),
            ("renew", self._renew_loop),
            ("workers", self._worker_watch_loop),
        ):
            self._tasks.append(asyncio.create_task(job(), name=f"plan-driver-{name}"))

    async def stop(self) -> None:
        """Stop driving and release every lease so another replica takes over at once."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for plan in list(self._plans.values()):
            with contextlib.suppress(HiveError):
                await self._repo.release(plan.lease)
        self._plans.clear()

    def kick(self, plan_id: str, *, cancel_requested: bool = False) -> None:
        """Look at a plan again now (e.g. after a cancel request through this replica)."""
        plan = self._plans.get(plan_id)
        if plan is None:
            return
        if cancel_requested:
            plan.cancel_requested = True
        plan.due = 0.0
        self._wake.set()

    async def adopt(self, plan_id: str, *, wait_seconds: float) -> bool:
        """Claim a plan just submitted through this replica and wait (at most
        ``wait_seconds``) until its tickets exist. False if another replica drives it or
        the wait timed out (the driver keeps trying in the background)."""
        async with self._claim_lock:
            plan = self._plans.get(plan_id)
            if plan is None:
                lease = await self._repo.claim(
                    plan_id, owner_id=self.owner_id, ttl=self._settings.lease_ttl
                )
                if lease is None:
                    return False
                plan = await self._attach(lease)
                if plan is None:
                    return False
        try:
            async with asyncio.timeout(wait_seconds):
                await plan.activated.wait()
        except TimeoutError:
            return False
        return True

    async def _attach(self, lease: PlanLease) -> DrivenPlan | None:
        try:
            stored = await self._repo.get(lease.plan_id)
        except HiveError:
            await self._safe_release(lease)
            raise
        if stored.summary.settled:
            await self._safe_release(lease)
            return None
        plan = _driven(lease, stored)
        self._plans[lease.plan_id] = plan
        self._metrics.plans_driven.set(len(self._plans))
        self._wake.set()
        _log.info("driving plan", plan_id=lease.plan_id, epoch=lease.epoch)
        return plan

    async def _safe_release(self, lease: PlanLease) -> None:
        with contextlib.suppress(HiveError):
            await self._repo.release(lease)

    # -- background loops ----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            try:
                async with self._claim_lock:
                    leases = await self._repo.claim_unowned(
                        owner_id=self.owner_id,
                        ttl=self._settings.lease_ttl,
                        limit=self._settings.claim_batch,
                    )
                    for lease in leases:
                        await self._attach(lease)
                await self._notice_cancels()
            except HiveError as exc:
                _log.warning("claiming plans failed", error=describe_error(exc))
            except Exception:
                _log.exception("claim loop error")
            await asyncio.sleep(self._settings.claim_interval)

    async def _notice_cancels(self) -> None:
        """Cancels requested through another replica for plans this one drives: seen
        within a claim interval (the resync of each plan, every 30 s, was the first to
        see them, and the plan's tickets ran on meanwhile)."""
        unseen = [p.plan_id for p in self._plans.values() if not p.cancel_requested]
        for plan_id in await self._repo.cancel_requested(unseen):
            self.kick(plan_id, cancel_requested=True)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_renew_interval)
            plans = [p for p in self._plans.values() if not p.lost]
            if not plans:
                continue
            try:
                renewed = await self._repo.renew_many(
                    [p.lease for p in plans], ttl=self._settings.lease_ttl
                )
            except HiveError as exc:
                # The epoch still fences writes; if the outage outlasts the lease another
                # replica may take the plans over and our next write notices.
                _log.warning("renewing plan leases failed", error=describe_error(exc))
                continue
            kept = {lease.plan_id: lease for lease in renewed}
            for plan in plans:
                lease = kept.get(plan.plan_id)
                if lease is None:
                    plan.lost = True
                    self._wake.set()
                else:
                    plan.lease = lease

    async def _worker_watch_loop(self) -> None:
        async def resynchronise() -> None:
            self._wake_waiting()

        while True:
            try:
                watch = self._registry.watch_workers(
                    namespace=self._settings.namespace, on_connected=resynchronise
                )
                async with watch:
                    async for event in watch:
                        self._health.succeeded(REGISTRY)
                        self._discovered.clear()  # the workers changed
                        if event.type in _WORKER_WAKE_EVENTS:
                            self._wake_waiting()
                        elif event.type in _WORKER_GONE_EVENTS:
                            why = _WORKER_GONE_EVENTS[event.type]
                            self._worker_lost(event.worker.worker_id, why)
            except HiveError as exc:
                self._health.failed(REGISTRY, str(exc))
                _log.warning("worker watch failed", error=describe_error(exc))
            except Exception:
                _log.exception("worker watch error")
            await asyncio.sleep(self._settings.error_retry)

    def _worker_lost(self, worker_id: str, why: str) -> None:
        """``worker_id`` is gone (expired or deregistered): the plans with tickets there
        hand them back in their next round, instead of waiting out leases as long as the
        tasks' timeouts (an hour by default). A ticket the worker finished just before is
        not affected: the hand-back of a ticket that moved on is refused and re-read."""
        self._seen_live.pop(worker_id, None)
        for plan in self._plans.values():
            if plan.progress.occupying.get(worker_id):
                self._lose(plan, worker_id, why)

    def _lose(self, plan: DrivenPlan, worker_id: str, why: str) -> None:
        plan.lost_workers[worker_id] = why
        plan.due = 0.0
        self._wake.set()

    async def _find_lost_workers(self, plan: DrivenPlan) -> None:
        """Workers holding this plan's tickets that the registry no longer lists: expired
        (or deregistered) while no WatchWorkers stream of this replica saw it, e.g. before
        it took the plan over or while the registry was unreachable. Their tickets are
        handed back like on an EXPIRED event, instead of waiting out their leases. A
        worker found live is not asked again for a resync interval."""
        now = asyncio.get_running_loop().time()
        self._seen_live = {w: until for w, until in self._seen_live.items() if until > now}
        for worker_id in list(plan.progress.occupying):
            if worker_id in plan.lost_workers or worker_id in self._seen_live:
                continue
            try:
                # Short: the plan's round waits for it (a slow registry must not stall it).
                await self._registry.get_worker(worker_id=worker_id, deadline=2.0)
            except NotFound:
                self._lose(plan, worker_id, "the registry no longer lists it")
                continue
            except HiveError as exc:
                # The watch and the leases remain; the next resync asks again.
                if isinstance(exc, _TRANSIENT):
                    self._health.failed(REGISTRY, str(exc))
                _log.warning("checking the workers of a plan failed", error=describe_error(exc))
                return
            self._seen_live[worker_id] = now + self._settings.resync_interval

    def _wake_waiting(self) -> None:
        woke = False
        for plan in self._plans.values():
            if plan.waiting_for_workers:
                plan.due = 0.0
                woke = True
        if woke:
            self._wake.set()

    async def _ticket_watch_loop(self) -> None:
        """Follow every ticket change and hand each to the plan it belongs to.

        The first stream starts at "now"; a rebuilt one resumes from the previous one's
        cursor (the client itself reconnects after transient failures), so only a cursor
        the service refuses, or a message this client cannot decode (resuming would meet
        it again), starts a new one from "now". A plan's past is read with
        ListTickets when it is taken up and at every resync; a resync done before the
        watch was positioned is done again once it is (:meth:`_watch_became_positioned`),
        so every change is either in a listing or on the stream.
        """
        cursor = ""
        while True:
            # Our own creates, assignments and cancels are merged from the calls' answers;
            # a change another replica made to a plan we now drive is caught by the
            # resync (and a refused assignment re-reads the ticket).
            watch = self._tickets.watch_tickets(cursor=cursor, exclude_own_changes=True)
            if not watch.positioned:
                self._watch_positioned = False
            positioning = asyncio.create_task(self._watch_became_positioned(watch))
            try:
                async with watch:
                    async for event in watch:
                        plan = self._plans.get(event.ticket.plan_id)
                        if plan is not None:
                            plan.inbox.append(event)
                            self._wake.set()
                cursor = watch.cursor
            except UndecodableResponse as exc:
                # E.g. a ticket nested deeper than protobuf decodes: resuming from this
                # cursor would meet it again, forever. Skip it like a refused cursor (its
                # plan, if ours, is re-read with every other once the new watch is
                # positioned), and say so on /ready until the ticket service answers again.
                self._health.failed(TICKET_SERVICE, str(exc))
                _log.error(
                    "ticket watch got a message it cannot decode; starting afresh from now",
                    cursor=watch.cursor,
                    error=describe_error(exc),
                )
                cursor = ""
            except InvalidArgument as exc:
                # A cursor the service no longer accepts: start afresh from "now"; once
                # that watch is positioned every plan is re-read (whatever happened in
                # between).
                _log.warning("ticket watch cursor refused", error=describe_error(exc))
                cursor = ""
            except HiveError as exc:
                self._health.failed(TICKET_SERVICE, str(exc))
                _log.warning("ticket watch failed", error=describe_error(exc))
                cursor = watch.cursor
            except Exception:
                _log.exception("ticket watch error")
                cursor = watch.cursor
            finally:
                positioning.cancel()
            await asyncio.sleep(self._settings.error_retry)

    async def _watch_became_positioned(self, watch: TicketWatch) -> None:
        await watch.wait_positioned()
        if not self._watch_positioned:
            # A watch started from "now" is positioned: re-read every plan, since a
            # listing made before this point may have missed a change made before it.
            self._watch_positioned = True
            self._watch_generation += 1
            self._resync_all()

    def _resync_all(self) -> None:
        for plan in self._plans.values():
            plan.resync_due = 0.0
        self._wake.set()

    # -- main loop -----------------------------------------------------------------------

    async def _main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wake_at = min(
                (min(p.due, p.resync_due) for p in self._plans.values()),
                default=now + 60.0,
            )
            if wake_at > now:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wake_at - now):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._round()
            except Exception:
                _log.exception("plan driver round failed")
                await asyncio.sleep(self._settings.error_retry)

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        # Every change seen first: a slot one plan's ticket freed wakes the plans waiting
        # for a worker before any plan is stepped, so the slot goes to the first of them
        # in priority order, not to the plan whose ticket freed it.
        for plan in self._plans.values():
            if plan.inbox and plan.activated.is_set():
                self._fold_inbox(plan)
                plan.due = 0.0
        ready: list[tuple[DrivenPlan, SchedulingDecision]] = []
        stepped: list[DrivenPlan] = []
        for plan in sorted(self._plans.values(), key=_plan_order):
            if plan.lost:
                await self._drop(plan, "lease lost")
                continue
            now = loop.time()
            if not plan.inbox and plan.due > now and plan.resync_due > now:
                continue
            plan.due = now + 3600.0  # recomputed below
            plan.round_failed = False
            stepped.append(plan)
            decision = await self._guarded(plan, self._step(plan))
            if decision is not None:
                ready.append((plan, decision))
        if ready:
            await self._dispatch(ready)
        for plan in stepped:
            if plan.failed_rounds and not plan.round_failed:
                await self._rounds_recovered(plan)
        # Every round, not only dispatching ones: a plan that settled, was dropped or has
        # nothing ready any more no longer counts.
        self._metrics.tickets_waiting_for_workers.set(
            sum(p.waiting_for_workers for p in self._plans.values())
        )

    async def _guarded(self, plan: DrivenPlan, work: Awaitable[T]) -> T | None:
        """``work``'s result; None when it failed (the plan is dropped or postponed)."""
        loop = asyncio.get_running_loop()
        try:
            return await work
        except PlanOwnershipLost:
            self._metrics.round_failures.labels("ownership_lost").inc()
            await self._drop(plan, "ownership lost")
        except _POSTPONING as exc:
            plan.round_failed = True
            self._metrics.round_failures.labels("transient").inc()
            _log.warning("plan round postponed", plan_id=plan.plan_id, error=describe_error(exc))
            self._postpone(plan, loop.time() + self._settings.error_retry)
        except ResourceExhausted as exc:
            # A message over a size limit (every call is bounded: a ticket service with a
            # lower limit, or an answer carrying tickets larger than known): trying again
            # at once would fail the same way. Next time, after a re-read of the tickets.
            self._metrics.round_failures.labels("too_large").inc()
            _log.error("plan round failed", plan_id=plan.plan_id, error=describe_error(exc))
            await self._round_failed(plan, exc)
            plan.due = plan.resync_due = loop.time() + self._settings.resync_interval
        except HiveError as exc:
            self._metrics.round_failures.labels("error").inc()
            _log.error("plan round failed", plan_id=plan.plan_id, error=describe_error(exc))
            await self._round_failed(plan, exc)
        except Exception as exc:
            # A bug must not stall the plan (nor the other plans of this round).
            self._metrics.round_failures.labels("error").inc()
            _log.exception("plan round crashed", plan_id=plan.plan_id)
            await self._round_failed(plan, exc)
        return None

    async def _round_failed(self, plan: DrivenPlan, exc: Exception) -> None:
        """A round failed, and would fail the same way at once (a refusal, a defect): try
        again later each time (it was every second, for ever, an ERROR line each), and
        record why, which explain says (it said the tasks were ready)."""
        plan.round_failed = True
        plan.failed_rounds += 1
        self._postpone(
            plan,
            asyncio.get_running_loop().time()
            + error_retry_delay(
                plan.failed_rounds,
                first=self._settings.error_retry,
                cap=self._settings.resync_interval,
            ),
        )
        try:
            await self._repo.set_round_error(plan.plan_id, describe_error(exc))
        except HiveError as stored:
            _log.warning("recording a failed round failed", error=describe_error(stored))

    async def _rounds_recovered(self, plan: DrivenPlan) -> None:
        try:
            await self._repo.set_round_error(plan.plan_id, None)
        except HiveError as exc:
            _log.warning("clearing a failed round failed", error=describe_error(exc))
            return
        plan.failed_rounds = 0
        _log.info("plan rounds succeed again", plan_id=plan.plan_id)

    @staticmethod
    def _postpone(plan: DrivenPlan, at: float) -> None:
        plan.due = min(plan.due, at)
        # A failed resync is retried with the round, not in a tight loop.
        plan.resync_due = max(plan.resync_due, at)

    async def _drop(self, plan: DrivenPlan, why: str) -> None:
        _log.info("no longer driving plan", plan_id=plan.plan_id, reason=why)
        self._forget(plan)

    def _forget(self, plan: DrivenPlan) -> None:
        """Stop driving ``plan``, and only it: after this replica claimed the plan again
        (its lease expired in a database outage), a round of the old copy still in flight
        ends with ownership lost, and must not take the new copy away (the plan then
        waited for its lease to expire once more)."""
        if self._plans.get(plan.plan_id) is plan:
            del self._plans[plan.plan_id]
        self._metrics.plans_driven.set(len(self._plans))

    async def _step(self, plan: DrivenPlan) -> SchedulingDecision | None:
        """One round for one plan; returns the decision if it has tasks to dispatch now
        (their observations and the plan status are then stored by :meth:`_dispatch`)."""
        loop = asyncio.get_running_loop()
        if not plan.activated.is_set():
            refused = await self._activate(plan)
            if refused is not None:
                await self._abandon(plan, refused)
                return None
        self._fold_inbox(plan)
        if plan.resync_due <= loop.time():
            await self._resync(plan)
            await self._find_lost_workers(plan)
        if plan.lost_workers:
            await self._hand_back(plan)

        decision = self._decide(plan)
        if decision.start_backoff:
            await self._start_backoffs(plan, decision)
            decision = self._decide(plan)
        if decision.cancel:
            # Said in each ticket's error message: why it will never run.
            reason = decision.error_message or "a task it depends on was cancelled"
            await self._cancel(plan, decision.cancel, reason)
            decision = self._decide(plan)
        if not decision.dispatch:
            plan.waiting_for_workers = 0
            # Else stored with the round's assignments (one statement), and the status
            # after them (see _end_round).
            await self._flush(plan)
            await self._store_status(plan, decision)
        if decision.settled:
            await self._finish(plan)
            return None
        if decision.next_wakeup is not None:
            delay = (decision.next_wakeup - self._clock()).total_seconds()
            plan.due = min(plan.due, loop.time() + max(0.0, delay))
        return decision if decision.dispatch else None

    def _decide(self, plan: DrivenPlan) -> SchedulingDecision:
        return plan.progress.decide(
            now=self._clock(),
            policy=self._policy,
            cancel_requested=plan.cancel_requested,
        )

    async def _activate(self, plan: DrivenPlan) -> str | None:
        """C2 for tasks without a ticket, one batch (``ticket_batch_size`` and
        :data:`TICKET_CALL_BYTES`, critical path first) per round, so the tickets created so
        far are dispatched while the others are created; the plan is activated once every
        task has one. Returns why the ticket service refused the tickets for good, if it
        did (a message too large included: the batch is already as small as it may be).

        The round's resync (due when the plan is taken up) reads what exists by then;
        the tickets created after it are known from the calls' answers and followed on
        the watch like every other change."""
        missing = [t for t in plan.graph.ranked if plan.tickets[t].ticket_id is None]
        batch = next(
            bounded_batches(
                (_spec(plan, t) for t in missing),
                ticket_pb.TicketSpec.ByteSize,
                max_bytes=TICKET_CALL_BYTES,
                limit=self._settings.ticket_batch_size,
            ),
            [],
        )
        if batch:
            try:
                await self._create_tickets(plan, batch)
            except (InvalidArgument, AlreadyExists, ResourceExhausted) as exc:
                # Only a misconfiguration gets here (the validator mirrors the ticket
                # service's rules; its message limit is above TICKET_CALL_BYTES): retrying
                # cannot help, so the plan fails visibly.
                return f"the ticket service refused the plan's tickets: {exc.message}"
        if len(missing) > len(batch):
            plan.due = 0.0  # the next batch in the next round
        else:
            plan.activated.set()
        return None

    async def _abandon(self, plan: DrivenPlan, reason: str) -> None:
        """Fail a plan whose tickets cannot be created; cancel those that were."""
        _log.error("plan abandoned", plan_id=plan.plan_id, reason=reason)
        created = [
            t
            for t in plan.graph.order
            if plan.tickets[t].ticket_id is not None and not plan.tickets[t].status.terminal
        ]
        if created:
            await self._cancel(plan, created, f"the plan failed: {reason}")
        summary = await self._repo.set_status(
            plan.lease, status=PlanStatus.FAILED, error_message=reason, settled=True
        )
        plan.status, plan.error_message = summary.status, summary.error_message
        plan.activated.set()
        await self._finish(plan)

    async def _create_tickets(
        self, plan: DrivenPlan, specs: Sequence[ticket_pb.TicketSpec]
    ) -> None:
        """One BatchCreateTickets call (and one ticket-service transaction)."""
        response = await self._call_tickets(self._tickets.batch_create_tickets(specs=specs))
        for ticket in response.tickets:
            self._merge(plan, ticket_state(ticket.task_id, ticket))
        await self._flush(plan)
        _log.info("tickets created", plan_id=plan.plan_id, count=len(specs))

    def _merge(self, plan: DrivenPlan, observed: TicketState) -> bool:
        """Fold one observation; True if it freed a worker slot (the ticket left
        ASSIGNED/RUNNING, or moved to another worker)."""
        current = plan.tickets.get(observed.task_id)
        if current is None:
            return False  # not a task of this plan (never expected)
        merged = merge_observation(current, observed)
        if merged is None:
            return False
        plan.progress.record(merged)
        plan.unsaved[observed.task_id] = merged
        if merged.attempt > current.attempt and current.worker_id:
            plan.retry_elsewhere[observed.task_id] = current.worker_id
        elif merged.status is not TicketStatus.PENDING:
            plan.retry_elsewhere.pop(observed.task_id, None)
        freed = current.status in OCCUPYING and (
            merged.status not in OCCUPYING or merged.worker_id != current.worker_id
        )
        # When the ticket was assigned to the worker it held (else, if that was not seen,
        # the time of the last change seen: later, so fewer slots count as freed).
        held_since = plan.assigned_at.pop(observed.task_id, None) if freed else None
        if merged.status is TicketStatus.ASSIGNED and merged.updated_at is not None:
            plan.assigned_at[observed.task_id] = merged.updated_at
        if freed and current.worker_id:
            self._freed_workers[current.worker_id] = asyncio.get_running_loop().time()
            held_since = held_since or current.updated_at
            if held_since is not None and merged.updated_at is not None:
                bisect.insort(
                    self._freed_slots.setdefault(current.worker_id, []),
                    FreedSlot(held_since=held_since, freed_at=merged.updated_at),
                    key=freed_at,
                )
        return freed

    def _fold_inbox(self, plan: DrivenPlan) -> None:
        events, plan.inbox = plan.inbox, []
        freed = False
        for event in events:
            if event.HasField("ticket"):
                freed |= self._merge(plan, ticket_state(event.ticket.task_id, event.ticket))
        if events:
            self._health.succeeded(TICKET_SERVICE)
        if freed:
            # The slot may serve a ticket of another plan: without this, plans waiting for
            # a worker would only look again after dispatch_retry or a registry event.
            self._wake_waiting()

    async def _resync(self, plan: DrivenPlan) -> None:
        loop = asyncio.get_running_loop()
        generation = self._watch_generation if self._watch_positioned else None
        page_token = ""
        freed = False
        while True:
            page = await self._call_tickets(
                self._tickets.list_tickets(plan_id=plan.plan_id, page_token=page_token)
            )
            for ticket in page.tickets:
                freed |= self._merge(plan, ticket_state(ticket.task_id, ticket))
            page_token = page.next_page_token
            if not page_token:
                break
        if freed:
            self._wake_waiting()
        # A cancel requested through another replica reaches us here.
        summary = await self._repo.get_summary(plan.plan_id)
        if summary.cancel_requested_at is not None:
            plan.cancel_requested = True
        if generation is None and self._watch_positioned:
            # The watch got positioned while we read: a change made just before that may
            # be in neither the listing nor the stream, so read again now.
            plan.resync_due = 0.0
        elif generation is not None and generation != self._watch_generation:
            plan.resync_due = 0.0  # same, for a watch restarted from "now" meanwhile
        else:
            # Either the listing is complete (the watch was positioned before it), or the
            # positioning of the watch will ask for another one (_resync_all).
            plan.resync_due = loop.time() + self._settings.resync_interval

    async def _flush(self, plan: DrivenPlan) -> None:
        """Store the unsaved observations."""
        if plan.unsaved:
            pending = plan.unsaved
            plan.unsaved = {}
            try:
                await self._repo.update_tickets(plan.lease, list(pending.values()))
            except BaseException:
                plan.unsaved = {**pending, **plan.unsaved}
                raise

    async def _start_backoffs(self, plan: DrivenPlan, decision: SchedulingDecision) -> None:
        backoffs = {
            task_id: (plan.tickets[task_id].attempt, until)
            for task_id, until in decision.start_backoff.items()
        }
        # A backoff is stored only on the attempt it belongs to: the re-queue that started
        # it (a new attempt, observed this round) must be stored first.
        await self._flush(plan)
        await self._repo.start_backoffs(plan.lease, backoffs)
        for task_id, (attempt, until) in backoffs.items():
            plan.progress.record(
                replace(plan.tickets[task_id], backoff_until=until, backoff_attempt=attempt)
            )
            _log.info(
                "retry backoff",
                plan_id=plan.plan_id,
                task_id=task_id,
                attempt=attempt,
                until=until.isoformat(),
            )

    async def _cancel(self, plan: DrivenPlan, task_ids: Sequence[str], reason: str) -> None:
        states = [
            plan.tickets[task_id]
            for task_id in task_ids
            if plan.tickets[task_id].ticket_id is not None
            and not plan.tickets[task_id].status.terminal
        ]
        cancelled = await self._report_all(
            plan,
            states,
            ticket_pb.TICKET_STATUS_CANCELLED,
            lambda _: f"cancelled by the orchestrator: {reason}",
        )
        self._metrics.cancellations.inc(cancelled)

    async def _hand_back(self, plan: DrivenPlan) -> None:
        """Report the tickets a lost worker held as failed with ``worker_lost`` (the ticket
        service re-queues them without using one of the task's retries, up to its limit).
        Should the worker still be running one, its result is refused as late (fenced)."""
        lost, plan.lost_workers = plan.lost_workers, {}
        handed = [
            state
            for state in plan.tickets.values()
            if state.worker_id in lost and state.status in OCCUPYING and state.ticket_id
        ]
        if not handed:
            return
        await self._report_all(
            plan,
            handed,
            ticket_pb.TICKET_STATUS_FAILED,
            lambda state: f"worker {state.worker_id} lost: {lost[state.worker_id or '']}",
            worker_lost=True,
        )
        _log.warning(
            "tickets of a lost worker handed back",
            plan_id=plan.plan_id,
            workers=sorted(lost),
            tickets=len(handed),
        )

    async def _report_all(
        self,
        plan: DrivenPlan,
        states: Sequence[TicketState],
        status: ticket_pb.TicketStatus.ValueType,
        error_message: Callable[[TicketState], str],
        *,
        worker_lost: bool = False,
    ) -> int:
        """Report ``status`` for the current attempt of each ticket, in batches (one
        UpdateTicketStatuses call each, as :meth:`_assign` does: a cancel of 2,000 tickets
        was 2,000 calls one after the other, which held up every plan of the replica for
        seconds), and take in the tickets as they now are; one that moved on meanwhile
        (finished, or re-queued to a new attempt) is re-read. How many were applied."""
        applied = 0
        failure: HiveError | None = None
        for chunk in self._in_calls(plan, states):
            reports = []
            for state in chunk:
                assert state.ticket_id is not None
                update = status_update_request(
                    ticket_id=state.ticket_id,
                    status=status,
                    attempt=state.attempt,
                    error_message=error_message(state),
                    worker_lost=worker_lost,
                )
                reports.append(ticket_pb.TicketStatusReport(update=update))
            results = await self._call_tickets(self._tickets.update_ticket_statuses(reports))
            for state, report, result in zip(chunk, reports, results, strict=True):
                if isinstance(result, FailedPrecondition | Aborted):
                    ticket = await self._call_tickets(
                        self._tickets.get_ticket(ticket_id=report.update.ticket_id)
                    )
                elif isinstance(result, HiveError):
                    failure = failure or result
                    continue
                else:
                    ticket = result
                    applied += 1
                if self._merge(plan, ticket_state(state.task_id, ticket)):
                    self._wake_waiting()
            await self._flush(plan)
        if failure is not None:
            raise failure
        return applied

    async def _store_status(self, plan: DrivenPlan, decision: SchedulingDecision) -> None:
        status, error = decision.status, decision.error_message
        if plan.status.terminal:
            # The first terminal status wins (the repository ignores later ones).
            status, error = plan.status, plan.error_message
        if (status, error) == (plan.status, plan.error_message) and not decision.settled:
            return
        summary = await self._repo.set_status(
            plan.lease, status=status, error_message=error, settled=decision.settled
        )
        if summary.status != plan.status:
            reason = {"error": summary.error_message} if summary.error_message else {}
            _log.info("plan status", plan_id=plan.plan_id, status=summary.status.value, **reason)
        plan.status, plan.error_message = summary.status, summary.error_message
        if summary.cancel_requested_at is not None and not plan.cancel_requested:
            self.kick(plan.plan_id, cancel_requested=True)  # through another replica

    async def _finish(self, plan: DrivenPlan) -> None:
        reason = {"error": plan.error_message} if plan.error_message else {}
        _log.info("plan settled", plan_id=plan.plan_id, status=plan.status.value, **reason)
        self._forget(plan)
        self._metrics.plans_settled.labels(plan.status.value).inc()
        duration = (self._clock() - plan.created_at).total_seconds()
        self._metrics.plan_duration_seconds.labels(plan.status.value).observe(max(duration, 0.0))
        await self._safe_release(plan.lease)

    # -- dispatch (C3/C4) ----------------------------------------------------------------

    def _known_active(self) -> dict[str, int]:
        """Worker id -> tickets of the driven plans ASSIGNED or RUNNING there."""
        active: dict[str, int] = {}
        for plan in self._plans.values():
            for worker_id, count in plan.progress.occupying.items():
                active[worker_id] = active.get(worker_id, 0) + count
        return active

    async def _dispatch(self, ready: list[tuple[DrivenPlan, SchedulingDecision]]) -> None:
        loop = asyncio.get_running_loop()
        ready = await self._without_cancelled(ready)
        needed: set[frozenset[str]] = set()
        for plan, decision in ready:
            needed |= plan.graph.capability_sets_of(decision.dispatch)
        active = self._known_active()
        self._forget_old_frees()
        candidates: dict[frozenset[str], list[WorkerCandidate]] = {}
        # Workers the registry offered with a spare slot of its own reckoning.
        discovered: set[str] = set()
        # Each worker's max_concurrent, which the ticket service enforces over every
        # replica's assignments (ours count only ours, the registry's lag a heartbeat).
        capacities: dict[str, int] = {}
        for capabilities in needed:
            ranked = await self._discover(capabilities)
            capacities.update((r.worker.worker_id, r.worker.max_concurrent) for r in ranked)
            found = [
                worker_candidate(
                    r,
                    active.get(r.worker.worker_id, 0),
                    self._freed_slots.get(r.worker.worker_id, ()),
                )
                for r in ranked
            ]
            candidates[capabilities] = found
            discovered.update(c.worker_id for c in found if c.spare_capacity > 0)
        retry = self._settings.dispatch_retry
        if self._registry_lagging(discovered):
            retry = min(retry, self._settings.registry_lag_retry)
            self._discovered.clear()  # look again, at the registry
        ledger = CapacityLedger()
        for plan, decision in ready:
            if plan.cancel_requested:
                # Cancelled through this replica while the round asked the registry (kick):
                # nothing more is assigned; the next round, due at once, cancels the rest.
                continue
            assignment_round = assign_round(
                plan.graph, decision.dispatch, candidates, ledger, plan.retry_elsewhere
            )
            plan.waiting_for_workers = len(assignment_round.unassigned)
            if assignment_round.unassigned:
                plan.due = min(plan.due, loop.time() + retry)
            await self._guarded(
                plan, self._end_round(plan, decision, assignment_round.assignments, capacities)
            )

    async def _without_cancelled(
        self, ready: list[tuple[DrivenPlan, SchedulingDecision]]
    ) -> list[tuple[DrivenPlan, SchedulingDecision]]:
        """``ready`` without the plans a cancel was requested for through another replica
        (one read for the round): no ticket is assigned for a plan already CANCELLED.
        They are cancelled in their next round, at once."""
        try:
            cancelled = await self._repo.cancel_requested([plan.plan_id for plan, _ in ready])
        except _TRANSIENT as exc:  # the round's own writes will say so
            _log.warning("checking for cancels failed", error=describe_error(exc))
            return ready
        for plan_id in cancelled:
            self.kick(plan_id, cancel_requested=True)
        return [(plan, decision) for plan, decision in ready if plan.plan_id not in cancelled]

    async def _end_round(
        self,
        plan: DrivenPlan,
        decision: SchedulingDecision,
        assignments: Sequence[Assignment],
        capacities: Mapping[str, int],
    ) -> None:
        """Store a dispatching plan's round: the observations with its assignments, then
        the plan status as the assignments left it (a PENDING plan whose first ticket was
        just assigned is RUNNING). Our own assignments never come back on the ticket watch
        (it excludes our changes), so deciding the status before them left it PENDING until
        the worker started the ticket or the next resync."""
        if assignments:
            await self._assign(plan, assignments, capacities)
        else:
            await self._flush(plan)
        await self._store_status(plan, plan.progress.after_dispatch(decision))

    async def _discover(self, capabilities: frozenset[str]) -> list[registry_pb.RankedWorker]:
        """The registry's ranked workers for ``capabilities`` (recent answers reused);
        none while it fails."""
        now = asyncio.get_running_loop().time()
        cached = self._discovered.get(capabilities)
        if cached is not None and now - cached[0] < self._settings.discovery_cache:
            return cached[1]
        try:
            ranked = await self._discover_ranked(capabilities, include_full=True)
            if len(ranked) >= _DISCOVERY_RESULTS:
                # Cut off: full workers with good records can fill the answer, and a
                # worker with free slots ranked below them would never be offered.
                seen = {r.worker.worker_id for r in ranked}
                spare = await self._discover_ranked(capabilities, include_full=False)
                ranked += [r for r in spare if r.worker.worker_id not in seen]
        except HiveError as exc:
            if isinstance(exc, _TRANSIENT):
                self._health.failed(REGISTRY, str(exc))
            _log.warning("worker discovery failed", error=describe_error(exc))
            return []
        self._health.succeeded(REGISTRY)
        self._discovered[capabilities] = (now, ranked)
        return ranked

    async def _discover_ranked(
        self, capabilities: frozenset[str], *, include_full: bool
    ) -> list[registry_pb.RankedWorker]:
        # Full ones too (include_full): we may have freed slots there since their heartbeat.
        return await self._registry.discover_workers(
            required_capabilities=sorted(capabilities),
            namespace=self._settings.namespace,
            max_results=_DISCOVERY_RESULTS,
            include_full=include_full,
        )

    def _forget_old_frees(self) -> None:
        """A worker heartbeats every few seconds: older frees are in the registry's count."""
        horizon = self._clock() - _FREED_SLOT_MEMORY
        for worker_id, slots in list(self._freed_slots.items()):
            del slots[: bisect.bisect_right(slots, horizon, key=freed_at)]
            if not slots:
                del self._freed_slots[worker_id]

    def _registry_lagging(self, discovered: set[str]) -> bool:
        """Whether a worker we freed a slot on recently is not yet offered by the registry
        with a spare slot (its heartbeat has not arrived): then look again soon."""
        now = asyncio.get_running_loop().time()
        window = self._settings.registry_lag_window
        self._freed_workers = {
            worker_id: at
            for worker_id, at in self._freed_workers.items()
            if worker_id not in discovered and now - at < window
        }
        return bool(self._freed_workers)

    def _in_calls(self, plan: DrivenPlan, items: Sequence[_OfTask]) -> Iterator[list[_OfTask]]:
        """``items`` in the batches of one ticket-service call each: ``ticket_batch_size``
        of them and :data:`TICKET_CALL_BYTES` of their tickets (which the answer carries)."""
        return bounded_batches(
            items,
            lambda item: _spec_bytes(plan, item.task_id),
            max_bytes=TICKET_CALL_BYTES,
            limit=self._settings.ticket_batch_size,
        )

    async def _assign(
        self, plan: DrivenPlan, assignments: Sequence[Assignment], capacities: Mapping[str, int]
    ) -> None:
        """The round's assignments of one plan, in batches (one call and one ticket-service
        transaction each; ``ticket_batch_size`` and :data:`TICKET_CALL_BYTES` of tickets,
        which the answer carries), each stored with the observations the round folded (one
        statement); a refused one is re-read and decided again next round, one refused for
        a full worker (``capacities``: checked by the ticket service) after dispatch_retry."""
        loop = asyncio.get_running_loop()
        failure: HiveError | None = None
        for chunk in self._in_calls(plan, assignments):
            requests = []
            for assignment in chunk:
                state = plan.tickets[assignment.task_id]
                assert state.ticket_id is not None
                requests.append(
                    ticket_pb.AssignTicketRequest(
                        ticket_id=state.ticket_id,
                        worker_id=assignment.worker_id,
                        attempt=state.attempt,
                        lease_seconds=self._settings.assign_lease_seconds,
                        expected_version=state.version,
                        worker_capacity=capacities.get(assignment.worker_id, 0),
                    )
                )
            results = await self._call_tickets(self._tickets.assign_tickets(requests))
            for assignment, request, result in zip(chunk, requests, results, strict=True):
                if isinstance(result, ResourceExhausted):
                    # Full with tickets another replica assigned (which the registry
                    # reports a heartbeat later): the task waits, its ticket unchanged.
                    self._metrics.assignments.labels("worker_full").inc()
                    _log.info(
                        "assignment refused: the worker is full",
                        plan_id=plan.plan_id,
                        task_id=assignment.task_id,
                        worker_id=assignment.worker_id,
                    )
                    plan.waiting_for_workers += 1
                    plan.due = min(plan.due, loop.time() + self._settings.dispatch_retry)
                    continue
                if isinstance(result, Aborted | FailedPrecondition | NotFound):
                    self._metrics.assignments.labels("refused").inc()
                    # Someone else changed the ticket (a race with a status change or
                    # another replica): re-read it; the next round decides again.
                    _log.info(
                        "assignment refused; re-reading the ticket",
                        plan_id=plan.plan_id,
                        task_id=assignment.task_id,
                        error=str(result),
                    )
                    ticket = await self._call_tickets(
                        self._tickets.get_ticket(ticket_id=request.ticket_id)
                    )
                    plan.due = 0.0
                elif isinstance(result, HiveError):
                    failure = failure or result
                    continue
                else:
                    ticket = result
                    self._metrics.assignments.labels("assigned").inc()
                    if ticket.worker_id == assignment.worker_id:
                        # The freed slot is taken again: no need to wait for the registry.
                        self._freed_workers.pop(assignment.worker_id, None)
                    _log.info(
                        "ticket assigned",
                        plan_id=plan.plan_id,
                        task_id=assignment.task_id,
                        worker_id=assignment.worker_id,
                        attempt=ticket.attempt,
                    )
                self._merge(plan, ticket_state(assignment.task_id, ticket))
            await self._flush(plan)
        if failure is not None:
            raise failure

    async def _call_tickets(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except _TRANSIENT as exc:
            self._health.failed(TICKET_SERVICE, str(exc))
            raise
        self._health.succeeded(TICKET_SERVICE)
        return result


def error_retry_delay(failed_rounds: int, *, first: float, cap: float) -> float:
    """Seconds until a plan whose last ``failed_rounds`` rounds failed tries again:
    ``first``, doubling with each failure, at most ``cap``."""
    doubled: float = first * 2 ** min(failed_rounds - 1, 30)
    return min(doubled, max(cap, first))


def _spec(plan: DrivenPlan, task_id: str) -> ticket_pb.TicketSpec:
    """The task's TicketSpec (C2), its size kept in ``plan.spec_bytes``."""
    spec = ticket_spec(plan.graph.plan, plan.graph.tasks[task_id])
    plan.spec_bytes[task_id] = spec.ByteSize()
    return spec


def _spec_bytes(plan: DrivenPlan, task_id: str) -> int:
    """The serialized size of the task's TicketSpec: about what its ticket weighs in a
    call or an answer (a result it may have aside)."""
    if task_id not in plan.spec_bytes:
        _spec(plan, task_id)
    return plan.spec_bytes[task_id]


def _plan_order(plan: DrivenPlan) -> tuple[int, datetime, str]:
    return (_PRIORITY_RANK[plan.priority], plan.created_at, plan.plan_id)


def _driven(lease: PlanLease, stored: StoredPlan) -> DrivenPlan:
    return DrivenPlan(
        lease=lease,
        progress=PlanProgress(PlanGraph(stored.plan), stored.ticket_states()),
        cancel_requested=stored.summary.cancel_requested_at is not None,
        status=stored.summary.status,
        error_message=stored.summary.error_message,
        created_at=stored.summary.created_at,
    )
