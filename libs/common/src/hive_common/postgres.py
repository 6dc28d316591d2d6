"""The PostgreSQL connection pool every service's storage layer uses, and the one place
its driver errors become :class:`~hive_common.errors.HiveError`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.rows import DictRow, dict_row

from hive_common.errors import Internal, Unavailable

DictPool = psycopg_pool.AsyncConnectionPool[AsyncConnection[DictRow]]


RECONNECT_TIMEOUT_SECONDS = 5.0
# How long a request waits for a free connection before it fails UNAVAILABLE. Short: in a
# database outage every request waits this long (it was psycopg's 30 s, beyond the
# clients' per-attempt timeouts: they saw DEADLINE_EXCEEDED, /ready said "down" in 1 s),
# and with queries of milliseconds a connection is free long before it.
POOL_TIMEOUT_SECONDS = 3.0


# How long a statement of a service waits for a lock before it fails (UNAVAILABLE: the
# caller retries). Without it a table locked by someone else (a migration, a manual
# LOCK, a long DDL) held every request on it for as long as the lock lasted, past the
# clients' per-attempt timeouts, and the registry, hearing no error, expired every
# worker once the lock went.
LOCK_TIMEOUT_MS = 5000


# What libpq's messages quote that is its own text, not a part of the DSN.
_LIBPQ_QUOTED = frozenset({"=", "]"})
_QUOTED = re.compile(r'"([^"]*)"')
_HIDDEN = '"***"'


def _without_dsn_parts(message: str, dsn: str) -> str:
    """libpq's ``message`` about ``dsn`` on one line, with every part of the DSN it quotes
    (a word, a token, the whole URI: any of them may be, or hold, the password) shown as
    ``"***"``. With a ``"`` in the DSN, the quoted parts cannot be told apart: everything
    from the first quote to the last is hidden."""
    text = " ".join(message.split())
    if '"' in dsn:
        first, last = text.find('"'), text.rfind('"')
        if first == -1:
            return text
        return f"{text[:first]}{_HIDDEN}{text[last + 1 :] if last > first else ''}"
    return _QUOTED.sub(lambda m: m.group() if m.group(1) in _LIBPQ_QUOTED else _HIDDEN, text)


def dsn_problem(dsn: str) -> str | None:
    """Why libpq cannot parse ``dsn`` as a connection string (one line, never quoting the
    DSN: it may hold a password), or None. Unknown options are refused too; values libpq
    checks only when it connects (``sslmode=bogus``, a port of ``abc``) are not: see
    :func:`refused_connection_settings`."""
    try:
        # psycopg's own reading of connect_timeout too (it refused "abc" only at connect).
        timeout_from_conninfo(conninfo_to_dict(dsn))
    except psycopg.ProgrammingError as exc:
        return _without_dsn_parts(str(exc), dsn)
    except UnicodeDecodeError:
        return "a percent-encoded part is not UTF-8"
    return None


# libpq refusing an option's value as it starts a connection, before any I/O with the
# server (psycopg: "connection is bad: invalid sslmode value: ...", or "connection is bad:
# connection to server at ... failed: invalid integer value "x" for connection option
# "keepalives""): no retry can cure it.
_REFUSED_AT_START = re.compile(r"^connection is bad: (?:.* failed: )?(invalid .*)$", re.DOTALL)


def refused_connection_settings(exc: BaseException, dsn: str) -> str | None:
    """What is wrong with ``dsn``'s settings when ``exc``, raised connecting with it, is
    libpq refusing one of its values before connecting (``invalid sslmode value``,
    ``invalid port number``), one line without the password; None for any other failure
    (one that trying again may cure)."""
    refused = _REFUSED_AT_START.match(str(exc))
    if not isinstance(exc, psycopg.OperationalError) or refused is None:
        return None
    text = " ".join(refused.group(1).split())
    try:
        password = str(conninfo_to_dict(dsn).get("password") or "")
    except psycopg.ProgrammingError:  # not reached: psycopg parsed it before connecting
        return _without_dsn_parts(text, dsn)
    # The DSN parsed, so its password is known: hide it, keep the value libpq refused.
    return text.replace(password, "***") if password else text


def service_dsn(dsn: str, application_name: str) -> str:
    """``dsn`` as a service's pool connects with it: ``application_name`` set unless it
    sets one (``pg_stat_activity`` then tells each service's connections apart), and a
    ``lock_timeout`` of :data:`LOCK_TIMEOUT_MS` unless its ``options`` set one."""
    params = conninfo_to_dict(dsn)
    extra: dict[str, str] = {}
    if "application_name" not in params:
        extra["application_name"] = application_name
    options = str(params.get("options") or "")
    if "lock_timeout" not in options:
        extra["options"] = f"{options} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()
    return make_conninfo(dsn, **extra) if extra else dsn


# 'connection to server at "db", port 5432 failed: ' before each address libpq tried.
_SERVER_TRIED = re.compile(r'connection to server (?:at|on) "[^"]*"(?:, port \d+)? failed: ')


async def connect_failure(dsn: str) -> str | None:
    """Why a new connection to ``dsn`` fails now (libpq's reason without the server's
    address: the unauthenticated /ready shows it), or None when one can be made: what a
    readiness check says when its pool's query got no answer (the pool retries a refused
    connection until its own timeout, hiding why)."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=2)
    except psycopg.Error as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        reason = _SERVER_TRIED.sub("", first.removeprefix("connection failed: "))
        return f"PostgreSQL unavailable: {' '.join(reason.split())}"
    await conn.close()
    return None


def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout_seconds: float = POOL_TIMEOUT_SECONDS,
    configure: Callable[[AsyncConnection[DictRow]], Awaitable[None]] | None = None,
) -> DictPool:
    """An unopened pool of autocommit connections returning dict rows.

    The caller opens it at start-up and closes it at shutdown; ``timeout_seconds`` bounds
    the wait for a free connection (``psycopg_pool.PoolTimeout`` after it); ``configure``
    runs on every new connection.
    """
    return psycopg_pool.AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_seconds,
        # A connection attempt backs off 1, 2, 4, 8 ... s until it gives up after this
        # long; the next request for a connection starts a new one at once. Left at its
        # default (300 s), the pool found a database back from a 72 s outage 44-60 s late.
        reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
        open=False,
        kwargs={"row_factory": dict_row, "autocommit": True},
        connection_class=AsyncConnection[DictRow],
        configure=configure,
    )


_STALE_PREPARED_STATEMENT = "cached plan must not change result type"


def _is_stale_prepared_statement(exc: BaseException) -> bool:
    return (
        isinstance(exc, psycopg.errors.FeatureNotSupported)
        and exc.diag.message_primary == _STALE_PREPARED_STATEMENT
    )


@asynccontextmanager
async def connection(pool: DictPool) -> AsyncIterator[AsyncConnection[DictRow]]:
    """A connection of ``pool`` (what the storage layers use instead of ``pool.connection()``).

    A statement psycopg prepared before a migration changed its result (a column added
    under a running replica) fails with "cached plan must not change result type"; on an
    autocommit connection psycopg would run it prepared that way for ever. The connection's
    prepared statements are then dropped, so the next run prepares it again.
    """
    async with pool.connection() as conn:
        try:
            yield conn
        except psycopg.errors.FeatureNotSupported as exc:
            if _is_stale_prepared_statement(exc) and not conn.closed:
                await conn.execute("DEALLOCATE ALL")  # psycopg forgets its own list too
            raise


SCHEMA_BEHIND_SQLSTATES = frozenset({"42P01", "42703", "3F000"})
"""undefined_table, undefined_column, invalid_schema_name: the schema is missing or older
than the code (migrations not applied yet)."""


@asynccontextmanager
async def database_errors(database: str) -> AsyncIterator[None]:
    """Translate driver errors raised in the block (storage layers only).

    No free connection in time, a lost server, a statement prepared before a schema
    change or a schema not migrated yet is UNAVAILABLE (retryable); any other
    driver error is INTERNAL with its SQLSTATE. Messages name ``database`` but never carry
    the driver's text (it holds host names and ports).
    """
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        # Also what a database that does not answer looks like: no new connection either.
        raise Unavailable(
            f"{database}: no connection in time (the database does not answer, "
            "or every connection is busy)"
        ) from exc
    except psycopg.OperationalError as exc:
        raise Unavailable(f"{database} unavailable") from exc
    except psycopg.Error as exc:
        if _is_stale_prepared_statement(exc):  # see connection(): prepared again next time
            raise Unavailable(f"{database}: the schema changed; retry") from exc
        if exc.sqlstate in SCHEMA_BEHIND_SQLSTATES:
            # A service started with migrations off, before they were applied (its /ready
            # says so too): clients retry, a worker waits instead of giving up.
            raise Unavailable(
                f"{database}: the database schema is not there (migrations not applied)",
                details={"sqlstate": exc.sqlstate},
            ) from exc
        # A client-side error (e.g. a NUL byte psycopg refuses to send) has no SQLSTATE.
        details = {"sqlstate": exc.sqlstate} if exc.sqlstate else {}
        raise Internal(f"{database} error", details=details) from exc
