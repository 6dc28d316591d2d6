"""Versioned schema migrations with yoyo-migrations, safe with several replicas.

Each service keeps plain ``.sql`` files in ``storage/migrations/`` (``0001_create_tickets.sql``
...; yoyo's ``-- depends:`` header is honoured) and calls :func:`apply_migrations` at start-up,
from a thread (``await asyncio.to_thread(apply_migrations, dsn=..., directory=...)``).

Replicas starting together serialise on a PostgreSQL session advisory lock held on a dedicated
connection, so exactly one applies pending migrations and the others then find nothing to do.
Unlike yoyo's own lock table, an advisory lock cannot be left behind by a crashed process.
Each migration runs in one transaction: a failing migration leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations

from hive_common.errors import Internal, InvalidArgument

__all__ = ["MigrationError", "advisory_lock_key", "apply_migrations", "postgres_url"]

DEFAULT_LOCK_NAME = "hive_common.migrations"


class MigrationError(Internal):
    """Applying migrations failed; ``details`` name the directory and failing migration."""


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

    Raises :class:`InvalidArgument` if ``directory`` does not exist and :class:`MigrationError`
    when the lock cannot be taken in time or a migration fails (that migration is rolled back;
    the ones before it stay applied).
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
        raise MigrationError(
            f"cannot connect to PostgreSQL to migrate: {exc}", details=details
        ) from exc
    try:
        with lock_conn:
            try:
                # lock_timeout bounds the wait for a replica that is stuck mid-migration.
                lock_conn.execute(f"SET lock_timeout = {int(lock_timeout_seconds * 1000)}")
                lock_conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.errors.LockNotAvailable as exc:
                raise MigrationError(
                    f"timed out after {lock_timeout_seconds:.0f}s waiting for the migration lock",
                    details=details,
                ) from exc
            try:
                return _apply_locked(dsn=dsn, migrations=migrations, details=details)
            finally:
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    except psycopg.Error as exc:
        raise MigrationError(f"migration lock connection failed: {exc}", details=details) from exc


def _apply_locked(*, dsn: str, migrations: Any, details: dict[str, Any]) -> list[str]:
    try:
        backend = get_backend(postgres_url(dsn, scheme="postgresql+psycopg"))
    except Exception as exc:  # yoyo raises driver errors and its own, with no common base
        raise MigrationError(f"cannot open migration backend: {exc}", details=details) from exc
    applied: list[str] = []
    try:
        pending = backend.to_apply(migrations)
        for migration in pending:
            try:
                backend.apply_one(migration)
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
