"""GroupCommit: which items share a call, and what each waiter gets back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from hive_common.batching import GroupCommit, bounded_batches, distinct_prefix
from hive_common.errors import FailedPrecondition, Internal, Unavailable


class Recorder:
    """Answers each item with its upper case (or a scripted refusal); calls wait for
    ``gate`` when it is set to a pending event."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.refuse: dict[str, Exception] = {}
        self.fail_call: Exception | None = None
        self.answers_short = False
        self.gate: asyncio.Event | None = None

    async def send(self, items: list[str]) -> list[str | Exception]:
        self.calls.append(items)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_call is not None:
            raise self.fail_call
        answers = [self.refuse.get(item) or item.upper() for item in items]
        return answers[:-1] if self.answers_short else answers


def gated() -> tuple[Recorder, asyncio.Event, GroupCommit[str, str]]:
    """A group whose calls wait until the returned gate is set."""
    recorder = Recorder()
    recorder.gate = gate = asyncio.Event()
    return recorder, gate, GroupCommit(recorder.send, name="test")


async def submitted(group: GroupCommit[str, str], items: Sequence[str]) -> list[asyncio.Task[str]]:
    """The items submitted, each by its own task, once the loop has sent what it could."""
    tasks = [asyncio.create_task(group.submit(item)) for item in items]
    await asyncio.sleep(0.01)
    return tasks


async def test_items_of_one_turn_and_those_made_during_a_call_share_the_next_call() -> None:
    recorder, gate, group = gated()
    first = await submitted(group, ["a", "b"])
    assert recorder.calls == [["a", "b"]]
    later = await submitted(group, ["c", "d", "e"])
    assert recorder.calls == [["a", "b"]]  # waiting for the call in flight
    gate.set()
    assert await asyncio.gather(*first, *later) == ["A", "B", "C", "D", "E"]
    assert recorder.calls == [["a", "b"], ["c", "d", "e"]]
    assert await group.submit("f") == "F"  # idle again: alone, at once
    assert recorder.calls[-1] == ["f"]


async def test_each_item_gets_its_own_answer_or_its_calls_failure() -> None:
    recorder = Recorder()
    recorder.refuse["b"] = FailedPrecondition("b is finished")
    group: GroupCommit[str, str] = GroupCommit(recorder.send, name="test")
    a, b = await asyncio.gather(group.submit("a"), group.submit("b"), return_exceptions=True)
    assert a == "A"
    assert isinstance(b, FailedPrecondition)
    recorder.fail_call = Unavailable("database restarting")
    results = await asyncio.gather(group.submit("c"), group.submit("d"), return_exceptions=True)
    assert [type(r) for r in results] == [Unavailable, Unavailable]
    recorder.fail_call = None
    recorder.answers_short = True  # a wrong number of answers: an error each, nobody hangs
    results = await asyncio.gather(group.submit("e"), group.submit("f"), return_exceptions=True)
    assert [type(r) for r in results] == [Internal, Internal]


async def test_distinct_prefix_keeps_repeated_keys_for_a_later_call_in_order() -> None:
    recorder = Recorder()
    take = distinct_prefix(lambda item: str(item)[0], limit=3)
    group: GroupCommit[str, str] = GroupCommit(recorder.send, take=take, name="test")
    items = ["a1", "b1", "a2", "c1", "d1", "e1", "f1"]
    answers = await asyncio.gather(*(group.submit(item) for item in items))
    assert answers == [item.upper() for item in items]
    assert recorder.calls == [["a1", "b1"], ["a2", "c1", "d1"], ["e1", "f1"]]
    with pytest.raises(ValueError, match="at least 1"):
        distinct_prefix(lambda item: item, limit=0)


async def test_the_sender_ends_cleanly_once_the_queue_drains() -> None:
    recorder = Recorder()
    asked: list[int] = []

    def first_only(items: Sequence[str]) -> int:  # a take may read the oldest item
        asked.append(len(items))
        return 1

    group: GroupCommit[str, str] = GroupCommit(recorder.send, take=first_only, name="drain")
    for round_items in (["a", "b"], ["c"]):
        pending = [asyncio.create_task(group.submit(item)) for item in round_items]
        await asyncio.sleep(0)  # the sender has started
        (sender,) = [task for task in asyncio.all_tasks() if task.get_name() == "drain"]
        assert await asyncio.gather(*pending) == [item.upper() for item in round_items]
        await sender  # ends without an error
    assert recorder.calls == [["a"], ["b"], ["c"]]
    assert 0 not in asked  # never asked about an empty queue


async def test_a_cancelled_waiter_is_not_sent_if_still_waiting_and_disturbs_nobody() -> None:
    recorder, gate, group = gated()
    quitter, stayer = await submitted(group, ["a", "b"])
    queued = await submitted(group, ["c", "d"])
    quitter.cancel()  # its call is in flight: answered, the answer dropped
    queued[0].cancel()  # still waiting for a call: never sent
    gate.set()
    assert await stayer == "B"
    assert await queued[1] == "D"
    assert quitter.cancelled()
    assert queued[0].cancelled()
    assert recorder.calls == [["a", "b"], ["d"]]


async def test_closing_cancels_the_items_still_waiting_and_a_new_submit_starts_afresh() -> None:
    _, gate, group = gated()
    waiting = await submitted(group, ["a", "b"])
    await group.aclose()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    gate.set()
    assert await group.submit("c") == "C"


async def test_submit_many_answers_in_order_and_raises_only_a_failed_call() -> None:
    recorder = Recorder()
    recorder.refuse["b"] = FailedPrecondition("b is finished")
    group: GroupCommit[str, str] = GroupCommit(recorder.send, name="test")
    lone, many = await asyncio.gather(group.submit("x"), group.submit_many(["a", "b", "c"]))
    assert lone == "X"
    assert many[0::2] == ["A", "C"]
    assert isinstance(many[1], FailedPrecondition)  # a refusal is an answer
    assert recorder.calls == [["x", "a", "b", "c"]]  # with the concurrent submit
    recorder.fail_call = Unavailable("database restarting")
    with pytest.raises(Unavailable):
        await group.submit_many(["d", "e"])


def test_bounded_batches_bound_count_and_bytes_and_send_a_large_item_alone() -> None:
    sizes = [3, 3, 3, 9, 1, 1, 1, 1, 1]
    batches = list(bounded_batches(sizes, lambda n: n, max_bytes=6, limit=3))
    assert batches == [[3, 3], [3], [9], [1, 1, 1], [1, 1]]
    assert list(bounded_batches([], len, max_bytes=1)) == []
    with pytest.raises(ValueError, match="limit"):
        next(bounded_batches([1], lambda n: n, max_bytes=1, limit=0))


def test_bounded_batches_size_no_more_than_one_item_beyond_the_first_batch() -> None:
    sized: list[int] = []

    def size(item: int) -> int:
        sized.append(item)
        return 10

    first = next(bounded_batches(iter(range(100)), size, max_bytes=25))
    assert first == [0, 1]
    assert sized == [0, 1, 2]
