"""LocalMongo's FerretDB process settings, checked on a real FerretDB process."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from pymongo import MongoClient

from hive_common import localdb

pytestmark = pytest.mark.service


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _ferretdb() -> Path:
    binary = localdb.find_ferretdb()
    if binary is None:
        pytest.skip("no FerretDB binary on this machine (scripts/install-tools.sh builds it)")
    return binary


@pytest.mark.parametrize(
    ("ours", "expected"), [(None, localdb.FERRETDB_GOGC), ("150", "150")], ids=["default", "ours"]
)
def test_ferretdb_runs_with_a_relaxed_go_collector_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, ours: str | None, expected: str
) -> None:
    if ours is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", ours)
    with localdb.LocalMongo(server=("ferretdb", _ferretdb())) as server:
        assert server._process is not None
        assert _environ(server._process.pid)["GOGC"] == expected


def _explained_find(uri: str, ticket_id: str) -> dict[str, object]:
    client: MongoClient[dict[str, object]] = MongoClient(uri)
    try:
        return client.audit.command(
            "explain", {"find": "audit_trail", "filter": {"ticket_id": ticket_id}}
        )
    finally:
        client.close()


def _insert_events(uri: str, tickets: int) -> None:
    client: MongoClient[dict[str, object]] = MongoClient(uri)
    try:
        client.audit.audit_trail.insert_many(
            [{"ticket_id": f"t-{n}", "sequence": n} for n in range(tickets)]
        )
    finally:
        client.close()


def test_ferretdb_on_postgresql_hands_equality_filters_to_postgresql(postgres_dsn: str) -> None:
    # The SQLite backend read the whole collection to find one ticket's audit documents.
    with localdb.LocalMongo(server=("ferretdb", _ferretdb()), postgresql_url=postgres_dsn) as db:
        _insert_events(db.uri, 50)
        assert _explained_find(db.uri, "t-7")["filterPushdown"] is True
        with psycopg.connect(postgres_dsn) as conn:  # the documents live there
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'audit'"
            ).fetchall()
        assert tables
    with localdb.LocalMongo(server=("ferretdb", _ferretdb())) as sqlite:
        _insert_events(sqlite.uri, 5)
        assert _explained_find(sqlite.uri, "t-3")["filterPushdown"] is False


def test_a_data_directory_with_sqlite_documents_keeps_sqlite(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # A dev stack's .hive/db from before: its audit trail stays where it is, visible.
    with localdb.LocalMongo(server=("ferretdb", _ferretdb()), data_dir=tmp_path) as before:
        _insert_events(before.uri, 3)
    with localdb.LocalMongo(
        server=("ferretdb", _ferretdb()), data_dir=tmp_path, postgresql_url=postgres_dsn
    ) as after:
        assert after.postgresql_url is None
        client: MongoClient[dict[str, object]] = MongoClient(after.uri)
        try:
            assert client.audit.audit_trail.count_documents({}) == 3
        finally:
            client.close()
