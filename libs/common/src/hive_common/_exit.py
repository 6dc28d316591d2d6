"""Child processes to stop when the interpreter exits (shared by localdb and procstack)."""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class StopAtExit(Generic[T]):
    """Weakly tracked objects stopped with ``stop`` at interpreter exit, if still tracked.

    The atexit hook is registered on the first :meth:`add`; a failing stop never hides the
    others.
    """

    def __init__(self, stop: Callable[[T], object]) -> None:
        self._stop = stop
        self._live: weakref.WeakSet[T] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._registered = False

    def add(self, item: T) -> None:
        with self._lock:
            if not self._registered:
                atexit.register(self._stop_all)
                self._registered = True
            self._live.add(item)

    def discard(self, item: T) -> None:
        self._live.discard(item)

    def _stop_all(self) -> None:
        for item in list(self._live):
            with contextlib.suppress(Exception):
                self._stop(item)
