"""apply_migrations against a real PostgreSQL: once, idempotent, concurrent, atomic."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from yoyo.backends.base import DatabaseBackend

from hive_common.errors import InvalidArgument, Unavailable
from hive_common.logging import configure_logging
from hive_common.migrations import (
    DEFAULT_LOCK_NAME,
    TABLE_LOCK_TIMEOUT_SECONDS,
    MigrationError,
    advisory_lock_key,
    apply_migrations,
    migrate_on_start,
    postgres_url,
)

pytestmark = pytest.mark.service


def write(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(body)


def tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {row[0] for row in rows if not row[0].startswith(("_yoyo", "yoyo"))}


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    write(
        directory,
        "0001_create_runs.sql",
        # The INSERT makes a second application visible; the sleep widens the window in
        # which concurrent appliers would overlap without the lock.
        "CREATE TABLE runs (id serial PRIMARY KEY, note text NOT NULL);\n"
        "SELECT pg_sleep(0.5);\n"
        "INSERT INTO runs (note) VALUES ('applied');\n",
    )
    write(directory, "0002_add_index.sql", "CREATE INDEX runs_note_idx ON runs (note);\n")
    return directory


def test_applies_pending_migrations_in_order(postgres_dsn: str, migrations_dir: Path) -> None:
    assert apply_migrations(dsn=postgres_dsn, directory=migrations_dir) == [
        "0001_create_runs",
        "0002_add_index",
    ]
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT note FROM runs").fetchall() == [("applied",)]
        index = conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'runs_note_idx'")
        assert index.fetchone() == (1,)


def test_rerun_is_a_no_op(postgres_dsn: str, migrations_dir: Path) -> None:
    apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    assert apply_migrations(dsn=postgres_dsn, directory=migrations_dir) == []

    write(migrations_dir, "0003_more.sql", "ALTER TABLE runs ADD COLUMN extra int;\n")
    assert apply_migrations(dsn=postgres_dsn, directory=migrations_dir) == ["0003_more"]
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_concurrent_appliers_both_succeed_and_migrate_once(
    postgres_dsn: str, migrations_dir: Path
) -> None:
    start = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def replica() -> None:
        start.wait()
        try:
            results.append(apply_migrations(dsn=postgres_dsn, directory=migrations_dir))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert sorted(results) == [[], ["0001_create_runs", "0002_add_index"]]
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_failing_migration_raises_and_leaves_no_partial_state(
    postgres_dsn: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    write(directory, "0001_ok.sql", "CREATE TABLE ok_table (id int);\n")
    write(
        directory,
        "0002_broken.sql",
        "CREATE TABLE half_done (id int);\nINSERT INTO missing_table VALUES (1);\n",
    )

    with pytest.raises(MigrationError) as caught:
        apply_migrations(dsn=postgres_dsn, directory=directory)

    error = caught.value
    assert error.code == "INTERNAL"
    assert "0002_broken" in error.message
    assert "missing_table" in error.message
    assert error.details["migration_id"] == "0002_broken"
    assert error.details["applied"] == ["0001_ok"]
    # The broken migration's first statement was rolled back with it.
    assert tables(postgres_dsn) == {"ok_table"}

    # Fixing the file lets the next start-up finish the job.
    write(directory, "0002_broken.sql", "CREATE TABLE half_done (id int);\n")
    assert apply_migrations(dsn=postgres_dsn, directory=directory) == ["0002_broken"]
    assert tables(postgres_dsn) == {"ok_table", "half_done"}


def test_missing_directory_is_invalid_argument(postgres_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        apply_migrations(dsn=postgres_dsn, directory=tmp_path / "nope")


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    write(directory, "0001_ok.sql", "CREATE TABLE ok_table (id int);\n")
    with pytest.raises(Unavailable, match="cannot connect"):
        apply_migrations(
            dsn="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", directory=directory
        )


def test_a_migration_and_its_mark_commit_together(
    postgres_dsn: str, migrations_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # yoyo's apply_one commits the migration, then marks it applied in another
    # transaction: a replica killed in between left a schema every later start tried to
    # migrate again ("relation runs already exists"), and failed on.
    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies between the two

    monkeypatch.setattr(DatabaseBackend, "mark_one", killed)
    with pytest.raises(KeyboardInterrupt):
        apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    assert tables(postgres_dsn) == set()
    monkeypatch.undo()
    assert apply_migrations(dsn=postgres_dsn, directory=migrations_dir) == [
        "0001_create_runs",
        "0002_add_index",
    ]


@contextlib.contextmanager
def transaction_reading(dsn: str, table: str) -> Iterator[None]:
    """A transaction that has read ``table`` and stays open (a report, a backup...)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"SELECT count(*) FROM {table}")
        yield
        conn.rollback()


async def test_a_migration_behind_a_long_transaction_gives_up_its_lock_wait(
    postgres_dsn: str, migrations_dir: Path
) -> None:
    # Its ALTER TABLE queued behind the open transaction, holding up every other query of
    # the table, for as long as that transaction lasted (start-up timeout or not).
    apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    write(migrations_dir, "0003_more.sql", "ALTER TABLE runs ADD COLUMN extra int;\n")
    with transaction_reading(postgres_dsn, "runs"):
        started = time.monotonic()
        with pytest.raises(Unavailable, match="0003_more could not run") as caught:
            apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
        assert time.monotonic() - started < TABLE_LOCK_TIMEOUT_SECONDS + 2
        assert "lock timeout" in caught.value.message
        with pytest.raises(Unavailable, match=r"not available after 4s .*0003_more"):
            await migrate_on_start(dsn=postgres_dsn, directory=migrations_dir, deadline_seconds=4)


async def test_a_migration_applies_once_the_long_transaction_ends(
    postgres_dsn: str, migrations_dir: Path
) -> None:
    apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    write(migrations_dir, "0003_more.sql", "ALTER TABLE runs ADD COLUMN extra int;\n")
    reader = await psycopg.AsyncConnection.connect(postgres_dsn)
    await reader.execute("SELECT count(*) FROM runs")
    migrating = asyncio.create_task(
        migrate_on_start(dsn=postgres_dsn, directory=migrations_dir, deadline_seconds=60)
    )
    await asyncio.sleep(TABLE_LOCK_TIMEOUT_SECONDS + 1)  # at least one attempt gave up
    assert not migrating.done()
    await reader.rollback()
    await reader.close()
    assert await asyncio.wait_for(migrating, 30) == ["0003_more"]


async def test_a_failing_migration_stops_the_start_at_once(
    postgres_dsn: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    write(directory, "0001_broken.sql", "INSERT INTO missing_table VALUES (1);\n")
    started = time.monotonic()
    with pytest.raises(MigrationError, match="0001_broken failed"):
        await migrate_on_start(dsn=postgres_dsn, directory=directory, deadline_seconds=60)
    assert time.monotonic() - started < 10  # not retried for the start-up timeout


async def test_waiting_for_another_replicas_migrations_ends_with_the_start_up_timeout(
    postgres_dsn: str, migrations_dir: Path
) -> None:
    # Bounded by a hard-coded 300 s before.
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (advisory_lock_key(DEFAULT_LOCK_NAME),))
        started = time.monotonic()
        with pytest.raises(Unavailable, match="another replica held the migration lock"):
            await migrate_on_start(dsn=postgres_dsn, directory=migrations_dir, deadline_seconds=3)
        assert time.monotonic() - started < 10
    assert tables(postgres_dsn) == set()


def test_migrations_the_code_does_not_know_are_logged(
    postgres_dsn: str, migrations_dir: Path
) -> None:
    # A database a newer release migrated was used without a word (a rollback to older
    # code then misread what those migrations changed).
    apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    write(migrations_dir, "0003_future.sql", "CREATE TABLE future (id int);\n")
    apply_migrations(dsn=postgres_dsn, directory=migrations_dir)
    (migrations_dir / "0003_future.sql").unlink()
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=stream)
    assert apply_migrations(dsn=postgres_dsn, directory=migrations_dir) == []
    [warning] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert warning["level"] == "warning"
    assert warning["unknown_migrations"] == ["0003_future"]


def test_key_value_conninfo_is_accepted(postgres_dsn: str, migrations_dir: Path) -> None:
    conninfo = psycopg.conninfo.make_conninfo(postgres_dsn)
    key_value = " ".join(f"{k}={v}" for k, v in psycopg.conninfo.conninfo_to_dict(conninfo).items())
    assert "://" not in key_value
    assert apply_migrations(dsn=key_value, directory=migrations_dir) == [
        "0001_create_runs",
        "0002_add_index",
    ]


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        (
            "postgresql://app:s3cr%40t@db.example:5433/tickets?sslmode=disable",
            "postgresql+psycopg://app:s3cr%40t@db.example:5433/tickets?sslmode=disable",
        ),
        (
            "host=/run/postgresql port=5432 user=app dbname=tickets",
            "postgresql+psycopg://app@/tickets?host=%2Frun%2Fpostgresql&port=5432",
        ),
        ("host=::1 dbname=x", "postgresql+psycopg://[::1]/x"),
    ],
)
def test_postgres_url_conversion(dsn: str, url: str) -> None:
    assert postgres_url(dsn, scheme="postgresql+psycopg") == url


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgresql://hive:pg-secret@127.0.0.1:1/none?sslmode=bogus", "invalid sslmode value"),
        ("postgresql://hive:pg-secret@127.0.0.1:99999/none", "invalid port number"),
        (
            "host=127.0.0.1 port=abc user=hive password=pg-secret",
            'for connection option "port"',
        ),
        # Refused as libpq opens the socket, after the address was resolved.
        (
            "postgresql://hive:pg-secret@127.0.0.1:1/none?keepalives=x",
            'invalid integer value "x" for connection option "keepalives"',
        ),
    ],
)
async def test_connection_settings_libpq_refuses_stop_the_start_at_once(
    tmp_path: Path, dsn: str, reason: str
) -> None:
    # A DSN that parses but whose values libpq refuses before it connects: it was retried
    # as "dependency not ready" for the whole start-up timeout, then reported an outage.
    directory = tmp_path / "migrations"
    write(directory, "0001_ok.sql", "CREATE TABLE ok_table (id int);\n")
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as raised:
        await migrate_on_start(dsn=dsn, directory=directory, deadline_seconds=60)
    assert time.monotonic() - started < 10
    message = raised.value.message
    assert message.startswith("PostgreSQL refuses the connection settings: ")
    assert reason in message
    assert "pg-secret" not in message
