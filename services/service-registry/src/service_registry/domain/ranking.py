"""Which workers can take a task, and in what order (DiscoverWorkers).

With weights normalised to sum 1 (defaults: spare 0.6, success 0.3, freshness 0.1)::

    score = w_spare * spare_fraction + w_success * success_rate + w_fresh * freshness

* spare_fraction = (max_concurrent - in_flight) / max_concurrent, in [0, 1]
* success_rate   = moving average of recent task outcomes, in [0, 1] (1.0 without history)
* freshness      = 1 - heartbeat_age / unhealthy_after, in [0, 1] for a live worker

Freshness is linear in the heartbeat time on purpose: ``score`` then equals a per-worker
``rank_key`` (no clock in it) plus a term that is the same for every worker at a given
instant. Storage keeps ``rank_key`` in an indexed column, written at every registration
and heartbeat, so discovery over many workers reads the best few from an index instead of
scoring them all. It also rotates equals: among otherwise identical workers, the one
that heartbeated last comes first, and that changes as heartbeats arrive.

Exact ties (same key, e.g. workers that heartbeated in the same instant) are broken by
``tiebreak XOR seed`` ascending, where ``tiebreak`` is fixed per worker (from its id) and
``seed`` hashes the request (capabilities, labels, namespace) and the current heartbeat
interval number: deterministic for a given request and clock, different between kinds
of request, and rotating every interval, which spreads load among equals.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from service_registry.domain.models import DiscoveryQuery, HealthPolicy, Worker

RANK_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
"""Origin of the heartbeat term of ``rank_key``; keeps the stored numbers small."""


@dataclass(frozen=True, slots=True)
class RankingWeights:
    spare_capacity: float = 0.6
    success_rate: float = 0.3
    freshness: float = 0.1

    def __post_init__(self) -> None:
        parts = (self.spare_capacity, self.success_rate, self.freshness)
        if any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
            raise ValueError("ranking weights must be finite, non-negative and not all zero")

    def normalized(self) -> tuple[float, float, float]:
        total = self.spare_capacity + self.success_rate + self.freshness
        return (self.spare_capacity / total, self.success_rate / total, self.freshness / total)


@dataclass(frozen=True, slots=True)
class RankedWorker:
    worker: Worker
    score: float
    spare_capacity: int


class WorkerRanker:
    """Filters and orders discovery candidates; see the module docstring for the formula."""

    def __init__(self, *, policy: HealthPolicy, weights: RankingWeights | None = None) -> None:
        self._policy = policy
        self._weights = (weights or RankingWeights()).normalized()

    def is_eligible(self, worker: Worker, query: DiscoveryQuery, now: datetime) -> bool:
        """Live, not draining, not full (unless asked for), in the namespace, all
        capabilities, every label."""
        return (
            worker.namespace == query.namespace
            and not worker.draining
            and not self._policy.is_unhealthy(worker.last_heartbeat_at, now)
            and (query.include_full or worker.in_flight < worker.max_concurrent)
            and set(query.required_capabilities).issubset(worker.capabilities)
            and all(worker.labels.get(k) == v for k, v in query.label_selector.items())
        )

    def freshness(self, worker: Worker, now: datetime) -> float:
        age = (now - worker.last_heartbeat_at).total_seconds()
        limit = self._policy.unhealthy_after.total_seconds()
        return min(1.0, max(0.0, 1.0 - age / limit))

    def rank_key(self, worker: Worker) -> float:
        """``score`` minus a term shared by all workers at one instant; higher ranks first.

        Stored and indexed by the repository; it does not depend on the clock.
        """
        w_spare, w_success, w_fresh = self._weights
        heartbeat = (worker.last_heartbeat_at - RANK_EPOCH).total_seconds()
        return (
            w_spare * (worker.spare_capacity / worker.max_concurrent)
            + w_success * worker.success_rate
            + w_fresh * (heartbeat / self._policy.unhealthy_after.total_seconds())
        )

    def score(self, worker: Worker, now: datetime) -> float:
        w_spare, w_success, w_fresh = self._weights
        return (
            w_spare * (worker.spare_capacity / worker.max_concurrent)
            + w_success * worker.success_rate
            + w_fresh * self.freshness(worker, now)
        )

    def seed(self, query: DiscoveryQuery, now: datetime) -> int:
        """Signed 64-bit seed for the tie-break (same request + same interval -> same seed)."""
        interval_number = math.floor(
            now.timestamp() / self._policy.heartbeat_interval.total_seconds()
        )
        key = json.dumps(
            [
                sorted(query.required_capabilities),
                sorted(query.label_selector.items()),
                query.namespace,
                interval_number,
            ],
            separators=(",", ":"),
        )
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    def rank(
        self, candidates: Iterable[Worker], query: DiscoveryQuery, now: datetime
    ) -> list[RankedWorker]:
        """The eligible candidates, best first, at most ``query.max_results``."""
        seed = self.seed(query, now)
        ranked = [
            RankedWorker(worker=w, score=self.score(w, now), spare_capacity=w.spare_capacity)
            for w in candidates
            if self.is_eligible(w, query, now)
        ]
        keys = {r.worker.worker_id: self.rank_key(r.worker) for r in ranked}
        ranked.sort(key=lambda r: (-keys[r.worker.worker_id], r.worker.tiebreak ^ seed))
        return ranked[: query.max_results]
