"""The database fixtures against real servers: round trips, isolation, restart."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

from hive_testsupport.databases import (
    MongoServer,
    PostgresServer,
    temporary_mongo_database,
    temporary_postgres_database,
)

pytestmark = pytest.mark.service

_seen_postgres: list[str] = []
_seen_mongo: list[str] = []


async def test_postgres_round_trip(postgres_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await conn.execute("CREATE TABLE item (id int PRIMARY KEY, name text NOT NULL)")
        await conn.execute("INSERT INTO item VALUES (%s, %s)", (1, "ticket"))
        await conn.commit()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cursor = await conn.execute("SELECT id, name FROM item")
        assert await cursor.fetchall() == [(1, "ticket")]


async def test_postgres_database_starts_empty(postgres_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert await cursor.fetchone() == (0,)


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_its_own_postgres_database(postgres_dsn: str, run: int) -> None:
    name = conninfo_to_dict(postgres_dsn)["dbname"]
    assert isinstance(name, str)
    assert name not in _seen_postgres
    _seen_postgres.append(name)


def test_postgres_database_is_dropped_even_with_open_connections(
    postgres_server: PostgresServer,
) -> None:
    with temporary_postgres_database(postgres_server) as dsn:
        name = conninfo_to_dict(dsn)["dbname"]
        # A connection left open by code under test must not block the drop.
        lingering = psycopg.connect(dsn)
        lingering.execute("CREATE TABLE t (x int)")
        lingering.commit()
    try:
        with psycopg.connect(postgres_server.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        assert row is None
    finally:
        lingering.close()


async def test_mongo_round_trip(mongo_uri: str, mongo_database_name: str) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri)
    try:
        collection = client[mongo_database_name]["audit_trail"]
        await collection.insert_one({"event_id": "e-1", "ticket_id": "t-1"})
        found = await collection.find_one({"event_id": "e-1"}, {"_id": 0})
        assert found == {"event_id": "e-1", "ticket_id": "t-1"}
    finally:
        await client.close()


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_mongo_database(
    mongo_uri: str, mongo_database_name: str, run: int
) -> None:
    assert mongo_database_name not in _seen_mongo
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri)
    try:
        collection = client[mongo_database_name]["things"]
        # Empty although the earlier run wrote to its own database under the same collection.
        assert await collection.count_documents({}) == 0
        await collection.insert_one({"run": run})
    finally:
        await client.close()
    _seen_mongo.append(mongo_database_name)


def test_mongo_database_is_dropped_afterwards(mongo_server_info: MongoServer) -> None:
    client: MongoClient[dict[str, object]] = MongoClient(mongo_server_info.uri)
    try:
        with temporary_mongo_database(mongo_server_info) as name:
            client[name]["things"].insert_one({"x": 1})
            assert name in client.list_database_names()
        assert name not in client.list_database_names()
    finally:
        client.close()


async def test_mongo_stop_and_start_keeps_data(
    mongo_server: MongoServer, mongo_database_name: str
) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongo_server.uri, serverSelectionTimeoutMS=2_000
    )
    try:
        collection = client[mongo_database_name]["status_change_events"]
        await collection.insert_one({"event_id": "before-outage"})

        mongo_server.stop()
        assert not mongo_server.is_running
        with pytest.raises(PyMongoError):
            await collection.insert_one({"event_id": "during-outage"})

        mongo_server.start()
        # The same client reconnects: same port, same data.
        found = await collection.find({}, {"_id": 0}).to_list()
        assert found == [{"event_id": "before-outage"}]
    finally:
        await client.close()
