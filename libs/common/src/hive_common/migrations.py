"""Versioned schema migrations with yoyo-migrations, safe with several replicas.

Each service keeps plain ``.sql`` files in ``storage/migrations/`` (``0001_create_tickets.sql``
...; yoyo's ``-- depends:`` header is honoured) and calls :func:`apply_migrations` at start-up,
from a thread (``await asyncio.to_thread(apply_migrations, dsn=..., directory=...)``).

Replicas starting together serialise on a PostgreSQL session advisory lock held on a dedicated
connection, so exactly one applies pending migrations and the others then find nothing to do.
Unlike yoyo's own lock table, an advisory lock cannot be left behind by a crashed process.
Each migration and the row that marks it applied commit in one transaction: a failing
migration leaves nothing behind, and a process killed after the commit leaves it applied
and marked (yoyo's own ``apply_one`` commits the two apart: a replica killed between them
left a schema every later start tried to migrate again, and failed on).

A migration's statements wait at most :data:`TABLE_LOCK_TIMEOUT_SECONDS` for a table lock:
a DDL statement queued behind a long transaction blocks every later query of its table,
so it gives up, rolls back, and :func:`migrate_on_start` tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations

from hive_common.errors import Internal, InvalidArgument, Unavailable
from hive_common.logging import get_logger
from hive_common.postgres import refused_connection_settings
from hive_common.retry import wait_for_dependency

__all__ = [
    "MigrationError",
    "advisory_lock_key",
    "apply_migrations",
    "migrate_on_start",
    "postgres_url",
]

DEFAULT_LOCK_NAME = "hive_common.migrations"
TABLE_LOCK_TIMEOUT_SECONDS = 3.0

_log = get_logger(__name__)


class MigrationError(Internal):
    """A migration failed (not for want of PostgreSQL or a lock: trying again would fail
    the same way); ``details`` name the directory and failing migration."""


def advisory_lock_key(name: str) -> int:
    """A stable signed 64-bit ``pg_advisory_lock`` key for ``name``."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def postgres_url(dsn: str, *, scheme: str = "postgresql", **overrides: str) -> str:
    """Turn a libpq conninfo (URL or ``key=value``) into a URL with ``scheme``.

    ``overrides`` replace conninfo keys (e.g. ``dbname="other"``). A unix-socket host, and any
    other parameter, goes into the query string, where libpq and yoyo both accept it.
    """
    params: dict[str, Any] = {**conninfo_to_dict(dsn), **overrides}
    params = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    user = params.pop("user", None)
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    host = params.pop("host", "")
    port = params.pop("port", None)
    netloc = ""
    if user is not None:
        netloc = quote(user, safe="")
        if password is not None:
            netloc += ":" + quote(password, safe="")
        netloc += "@"
    if host and "," not in host and not host.startswith("/"):
        netloc += f"[{host}]" if ":" in host else host
        if port is not None:
            netloc += f":{port}"
    else:
        if host:
            params["host"] = host
        if port is not None:
            params["port"] = port
    query = f"?{urlencode(params)}" if params else ""
    return f"{scheme}://{netloc}/{quote(dbname, safe='')}{query}"


async def migrate_on_start(*, dsn: str, directory: Path, deadline_seconds: float) -> list[str]:
    """Apply the pending migrations at a service's start; returns the ids applied.

    While PostgreSQL cannot be reached, another replica holds the migration lock, or a
    migration cannot lock its tables, it tries again, for ``deadline_seconds`` in all
    (then :class:`Unavailable`, saying why). A migration that fails otherwise raises
    :class:`MigrationError` at once: it would fail the same way every time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    applied: list[str] = []

    async def attempt() -> None:
        applied[:] = await asyncio.to_thread(
            apply_migrations,
            dsn=dsn,
            directory=directory,
            lock_timeout_seconds=max(deadline - loop.time(), 1.0),
        )

    await wait_for_dependency(
        attempt,
        name="postgresql",
        deadline_seconds=deadline_seconds,
        fatal=lambda exc: not isinstance(exc, Unavailable),
    )
    return applied


def apply_migrations(
    *,
    dsn: str,
    directory: Path,
    lock_name: str = DEFAULT_LOCK_NAME,
    lock_timeout_seconds: float = 300.0,
) -> list[str]:
    """Apply the pending migrations in ``directory`` to the database at ``dsn``.

    Returns the ids (file names without ``.sql``) of the migrations applied by this call, in
    order; an empty list when the schema was already up to date. Blocking: call it through
    ``asyncio.to_thread`` from async code.

    Advisory locks are per database, so the default ``lock_name`` serialises every yoyo run
    on one database whatever the directory; pass another name only for unrelated schemas.

    Raises :class:`InvalidArgument` if ``directory`` does not exist or libpq refuses a
    value of ``dsn`` (``sslmode=bogus``: no retry can cure it), :class:`Unavailable`
    when PostgreSQL cannot be reached or a lock (the migration lock, for
    ``lock_timeout_seconds``, or a table's) cannot be had, and :class:`MigrationError` when
    a migration fails otherwise. A failed migration is rolled back; the ones before it stay
    applied.
    """
    if not directory.is_dir():
        raise InvalidArgument(
            f"migrations directory {directory} does not exist",
            details={"directory": str(directory)},
        )
    details: dict[str, Any] = {"directory": str(directory)}
    migrations = read_migrations(str(directory))
    key = advisory_lock_key(lock_name)
    try:
        lock_conn = psycopg.connect(dsn, autocommit=True, connect_timeout=30)
    except psycopg.Error as exc:
        refused = refused_connection_settings(exc, dsn)
        if refused is not None:  # not worth trying again until the start-up timeout
            raise InvalidArgument(
                f"PostgreSQL refuses the connection settings: {refused}", details=details
            ) from None
        raise Unavailable(
            f"cannot connect to PostgreSQL to migrate: {exc}", details=details
        ) from exc
    try:
        with lock_conn:
            _take_migration_lock(lock_conn, key, lock_timeout_seconds, details)
            try:
                return _apply_locked(dsn=dsn, migrations=migrations, details=details)
            finally:
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    except psycopg.Error as exc:
        raise Unavailable(f"migration lock connection failed: {exc}", details=details) from exc


def _take_migration_lock(
    conn: psycopg.Connection[Any], key: int, timeout_seconds: float, details: dict[str, Any]
) -> None:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    if row is not None and row[0]:
        return
    _log.info("waiting for another replica's migrations", timeout_seconds=timeout_seconds)
    try:
        conn.execute(f"SET lock_timeout = {int(timeout_seconds * 1000)}")
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable as exc:
        raise Unavailable(
            f"another replica held the migration lock for {timeout_seconds:.0f}s "
            "(migrating, or stuck in a migration)",
            details=details,
        ) from exc


def _apply_locked(*, dsn: str, migrations: Any, details: dict[str, Any]) -> list[str]:
    try:
        backend = get_backend(postgres_url(dsn, scheme="postgresql+psycopg"))
    except Exception as exc:  # yoyo raises driver errors and its own, with no common base
        raise Unavailable(f"cannot open migration backend: {exc}", details=details) from exc
    applied: list[str] = []
    try:
        _warn_of_unknown(backend, migrations)
        pending = backend.to_apply(migrations)
        for migration in pending:
            try:
                _apply_one(backend, migration)
            except psycopg.OperationalError as exc:  # the server, or a lock not had in time
                raise Unavailable(
                    f"migration {migration.id} could not run and was rolled back: {exc}",
                    details={**details, "migration_id": migration.id, "applied": applied},
                ) from exc
            except Exception as exc:
                raise MigrationError(
                    f"migration {migration.id} failed and was rolled back: {exc}",
                    details={**details, "migration_id": migration.id, "applied": applied},
                ) from exc
            applied.append(str(migration.id))
        if applied:
            backend.run_post_apply(pending)
    finally:
        backend.connection.close()
    return applied


def _apply_one(backend: Any, migration: Any) -> None:
    """The migration's statements and the rows marking it applied, in one transaction
    (yoyo's own tables are there: :func:`_warn_of_unknown` ensured them first)."""
    with backend.transaction():
        backend.execute(f"SET LOCAL lock_timeout = {int(TABLE_LOCK_TIMEOUT_SECONDS * 1000)}")
        migration.process_steps(backend, "apply")  # a savepoint in this transaction
        backend.log_migration(migration, "apply")
        backend.mark_one(migration, log=False)


def _warn_of_unknown(backend: Any, migrations: Any) -> None:
    """Log the migrations the database has and this code does not know: a newer release
    applied them (this one may not read what they changed)."""
    backend.ensure_internal_schema_updated()
    known = {migration.hash for migration in migrations}
    cursor = backend.execute(
        backend.format_sql("SELECT migration_id, migration_hash FROM {0.migration_table_quoted}")
    )
    unknown = sorted(row[0] for row in cursor.fetchall() if row[1] not in known)
    if unknown:
        _log.warning(
            "the database has migrations this release does not know: a newer release (or a "
            "development build whose migrations were withdrawn) applied them",
            unknown_migrations=unknown,
        )
