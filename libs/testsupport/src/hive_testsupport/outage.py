"""A stand-in for a connection pool during a database outage (the shared test PostgreSQL
cannot be stopped; the pool's own reconnection is tested against a real one stopped and
started again: libs/common/tests/service/test_postgres_pool.py)."""

from __future__ import annotations

from typing import Any

import psycopg


class UnreachablePool:
    """A connection pool whose database does not answer."""

    def connection(self) -> Any:
        raise psycopg.OperationalError("connection refused")
