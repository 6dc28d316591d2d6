"""The shared connection pool against a real PostgreSQL that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from hive_common import localdb
from hive_common.errors import Unavailable
from hive_common.postgres import (
    DictPool,
    connect_failure,
    connection,
    database_errors,
    open_pool,
)

pytestmark = pytest.mark.service


async def _select_one(pool: DictPool) -> None:
    async with database_errors("test database"), pool.connection() as conn:
        await conn.execute("SELECT 1")


async def test_a_pool_finds_its_database_back_soon_after_a_long_outage() -> None:
    # psycopg_pool's reconnection attempt backs off 1, 2, 4 ... 32 s (up to 300 s): after a
    # 35 s outage the services found their database back up to ~30 s late. Now an attempt
    # gives up after a few seconds and the next request starts a fresh one.
    if localdb.find_postgres_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (scripts/install-tools.sh installs them)")
    with localdb.LocalPostgres() as server:
        pool = open_pool(server.dsn, min_size=1, max_size=2, timeout_seconds=1)
        await pool.open(wait=True)
        try:
            await _select_one(pool)
            server.stop()
            loop = asyncio.get_running_loop()
            outage_ends = loop.time() + 35
            while loop.time() < outage_ends:  # the services keep asking meanwhile
                with contextlib.suppress(Unavailable):
                    await _select_one(pool)
                await asyncio.sleep(0.5)
            server.start()
            async with asyncio.timeout(15):  # was ~28 s here: the attempt slept its back-off
                while True:
                    try:
                        await _select_one(pool)
                        break
                    except Unavailable:
                        await asyncio.sleep(0.2)
        finally:
            await pool.close()


async def test_a_statement_prepared_before_a_schema_change_is_unavailable_once(
    postgres_dsn: str,
) -> None:
    # A migration adding a column (a rolling upgrade) made every statement prepared with
    # `SELECT *` on the running replicas' connections fail once: INTERNAL, ~600 in 5 s.
    pool = open_pool(postgres_dsn, min_size=1, max_size=1)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE widgets (id int)")
            await conn.execute("INSERT INTO widgets VALUES (1)")

        async def read() -> list[object]:
            async with database_errors("test database"), connection(pool) as conn:
                cur = await conn.execute("SELECT * FROM widgets")
                return [tuple(row.values()) for row in await cur.fetchall()]

        for _ in range(6):  # psycopg prepares a statement run 5 times (prepare_threshold)
            assert await read() == [(1,)]
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as other:
            await other.execute("ALTER TABLE widgets ADD COLUMN name text")
        with pytest.raises(Unavailable, match="test database: the schema changed; retry"):
            await read()
        assert await read() == [(1, None)]  # prepared again (it failed for ever before)
    finally:
        await pool.close()


async def test_connect_failure_says_why_without_the_address(postgres_dsn: str) -> None:
    # /ready said "no answer within 1 s" when PostgreSQL refused connections: the pool
    # retries them until its own timeout, hiding why.
    assert await connect_failure(postgres_dsn) is None  # a server that answers
    port = localdb.free_port()  # nothing listens there
    refused = await connect_failure(f"postgresql://hive@127.0.0.1:{port}/tickets")
    assert refused == "PostgreSQL unavailable: Connection refused"
    wrong_user = psycopg.conninfo.make_conninfo(postgres_dsn, user="no_such_role_here")
    said = await connect_failure(wrong_user)
    assert said is not None
    assert said.startswith("PostgreSQL unavailable: FATAL:")
    assert "127.0.0.1" not in said
    assert "port" not in said
