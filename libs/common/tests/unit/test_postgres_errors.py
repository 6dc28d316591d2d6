"""hive_common.postgres.database_errors: driver errors as HiveErrors, without driver text."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict

from hive_common.clients import CallPolicy
from hive_common.errors import Internal, NotFound, Unavailable
from hive_common.postgres import (
    LOCK_TIMEOUT_MS,
    POOL_TIMEOUT_SECONDS,
    database_errors,
    open_pool,
    service_dsn,
)


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        (
            psycopg_pool.PoolTimeout("no connection in 30s"),
            Unavailable,
            "x db: no connection in time (the database does not answer, "
            "or every connection is busy)",
        ),
        (
            psycopg.OperationalError("connection to server at 10.0.0.7, port 5432 failed"),
            Unavailable,
            "x db unavailable",
        ),
        (psycopg.errors.DeadlockDetected("deadlock"), Unavailable, "x db unavailable"),
        # A service started with migrations off, before they were applied: retry later.
        (
            psycopg.errors.UndefinedTable("relation missing"),
            Unavailable,
            "x db: the database schema is not there (migrations not applied)",
        ),
        # ... or on a schema older than the code (a column a later migration adds).
        (
            psycopg.errors.UndefinedColumn("column missing"),
            Unavailable,
            "x db: the database schema is not there (migrations not applied)",
        ),
        (psycopg.errors.UndefinedFunction("no such function"), Internal, "x db error"),
    ],
)
async def test_driver_errors_become_hive_errors(
    raised: Exception, expected: type[Exception], message: str
) -> None:
    with pytest.raises(expected) as info:
        async with database_errors("x db"):
            raise raised
    assert str(info.value.message) == message  # type: ignore[attr-defined]
    assert info.value.__cause__ is raised


async def test_other_errors_pass_through_unchanged() -> None:
    error = NotFound("ticket t not found")
    with pytest.raises(NotFound) as info:
        async with database_errors("x db"):
            raise error
    assert info.value is error


async def test_the_sqlstate_is_given_only_when_the_server_gave_one() -> None:
    with pytest.raises(Internal) as info:
        async with database_errors("x db"):
            raise psycopg.errors.UndefinedFunction("no such function")
    assert info.value.details == {"sqlstate": "42883"}
    with pytest.raises(Internal) as info:
        async with database_errors("x db"):
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    assert info.value.details == {}  # was {"sqlstate": ""}


def test_a_database_outage_is_unavailable_before_a_clients_attempt_times_out() -> None:
    # A request waits POOL_TIMEOUT_SECONDS for a connection in an outage: at psycopg's 30 s
    # the hive clients' attempts ended first and they saw DEADLINE_EXCEEDED, not the
    # retryable UNAVAILABLE the service would have answered.
    assert CallPolicy().timeout_seconds > POOL_TIMEOUT_SECONDS
    assert open_pool("postgresql://nowhere/db").timeout == POOL_TIMEOUT_SECONDS


def test_connections_carry_the_services_name_unless_the_dsn_has_one() -> None:
    # pg_stat_activity showed every service's connections with a blank application_name.
    named = service_dsn("postgresql://hive@db:5432/tickets", "execution-ticket-service")
    assert conninfo_to_dict(named) == {
        "user": "hive",
        "host": "db",
        "port": "5432",
        "dbname": "tickets",
        "application_name": "execution-ticket-service",
        "options": f"-c lock_timeout={LOCK_TIMEOUT_MS}",
    }
    own = "postgresql://hive@db/tickets?application_name=tickets-a&options=-c%20lock_timeout%3D1s"
    assert service_dsn(own, "execution-ticket-service") == own
    theirs = conninfo_to_dict(service_dsn("dbname=t options='-c search_path=x'", "s"))
    assert theirs["options"] == f"-c search_path=x -c lock_timeout={LOCK_TIMEOUT_MS}"
