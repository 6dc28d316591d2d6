"""In-process wake-ups: writers say "something changed", pollers stop sleeping early."""

from __future__ import annotations

import asyncio
import contextlib


def spaced_delay(*, now: float, last: float, gap: float) -> float:
    """How long to wait, after a change woke a loop, before its next round.

    Rounds start at least ``gap`` apart: a change after a quiet spell is handled at once,
    changes arriving meanwhile wait for the rest of the gap and are handled together; a
    round that took longer than the gap is followed at once (no gap on top of it).
    """
    return max(0.0, last + gap - now)


class ChangeSignal:
    """A generation counter plus an event; other replicas' changes are found by polling."""

    def __init__(self) -> None:
        self._generation = 0
        self._event = asyncio.Event()

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        self._generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, since: int, max_wait: float) -> None:
        """Return after a change past generation ``since``, or after ``max_wait`` seconds."""
        if self._generation != since:
            return
        # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that arrives as the
        # event is set, and the cancelled loop went on (a stop then waited for it forever).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await self._event.wait()
