"""The PostgreSQL connection pool every service's storage layer uses."""

from __future__ import annotations

import psycopg_pool
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row

DictPool = psycopg_pool.AsyncConnectionPool[AsyncConnection[DictRow]]


def open_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_seconds: float = 30.0
) -> DictPool:
    """An unopened pool of autocommit connections returning dict rows.

    The caller opens it at start-up and closes it at shutdown; ``timeout_seconds`` bounds
    the wait for a free connection (``psycopg_pool.PoolTimeout`` after it).
    """
    return psycopg_pool.AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_seconds,
        open=False,
        kwargs={"row_factory": dict_row, "autocommit": True},
        connection_class=AsyncConnection[DictRow],
    )
