"""The time source every orchestrator component takes as ``clock`` (tests pass a fake)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeAlias

Clock: TypeAlias = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time in UTC: the default :data:`Clock`."""
    return datetime.now(UTC)
