"""Which workers can take a task, and in what order (DiscoverWorkers).

score = (w_spare * spare_fraction + w_success * success_rate + w_fresh * freshness)
        / (w_spare + w_success + w_fresh)

* spare_fraction = (max_concurrent - in_flight) / max_concurrent, in [0, 1]
* success_rate   = moving average of recent task outcomes, in [0, 1] (1.0 without history)
* freshness      = 1 - missed_intervals / missed_heartbeats, in [0, 1]; a worker that
                   heartbeats on schedule has 1.0, one about to turn UNHEALTHY nears 0

Ties (equal score, e.g. idle identical workers) are broken by ``tiebreak XOR seed``
ascending, where ``tiebreak`` is fixed per worker (from its id) and ``seed`` hashes the
request (capabilities, labels, namespace) and the current heartbeat interval number. The
order is therefore deterministic for a given request and clock, differs between kinds
of request (different task kinds prefer different equal workers) and rotates every
heartbeat interval, which spreads load among equals. Storage evaluates the same formula
in SQL to pick a small candidate window; this module decides the final order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from service_registry.domain.models import DiscoveryQuery, HealthPolicy, Worker


@dataclass(frozen=True, slots=True)
class RankingWeights:
    spare_capacity: float = 0.5
    success_rate: float = 0.3
    freshness: float = 0.2

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

    @property
    def normalized_weights(self) -> tuple[float, float, float]:
        return self._weights

    def is_eligible(self, worker: Worker, query: DiscoveryQuery, now: datetime) -> bool:
        """Live, not draining, not full, in the namespace, all capabilities, every label."""
        return (
            worker.namespace == query.namespace
            and not worker.draining
            and not self._policy.is_unhealthy(worker.last_heartbeat_at, now)
            and worker.in_flight < worker.max_concurrent
            and set(query.required_capabilities).issubset(worker.capabilities)
            and all(worker.labels.get(k) == v for k, v in query.label_selector.items())
        )

    def freshness(self, worker: Worker, now: datetime) -> float:
        missed = min(
            self._policy.missed_intervals(worker.last_heartbeat_at, now),
            self._policy.missed_heartbeats,
        )
        return 1.0 - missed / self._policy.missed_heartbeats

    def score(self, worker: Worker, now: datetime) -> float:
        w_spare, w_success, w_fresh = self._weights
        spare_fraction = worker.spare_capacity / worker.max_concurrent
        # Same operation order as the SQL in storage, so both agree to the last bit.
        return (
            w_spare * spare_fraction
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
        ranked.sort(key=lambda r: (-r.score, r.worker.tiebreak ^ seed))
        return ranked[: query.max_results]
