"""RegistryService: the registry's use cases over a worker store, a clock and a ranker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

from service_registry.domain.clock import Clock
from service_registry.domain.lifecycle import Transition
from service_registry.domain.models import (
    DiscoveryQuery,
    HeartbeatUpdate,
    ListQuery,
    RegistrationSpec,
    Worker,
    WorkerEvent,
    WorkerPage,
)
from service_registry.domain.ranking import RankedWorker, WorkerRanker


class WorkerStore(Protocol):
    """What the service needs from storage (implemented by ``storage.WorkerRepository``)."""

    async def register(self, spec: RegistrationSpec, *, now: datetime) -> Transition: ...

    async def heartbeat(self, update: HeartbeatUpdate, *, now: datetime) -> Transition: ...

    async def deregister(self, worker_id: uuid.UUID, *, now: datetime) -> WorkerEvent | None: ...

    async def get(self, worker_id: uuid.UUID, *, now: datetime) -> Worker: ...

    async def list_page(self, query: ListQuery, *, now: datetime) -> WorkerPage: ...

    async def discovery_candidates(
        self, query: DiscoveryQuery, *, now: datetime, seed: int, window: int
    ) -> list[Worker]: ...

    async def latest_event_sequence(self) -> int: ...

    async def events_after(
        self, sequence: int, *, namespace: str | None, limit: int = 500
    ) -> list[WorkerEvent]: ...


class RegistryService:
    """Register, heartbeat, deregister, discover, get, list and watch workers."""

    def __init__(
        self,
        *,
        store: WorkerStore,
        clock: Clock,
        ranker: WorkerRanker,
        watch_poll_interval_seconds: float = 0.25,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ranker = ranker
        self._watch_poll = watch_poll_interval_seconds
        self._draining = asyncio.Event()

    async def end_watches(self) -> None:
        """End every watch at its next idle moment: a stop would otherwise wait for the
        endless streams until its grace period ends (watchers start again at a replica
        still running, or this one once it is back)."""
        self._draining.set()

    async def register(self, spec: RegistrationSpec) -> Transition:
        return await self._store.register(spec, now=self._clock.now())

    async def heartbeat(self, update: HeartbeatUpdate) -> Transition:
        return await self._store.heartbeat(update, now=self._clock.now())

    async def deregister(self, worker_id: uuid.UUID) -> WorkerEvent | None:
        """The event published (DEREGISTERED, or EXPIRED for a worker past its TTL);
        ``None`` if the worker was already gone."""
        return await self._store.deregister(worker_id, now=self._clock.now())

    async def get(self, worker_id: uuid.UUID) -> Worker:
        return await self._store.get(worker_id, now=self._clock.now())

    async def list_workers(self, query: ListQuery) -> WorkerPage:
        return await self._store.list_page(query, now=self._clock.now())

    async def discover(self, query: DiscoveryQuery) -> list[RankedWorker]:
        now = self._clock.now()
        # Storage filters and orders by the same key and tie-break, so the window only
        # needs max_results rows; the ranker re-checks eligibility and computes scores.
        candidates = await self._store.discovery_candidates(
            query, now=now, seed=self._ranker.seed(query, now), window=query.max_results
        )
        return self._ranker.rank(candidates, query, now)

    async def watch_position(self) -> int:
        """The current end of the event log (where a new watcher starts)."""
        return await self._store.latest_event_sequence()

    async def watch(self, *, namespace: str | None, after: int) -> AsyncIterator[WorkerEvent]:
        """Events after position ``after``, in order, until the caller stops iterating.

        The contract has no resume position, so a watcher starts at the current end of
        the log (:meth:`watch_position`); storage guarantees sequence order is commit
        order, so polling by position never skips an event.
        """
        position = after
        while True:
            events = await self._store.events_after(position, namespace=namespace)
            for event in events:
                position = event.sequence
                yield event
            if not events:
                if self._draining.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._draining.wait(), self._watch_poll)
