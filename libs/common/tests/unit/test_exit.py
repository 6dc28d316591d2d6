"""StopAtExit: what is still tracked at interpreter exit gets stopped, failures aside."""

from __future__ import annotations

import atexit

import pytest

from hive_common._exit import StopAtExit


class Proc:
    def __init__(self, name: str, *, fails: bool = False) -> None:
        self.name = name
        self.fails = fails


def test_tracked_items_are_stopped_once_the_hook_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks: list[object] = []
    monkeypatch.setattr(atexit, "register", hooks.append)
    stopped: list[str] = []

    def stop(proc: Proc) -> None:
        if proc.fails:
            raise RuntimeError("already gone")
        stopped.append(proc.name)

    tracker: StopAtExit[Proc] = StopAtExit(stop)
    kept, failing, finished = Proc("kept"), Proc("failing", fails=True), Proc("finished")
    for proc in (kept, failing, finished):
        tracker.add(proc)
    tracker.discard(finished)  # stopped by its owner already
    assert len(hooks) == 1  # registered once, on the first add
    tracker._stop_all()
    assert stopped == ["kept"]  # the failing stop did not keep "kept" running
