"""hive_common.heap."""

from __future__ import annotations

import gc
import weakref

from hive_common.heap import freeze_heap


def test_freeze_heap_takes_the_live_objects_out_of_collections() -> None:
    class Node:
        other: object = None

    try:
        gc.unfreeze()
        frozen_before = gc.get_freeze_count()
        freeze_heap()
        assert gc.get_freeze_count() > max(frozen_before, 1000)
        # Garbage made afterwards is still collected.
        a, b = Node(), Node()
        a.other, b.other = b, a
        probe = weakref.ref(a)
        del a, b
        gc.collect()
        assert probe() is None
    finally:
        gc.unfreeze()
