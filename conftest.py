"""Checks for every test in the repository."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not _closed_loop_of_an_earlier_test(record):
            self.records.append(record)


def _closed_loop_of_an_earlier_test(record: logging.LogRecord) -> bool:
    """grpc.aio's poller thread handing a completion to the event loop of the test that
    made the call, after that loop was closed (pytest-asyncio gives each test a loop of
    its own): an artifact of many loops in one process, where a service has one for its
    life. Nothing of the test that sees it went wrong."""
    error = record.exc_info[1] if record.exc_info else None
    return (
        "PollerCompletionQueue._handle_events" in record.getMessage()
        and isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"
    )


@pytest.fixture(autouse=True)
def no_unhandled_asyncio_errors() -> Iterator[None]:
    """Fail a test during which asyncio reported an exception nobody handled ("Task
    exception was never retrieved", "Exception in callback"): a background task or
    stream that died, which no assertion on the results would notice."""
    records = _Records()
    logger = logging.getLogger("asyncio")
    logger.addHandler(records)
    try:
        yield
    finally:
        logger.removeHandler(records)
    if records.records:
        reports = "\n\n".join(logging.Formatter().format(r) for r in records.records)
        pytest.fail(f"asyncio reported exceptions nobody handled:\n{reports}")
