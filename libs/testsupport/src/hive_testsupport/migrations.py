"""Schema migrations in tests: a database of an earlier schema, and rolling one back."""

from __future__ import annotations

import shutil
from pathlib import Path

from yoyo import get_backend, read_migrations

from hive_common.migrations import postgres_url


def migrations_until(directory: Path, last: str, *, into: Path) -> Path:
    """Copy the migrations of ``directory`` up to and including ``last`` (with their
    rollbacks) into the new directory ``into``: applied, they make a database of the schema
    as it was before the later migrations."""
    into.mkdir()
    for path in sorted(directory.glob("*.sql")):
        if path.name.split(".")[0] <= last:
            shutil.copy(path, into / path.name)
    return into


def roll_back_migration(dsn: str, directory: Path, migration_id: str) -> None:
    """Roll back one applied migration of ``directory`` (blocking)."""
    backend = get_backend(postgres_url(dsn, scheme="postgresql+psycopg"))
    try:
        with backend.lock():
            migrations = read_migrations(str(directory))
            backend.rollback_one(next(m for m in migrations if m.id == migration_id))
    finally:
        backend.connection.close()
