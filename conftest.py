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
        self.records.append(record)


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
