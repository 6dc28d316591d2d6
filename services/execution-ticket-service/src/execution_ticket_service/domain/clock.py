"""The ticket service's time source: a function, injectable so tests control time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the default :data:`Clock`)."""
    return datetime.now(UTC)


__all__ = ["Clock", "utc_now"]
