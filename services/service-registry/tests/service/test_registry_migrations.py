"""The registry's schema migrations on a fresh database."""

from __future__ import annotations

import pytest

from hive_common.migrations import apply_migrations
from service_registry.app import MIGRATIONS_DIR

pytestmark = pytest.mark.service


def test_migrations_write_nothing_to_stdout(
    postgres_dsn: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # The migration runner prints what a SELECT returns: a table in the middle of the
    # service's JSON log lines.
    assert apply_migrations(dsn=postgres_dsn, directory=MIGRATIONS_DIR)
    assert capfd.readouterr().out == ""
