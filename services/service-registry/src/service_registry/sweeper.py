"""HealthSweeper: announces UNHEALTHY workers and removes EXPIRED ones, on every replica.

Several replicas may sweep at once: each row changes once (see WorkerRepository.sweep).
Many transitions in one sweep (a network partition, a registry outage) are never silent:
they are events, a metric, and a warning log line naming how many and which.
A round that fails is logged and the next one runs: whatever went wrong, the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from hive_common.logging import log_round_failure
from service_registry.domain.clock import Clock
from service_registry.domain.models import WorkerEventType
from service_registry.metrics import RegistryMetrics
from service_registry.storage import SweepResult, WorkerRepository

_NAMES_IN_LOG = 20


class HealthSweeper:
    def __init__(
        self,
        *,
        repository: WorkerRepository,
        clock: Clock,
        metrics: RegistryMetrics,
        logger: Any,
        interval_seconds: float,
        mass_transition_threshold: int,
        event_retention: timedelta,
    ) -> None:
        self._repository = repository
        self._clock = clock
        self._metrics = metrics
        self._logger = logger
        self._interval = interval_seconds
        self._threshold = mass_transition_threshold
        self._retention = event_retention
        self._task: asyncio.Task[None] | None = None

    async def sweep_once(self) -> SweepResult:
        now = self._clock.now()
        result = await self._repository.sweep(now=now)
        self._report("unhealthy", [w.name for w in result.unhealthy])
        self._report("expired", [f"{w.namespace}/{w.name}" for w in result.expired])
        self._metrics.count_events(
            [WorkerEventType.EXPIRED] * len(result.expired)
            + [WorkerEventType.UNHEALTHY] * len(result.unhealthy)
        )
        await self._repository.prune_events(older_than=now - self._retention)
        self._metrics.set_worker_counts(await self._repository.count_by_status(now=now))
        return result

    def _report(self, transition: str, names: list[str]) -> None:
        if not names:
            return
        if len(names) >= self._threshold:
            self._metrics.mass_transitions.labels(transition).inc()
            self._logger.warning(
                "MASS_WORKER_TRANSITION",
                transition=transition,
                count=len(names),
                workers=names[:_NAMES_IN_LOG],
                detail="many workers missed their heartbeats at once: check the network "
                "between workers and the registry before trusting this",
            )
        else:
            self._logger.info("workers " + transition, count=len(names), workers=names)

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception as exc:
                # The database briefly away (the next sweep catches up), or a defect: a
                # sweeper that died silently would never expire a worker again.
                log_round_failure(self._logger, "sweep failed", exc)
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-health-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
