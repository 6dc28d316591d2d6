"""Background loops: the outbox relay to MongoDB, the lease sweeper, metric refresh.

Each loop survives its dependencies being down, and any other failure of a round: it logs,
backs off and keeps going.
Ticket operations never wait for these loops (the relay reads committed outbox rows).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from execution_ticket_service.domain.clock import Clock, utc_now
from execution_ticket_service.metrics import TicketMetrics
from execution_ticket_service.signals import ChangeSignal, spaced_delay
from execution_ticket_service.storage.audit import AuditStore
from execution_ticket_service.storage.tickets import TicketRepository
from hive_common.errors import Unavailable
from hive_common.logging import get_logger, log_round_failure

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    batch_size: int = 500
    idle_interval: float = 0.5
    # Rounds start at least this far apart, so a stream of changes is written in batches
    # (each MongoDB write costs far more than one more document in it); see spaced_delay.
    batch_window: float = 0.15
    claim_seconds: float = 30.0
    max_backoff: float = 10.0


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, *, base: float = 0.2, cap: float = 10.0) -> None:
        self._base = base
        self._cap = cap
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next_delay(self) -> float:
        self._failures += 1
        return random.uniform(0, min(self._cap, self._base * 2 ** min(self._failures, 16)))


class OutboxRelay:
    """Delivers outbox rows to the MongoDB audit trail, at least once, in small batches."""

    def __init__(
        self,
        *,
        repository: TicketRepository,
        audit: AuditStore,
        metrics: TicketMetrics,
        signal: ChangeSignal,
        settings: RelaySettings,
    ) -> None:
        self._repository = repository
        self._audit = audit
        self._metrics = metrics
        self._signal = signal
        self._settings = settings
        self._indexes_ready = False
        self.healthy = False  # last round reached MongoDB (shown by /ready as degraded)

    async def relay_once(self) -> int:
        """Deliver one batch; returns how many events were delivered."""
        if not self._indexes_ready:
            await self._audit.ensure_indexes()
            self._indexes_ready = True
        entries = await self._repository.claim_outbox(
            limit=self._settings.batch_size, claim_seconds=self._settings.claim_seconds
        )
        if not entries:
            await self._audit.ping()
            return 0
        seqs = [entry.seq for entry in entries]
        try:
            await self._audit.record(entries)
        except Exception:
            # Hand the rows back at once; the claim would expire anyway.
            await self._repository.release_claims(seqs)
            raise
        await self._repository.mark_relayed(seqs)
        self._metrics.relayed.inc(len(entries))
        return len(entries)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(cap=self._settings.max_backoff)
        while True:
            generation = self._signal.generation
            last_claim = loop.time()
            try:
                delivered = await self.relay_once()
                self.healthy = True
                backoff.reset()
            except Exception as exc:
                self.healthy = False
                self._metrics.relay_failures.inc()
                log_round_failure(log, "audit relay round failed", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            if delivered < self._settings.batch_size:
                await self._signal.wait(generation, self._settings.idle_interval)
                if self._signal.generation != generation:
                    delay = spaced_delay(
                        now=loop.time(), last=last_claim, gap=self._settings.batch_window
                    )
                    if delay > 0:
                        await asyncio.sleep(delay)


class LeaseSweeper:
    """Re-queues (or fails) tickets whose lease passed; safe to run on every replica.

    A lease is the time a worker has to report. While this replica cannot hear reports
    (it was not running, or its database did not answer) the workers' reports wait in
    their retries, so for ``grace`` after it starts or its database answers again no
    lease expires: the reports held back get in first. Without it, a database outage
    longer than a lease failed (or re-ran) tasks that had finished during the outage.
    """

    def __init__(
        self,
        *,
        repository: TicketRepository,
        interval: float,
        grace: timedelta = timedelta(0),
        clock: Clock = utc_now,
        batch_size: int = 100,
    ) -> None:
        self._repository = repository
        self._interval = interval
        self._grace = grace
        self._clock = clock
        self._batch_size = batch_size
        # Since when reports could reach the database through this replica; None while
        # the database does not answer.
        self._heard_since: datetime | None = clock()

    async def sweep_round(self) -> None:
        """Expire the leases that passed, unless in the grace (then only check that the
        database answers)."""
        now = self._clock()
        try:
            if self._heard_since is None or now - self._heard_since < self._grace:
                await self._repository.ping()
                if self._heard_since is None:
                    self._heard_since = now
                    log.info(
                        "database answers again; leases expire again after the grace",
                        grace_seconds=self._grace.total_seconds(),
                    )
                return
            await self.sweep_once()
        except Unavailable:
            self._heard_since = None
            raise

    async def sweep_once(self) -> int:
        total = 0
        while True:
            events = await self._repository.expire_leases(limit=self._batch_size)
            total += len(events)
            for event in events:
                # The attempt whose lease passed, and why (the ticket's own attempt is
                # already the next one when it was re-queued).
                log.info(
                    "lease expired",
                    ticket_id=event.ticket.ticket_id,
                    plan_id=event.ticket.spec.plan_id,
                    worker_id=event.worker_id,
                    expired_attempt=event.details.get("expired_attempt"),
                    reason=event.details.get("error_message"),
                    status=event.ticket.status.value,
                    attempt=event.ticket.attempt,
                )
            if len(events) < self._batch_size:
                return total

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_round()
            except Exception as exc:
                log_round_failure(log, "lease sweep failed", exc)
            await asyncio.sleep(self._interval)


class StatsRefresher:
    """Refreshes gauges that need a query: unfinished tickets by status, outbox backlog
    and lag."""

    def __init__(
        self,
        *,
        repository: TicketRepository,
        metrics: TicketMetrics,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._interval = interval
        self._clock = clock  # the one that stamps the events

    async def refresh_once(self) -> None:
        self._metrics.set_status_counts(await self._repository.count_unfinished())
        pending, oldest = await self._repository.outbox_backlog()
        self._metrics.set_backlog(pending, oldest, self._clock())

    async def run(self) -> None:
        while True:
            try:
                await self.refresh_once()
            except Exception as exc:
                log_round_failure(log, "metrics refresh failed", exc)
            await asyncio.sleep(self._interval)


class EventPurger:
    """Keeps the event log bounded: relayed events older than the retention are deleted.

    A WatchTickets cursor from before a deleted event is then refused (the purge mark:
    see ``TicketRepository.events_after`` and ``check_resumable``).
    """

    def __init__(
        self,
        *,
        repository: TicketRepository,
        retention: timedelta,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        self._repository = repository
        self._retention = retention
        self._interval = interval
        self._clock = clock  # the one that stamps the events

    async def purge_once(self) -> int:
        cutoff = self._clock() - self._retention
        total = 0
        while True:
            deleted = await self._repository.purge_events(older_than=cutoff)
            total += deleted
            if deleted == 0:
                return total

    async def run(self) -> None:
        while True:
            try:
                deleted = await self.purge_once()
                if deleted:
                    log.info("old events purged", deleted=deleted)
            except Exception as exc:
                log_round_failure(log, "event purge failed", exc)
            await asyncio.sleep(self._interval)
