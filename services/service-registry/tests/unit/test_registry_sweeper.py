"""HealthSweeper's loop survives any failed round.

It caught only HiveError: anything else (an OverflowError from a huge
HIVE_REGISTRY_EVENT_RETENTION_SECONDS) ended the task without a word, and no worker
ever expired again.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from hive_common.errors import Unavailable
from hive_testsupport.clock import ManualClock
from service_registry.domain.models import WorkerStatus
from service_registry.metrics import RegistryMetrics
from service_registry.storage import SweepResult, WorkerRepository
from service_registry.sweeper import HealthSweeper


class FlakyRepository:
    """A repository whose first sweep raises ``error``; later ones find nothing."""

    def __init__(self, error: Exception) -> None:
        self._error: Exception | None = error
        self.sweeps = 0
        self.second_sweep = asyncio.Event()

    async def sweep(self, *, now: datetime) -> SweepResult:
        self.sweeps += 1
        if self.sweeps >= 2:
            self.second_sweep.set()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return SweepResult(unhealthy=[], expired=[])

    async def prune_events(self, *, older_than: datetime) -> int:
        return 0

    async def count_by_status(self, *, now: datetime) -> dict[WorkerStatus, int]:
        return {}


class RecordingLogger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, **fields)


@pytest.mark.parametrize(
    ("error", "level"),
    [
        # A defect: logged with its traceback (exc_info), like the ticket service's loops.
        (OverflowError("date value out of range"), "error"),
        # The database away: a warning, as before.
        (Unavailable("database unavailable"), "warning"),
    ],
)
async def test_a_failed_round_is_logged_and_the_next_round_runs(
    error: Exception, level: str
) -> None:
    repository = FlakyRepository(error)
    logger = RecordingLogger()
    sweeper = HealthSweeper(
        repository=cast(WorkerRepository, repository),
        clock=ManualClock(),
        metrics=RegistryMetrics(CollectorRegistry()),
        logger=logger,
        interval_seconds=0.001,
        mass_transition_threshold=10,
        event_retention=timedelta(hours=1),
    )
    sweeper.start()
    try:
        await asyncio.wait_for(repository.second_sweep.wait(), timeout=5)
    finally:
        await sweeper.stop()

    [(logged_level, event, fields)] = logger.lines
    assert (logged_level, event) == (level, "sweep failed")
    if level == "error":
        assert fields == {"exc_info": error}
    else:
        assert fields["code"] == "UNAVAILABLE"
