"""Group commit: items submitted while a call is in flight go together in the next call;
and :func:`bounded_batches`, consecutive lists of items bounded by count and bytes.

Every item waits for the next call of ``send``, which carries the items submitted since
the previous call went out: those submitted in the same turn of the event loop and those
submitted while a call was in flight. A lone item goes at once, so nothing waits longer
than one call; under load, many items share one call (one round trip, one transaction).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from hive_common.errors import Internal

I = TypeVar("I")  # noqa: E741 (the item type)
R = TypeVar("R")

# One answer per item, in order: its result, or the exception that item raises.
Send = Callable[[list[I]], Awaitable[Sequence[R | Exception]]]
# How many of the oldest waiting items (at least one) the next call carries.
Take = Callable[[Sequence[I]], int]


@dataclass(frozen=True, slots=True)
class _CallFailed:
    """The answer of every item of a call that failed as a whole."""

    error: Exception


# What an item's future holds: its answer from send (a refusal too, as a value), or the
# failure of its call.
_Answer: TypeAlias = R | Exception | _CallFailed


class GroupCommit(Generic[I, R]):
    """``await submit(item)`` → the item's answer from ``send``, or raises its error (a
    failed call raises its error for each of its items).

    ``take`` bounds a call (default: every waiting item; it is only asked about a non-empty
    queue); ``name`` names the sending task.
    """

    def __init__(self, send: Send[I, R], *, take: Take[I] | None = None, name: str) -> None:
        self._send = send
        self._take = take
        self._name = name
        self._queue: list[tuple[I, asyncio.Future[_Answer[R]]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        answer = await self._enqueue(item)
        if isinstance(answer, _CallFailed):
            raise answer.error
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def submit_many(self, items: Sequence[I]) -> list[R | Exception]:
        """Submit several items together; their answers in order, a refusal as its
        exception. Raises the error of a failed call carrying any of them (the other
        items may have been written)."""
        answers = await asyncio.gather(*(self._enqueue(item) for item in items))
        results: list[R | Exception] = []
        for answer in answers:
            if isinstance(answer, _CallFailed):
                raise answer.error
            results.append(answer)
        return results

    def _enqueue(self, item: I) -> asyncio.Future[_Answer[R]]:
        answer: asyncio.Future[_Answer[R]] = asyncio.get_running_loop().create_future()
        self._queue.append((item, answer))
        if self._sender is None:
            # Starts in the next turn of the loop: items submitted in this one go with it.
            self._sender = asyncio.create_task(self._send_queued(), name=self._name)
        return answer

    async def aclose(self) -> None:
        """Stop sending; items still waiting fail with ``CancelledError``. Submitting
        again starts afresh."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        for _, answer in self._queue:
            answer.cancel()
        self._queue.clear()

    def _next_call(self) -> list[tuple[I, asyncio.Future[_Answer[R]]]]:
        # An item whose waiter gave up (cancelled) before its call went out is not sent.
        self._queue = [(item, answer) for item, answer in self._queue if not answer.done()]
        count = len(self._queue)
        if count and self._take is not None:
            count = max(1, self._take([item for item, _ in self._queue]))
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    async def _send_queued(self) -> None:
        try:
            while batch := self._next_call():
                results: Sequence[_Answer[R]]
                try:
                    results = await self._send([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise Internal(f"{len(results)} answers to {len(batch)} items")
                except Exception as exc:  # the call failed: so did each of its items
                    results = [_CallFailed(exc)] * len(batch)
                except BaseException:
                    for _, answer in batch:
                        answer.cancel()
                    raise
                for (_, answer), result in zip(batch, results, strict=True):
                    if not answer.done():  # else its waiter gave up (cancelled)
                        answer.set_result(result)
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None


def distinct_prefix(key: Callable[[I], Hashable], *, limit: int) -> Take[I]:
    """A ``take``: the oldest items up to ``limit``, stopping before the first whose key
    an earlier one of them has (so no call carries two items for the same thing)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")

    def take(items: Sequence[I]) -> int:
        seen: set[Hashable] = set()
        for count, item in enumerate(items[:limit]):
            k = key(item)
            if k in seen:
                return count
            seen.add(k)
        return min(len(items), limit)

    return take


def bounded_batches(
    items: Iterable[I], size: Callable[[I], int], *, max_bytes: int, limit: int | None = None
) -> Iterator[list[I]]:
    """``items`` in order, in consecutive lists of at most ``limit`` items (None: any
    number) whose ``size`` adds up to at most ``max_bytes``; an item larger than that goes
    alone, so every list holds at least one. E.g. what one gRPC message may carry.

    Lazy: an item is sized when its list is filled, so taking the first list reads (and
    sizes) at most one item beyond it."""
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    batch: list[I] = []
    total = 0
    for item in items:
        item_size = size(item)
        if batch and (total + item_size > max_bytes or len(batch) == limit):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += item_size
    if batch:
        yield batch


__all__ = ["GroupCommit", "Send", "Take", "bounded_batches", "distinct_prefix"]
