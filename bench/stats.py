"""Latency summaries and a closed-loop load generator."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in 0..1); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class LoadResult:
    """What a closed-loop run measured: call count, wall time, per-call latency (seconds)."""

    calls: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        """Successful calls per second."""
        return (self.calls - self.errors) / self.elapsed if self.elapsed > 0 else math.nan

    def p(self, fraction: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies, fraction) * 1000.0

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": self.elapsed,
            "rate_per_s": self.rate,
            "p50_ms": self.p(0.50),
            "p90_ms": self.p(0.90),
            "p99_ms": self.p(0.99),
            "max_ms": max(self.latencies) * 1000.0 if self.latencies else math.nan,
        }


async def closed_loop(
    call: Callable[[int], Awaitable[object]], *, concurrency: int, total: int
) -> LoadResult:
    """Run ``call(i)`` for i in 0..total-1 from ``concurrency`` clients, each starting its
    next call when the previous one answered (a closed loop: offered load = concurrency)."""
    next_index = 0
    latencies: list[float] = []
    errors = 0
    first_error = ""

    async def client() -> None:
        nonlocal next_index, errors, first_error
        while next_index < total:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                await call(index)
            except Exception as exc:  # reported, not raised: one failure must not hide the rest
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:500]
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(
        calls=total,
        elapsed=time.perf_counter() - start,
        latencies=latencies,
        errors=errors,
        first_error=first_error,
    )
