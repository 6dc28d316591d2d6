"""Pytest plugin giving tests real, isolated PostgreSQL and MongoDB databases.

Auto-loaded through the ``pytest11`` entry point of hive-testsupport. Nothing starts until
a test asks for a database fixture. Each server kind is acquired once per session, from the
first source that works:

1. an environment DSN: ``HIVE_TEST_POSTGRES_DSN`` (a superuser / CREATEDB conninfo) and
   ``HIVE_TEST_MONGO_URI``;
2. testcontainers, when a Docker engine answers a ping (disable with ``HIVE_TEST_DOCKER=0``;
   images ``HIVE_TEST_POSTGRES_IMAGE`` / ``HIVE_TEST_MONGO_IMAGE``);
3. local server binaries (:mod:`hive_common.localdb`: PostgreSQL's ``initdb``/``postgres``,
   ``mongod`` or FerretDB).

If no source works the test is skipped with a message naming what is missing, except under
``CI=true``, where it fails: CI must never pass by skipping its database tests.

Fixtures:

* ``postgres_dsn`` (function): conninfo URL of a fresh, empty database, dropped
  ``WITH (FORCE)`` afterwards.
* ``mongo_uri`` (session): ``mongodb://`` URI of the server.
* ``mongo_database_name`` (function) / ``module_mongo_database_name`` (module): a unique
  database name on that server, dropped afterwards.
* ``postgres_server`` / ``mongo_server_info`` (session): where the servers came from.
* ``mongo_server`` (function): the MongoDB server as something a test can ``stop()`` and
  ``start()`` again (same port, same data) to simulate an outage; it is running again after
  every test. Only a server this plugin started from local binaries can be controlled; for
  others the test is skipped (failed under ``CI=true``).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NoReturn

import pytest

if TYPE_CHECKING:
    from hive_common.localdb import LocalMongo, LocalPostgres

__all__ = [
    "MongoServer",
    "PostgresServer",
    "Source",
    "SourceChoice",
    "choose_source",
    "docker_engine_answers",
    "temporary_mongo_database",
    "temporary_postgres_database",
    "unavailable_action",
    "unique_database_name",
]

POSTGRES_DSN_ENV = "HIVE_TEST_POSTGRES_DSN"
MONGO_URI_ENV = "HIVE_TEST_MONGO_URI"
DOCKER_SWITCH_ENV = "HIVE_TEST_DOCKER"
POSTGRES_IMAGE_ENV = "HIVE_TEST_POSTGRES_IMAGE"
MONGO_IMAGE_ENV = "HIVE_TEST_MONGO_IMAGE"
DEFAULT_POSTGRES_IMAGE = "postgres:15-alpine"
DEFAULT_MONGO_IMAGE = "mongo:7"


# --------------------------------------------------------------------------------------------
# Pure decisions (unit-tested without Docker or servers)


class Source(enum.Enum):
    """Where a session's database server comes from."""

    ENV = "env"
    DOCKER = "docker"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class SourceChoice:
    """The chosen source, or ``None`` with ``reason`` saying everything that is missing."""

    source: Source | None
    reason: str


def choose_source(
    *,
    what: str,
    env_var: str,
    env: Mapping[str, str],
    docker_available: Callable[[], bool],
    local_missing: Callable[[], str | None],
) -> SourceChoice:
    """Pick the source of a ``what`` server: env DSN, then Docker, then local binaries.

    The probes are called lazily, in order, only while no earlier source was chosen (so an env
    DSN never touches Docker). ``local_missing`` returns None when local binaries exist, else
    a message saying what to install.
    """
    if env.get(env_var, "").strip():
        return SourceChoice(Source.ENV, f"{env_var} is set")
    docker_note = "no Docker engine answered"
    if env.get(DOCKER_SWITCH_ENV, "").strip().lower() in {"0", "false", "no", "off"}:
        docker_note = f"Docker is disabled by {DOCKER_SWITCH_ENV}"
    elif docker_available():
        return SourceChoice(Source.DOCKER, "a Docker engine answered")
    missing = local_missing()
    if missing is None:
        return SourceChoice(Source.LOCAL, "local server binaries found")
    return SourceChoice(
        None, f"no {what} for tests: {env_var} is not set, {docker_note}, and {missing}"
    )


def unavailable_action(env: Mapping[str, str]) -> Literal["fail", "skip"]:
    """``"fail"`` under CI (``CI`` set to true/1/yes), else ``"skip"``."""
    return "fail" if env.get("CI", "").strip().lower() in {"1", "true", "yes"} else "skip"


def _unavailable(message: str) -> NoReturn:
    if unavailable_action(os.environ) == "fail":
        pytest.fail(f"{message} (CI=true: a missing database is a failure)", pytrace=False)
    pytest.skip(message)


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping within ``timeout`` seconds."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not _unix_socket_accepts(host[len("unix://") :], timeout):
        # Checked by hand first: the Docker SDK leaks its socket when the connect fails.
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import docker  # type: ignore[import-untyped]

            client = docker.from_env(timeout=timeout)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # no SDK, refused, timeout, bad answer: all mean "no Docker"
            return False
        finally:
            gc.collect()  # release anything the SDK leaked while warnings are ignored


def _unix_socket_accepts(path: str, timeout: float) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def unique_database_name() -> str:
    """A name valid for PostgreSQL and MongoDB that no other test uses."""
    return f"hive_test_{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------------------------
# Session servers


@dataclass(slots=True)
class PostgresServer:
    """The session's PostgreSQL server: ``admin_dsn`` may create and drop databases."""

    admin_dsn: str
    source: Source

    def database_dsn(self, name: str) -> str:
        """Conninfo URL of database ``name`` on this server."""
        from hive_common.migrations import postgres_url

        return postgres_url(self.admin_dsn, dbname=name)


@dataclass(slots=True)
class MongoServer:
    """The session's MongoDB-compatible server; ``local`` is set when this plugin runs it."""

    uri: str
    source: Source
    local: LocalMongo | None = field(default=None, repr=False)

    @property
    def controllable(self) -> bool:
        """Whether :meth:`stop` / :meth:`start` are possible."""
        return self.local is not None

    def stop(self) -> None:
        """Stop the server (simulated outage); its data and port are kept."""
        self._local().stop()

    def start(self) -> None:
        """Start it again on the same port with the same data; waits until it answers."""
        self._local().start()

    @property
    def is_running(self) -> bool:
        """Whether the server process is up (always True for servers we do not control)."""
        return self.local.is_running if self.local is not None else True

    def _local(self) -> LocalMongo:
        if self.local is None:
            raise RuntimeError(f"the MongoDB server from {self.source.value} cannot be controlled")
        return self.local


def _local_postgres_missing() -> str | None:
    from hive_common.localdb import POSTGRES_MISSING_HINT, find_postgres_bin_dir

    return None if find_postgres_bin_dir() is not None else POSTGRES_MISSING_HINT


def _local_mongo_missing() -> str | None:
    from hive_common.localdb import MONGO_MISSING_HINT, find_mongo_server

    return None if find_mongo_server() is not None else MONGO_MISSING_HINT


@pytest.fixture(scope="session")
def hive_docker_available() -> bool:
    """Whether a Docker engine answers (probed once, only if a source decision needs it)."""
    return docker_engine_answers()


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module docstring for the source order)."""
    choice = choose_source(
        what="PostgreSQL server",
        env_var=POSTGRES_DSN_ENV,
        env=os.environ,
        docker_available=lambda: bool(request.getfixturevalue("hive_docker_available")),
        local_missing=_local_postgres_missing,
    )
    if choice.source is Source.ENV:
        yield PostgresServer(admin_dsn=os.environ[POSTGRES_DSN_ENV].strip(), source=Source.ENV)
    elif choice.source is Source.DOCKER:
        from testcontainers.community.postgres import PostgresContainer

        image = os.environ.get(POSTGRES_IMAGE_ENV, DEFAULT_POSTGRES_IMAGE)
        with PostgresContainer(image, driver=None) as container:
            yield PostgresServer(admin_dsn=container.get_connection_url(), source=Source.DOCKER)
    elif choice.source is Source.LOCAL:
        from hive_common.localdb import LocalPostgres, LocalServerError

        local: LocalPostgres | None = None
        try:
            local = LocalPostgres()
            local.start()
        except LocalServerError as exc:
            if local is not None:
                local.close()
            pytest.fail(f"local PostgreSQL for tests failed to start: {exc}", pytrace=False)
        try:
            yield PostgresServer(admin_dsn=local.dsn, source=Source.LOCAL)
        finally:
            local.close()
    else:
        _unavailable(choice.reason)


@pytest.fixture(scope="session")
def mongo_server_info(request: pytest.FixtureRequest) -> Iterator[MongoServer]:
    """The session's MongoDB-compatible server (see the module docstring for the order)."""
    choice = choose_source(
        what="MongoDB-compatible server",
        env_var=MONGO_URI_ENV,
        env=os.environ,
        docker_available=lambda: bool(request.getfixturevalue("hive_docker_available")),
        local_missing=_local_mongo_missing,
    )
    if choice.source is Source.ENV:
        yield MongoServer(uri=os.environ[MONGO_URI_ENV].strip(), source=Source.ENV)
    elif choice.source is Source.DOCKER:
        from testcontainers.community.mongodb import MongoDbContainer

        image = os.environ.get(MONGO_IMAGE_ENV, DEFAULT_MONGO_IMAGE)
        with MongoDbContainer(image) as container:
            yield MongoServer(uri=container.get_connection_url(), source=Source.DOCKER)
    elif choice.source is Source.LOCAL:
        from hive_common.localdb import LocalMongo, LocalServerError

        local: LocalMongo | None = None
        try:
            local = LocalMongo()
            local.start()
        except LocalServerError as exc:
            if local is not None:
                local.close()
            pytest.fail(f"local MongoDB server for tests failed to start: {exc}", pytrace=False)
        try:
            yield MongoServer(uri=local.uri, source=Source.LOCAL, local=local)
        finally:
            local.close()
    else:
        _unavailable(choice.reason)


@pytest.fixture(scope="session")
def mongo_uri(mongo_server_info: MongoServer) -> str:
    """``mongodb://`` URI of the session's server (pair it with ``mongo_database_name``)."""
    return mongo_server_info.uri


@pytest.fixture
def mongo_server(mongo_server_info: MongoServer) -> Iterator[MongoServer]:
    """The MongoDB server as something the test may stop and start; running again afterwards."""
    if not mongo_server_info.controllable:
        _unavailable(
            f"this test stops and starts MongoDB, which is only possible with a server started "
            f"from local binaries, not one from {mongo_server_info.source.value}; unset "
            f"{MONGO_URI_ENV} and set {DOCKER_SWITCH_ENV}=0 to run it"
        )
    try:
        yield mongo_server_info
    finally:
        mongo_server_info.start()


# --------------------------------------------------------------------------------------------
# Per-test / per-module databases


@contextlib.contextmanager
def temporary_postgres_database(server: PostgresServer) -> Iterator[str]:
    """Create a uniquely named database, yield its conninfo URL, drop it on exit."""
    import psycopg
    from psycopg import sql

    name = unique_database_name()
    with psycopg.connect(server.admin_dsn, autocommit=True, connect_timeout=10) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.database_dsn(name)
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True, connect_timeout=10) as admin:
            # FORCE: the code under test may still hold pooled connections.
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def temporary_mongo_database(server: MongoServer) -> Iterator[str]:
    """Yield a unique MongoDB database name; drop that database on exit."""
    from pymongo import MongoClient

    name = unique_database_name()
    try:
        yield name
    finally:
        if server.local is not None and not server.local.is_running:
            server.local.start()
        client: MongoClient[dict[str, object]] = MongoClient(
            server.uri, serverSelectionTimeoutMS=10_000
        )
        try:
            client.drop_database(name)
        finally:
            client.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """Conninfo URL of a fresh, empty PostgreSQL database for this test only."""
    with temporary_postgres_database(postgres_server) as dsn:
        yield dsn


@pytest.fixture
def mongo_database_name(mongo_server_info: MongoServer) -> Iterator[str]:
    """A MongoDB database name no other test uses; the database is dropped afterwards."""
    with temporary_mongo_database(mongo_server_info) as name:
        yield name


@pytest.fixture(scope="module")
def module_mongo_database_name(mongo_server_info: MongoServer) -> Iterator[str]:
    """Like ``mongo_database_name`` but shared by the tests of one module."""
    with temporary_mongo_database(mongo_server_info) as name:
        yield name
