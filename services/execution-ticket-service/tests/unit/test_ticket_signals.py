"""ChangeSignal: wake-ups, time-outs, and a cancellation racing a wake-up is never lost."""

from __future__ import annotations

import asyncio

import pytest

from execution_ticket_service.signals import ChangeSignal


async def test_wait_returns_on_a_change_or_after_max_wait() -> None:
    signal = ChangeSignal()
    generation = signal.generation
    waiter = asyncio.create_task(signal.wait(generation, 60))
    await asyncio.sleep(0)
    assert not waiter.done()
    signal.notify()
    await waiter
    assert signal.generation == generation + 1
    # Already past the generation: returns at once; otherwise the time-out ends the wait.
    await signal.wait(generation, 60)
    await signal.wait(signal.generation, 0.01)


async def test_a_cancel_that_races_the_wake_up_is_not_lost() -> None:
    signal = ChangeSignal()
    waiter = asyncio.create_task(signal.wait(signal.generation, 60))
    await asyncio.sleep(0)  # the waiter is now parked on the event
    # The wake-up and the cancel land in the same loop iteration (what a stop that races
    # a change does); asyncio.wait_for on 3.11 returned normally here, dropping the cancel.
    signal.notify()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled()
