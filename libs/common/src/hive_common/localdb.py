"""Throwaway local database servers started from binaries on this machine.

Used by the test plugin (``hive_testsupport.databases``) when neither environment DSNs nor
a Docker engine are available, and by the no-Docker development stack (``make dev``).

* :class:`LocalPostgres` runs ``initdb`` + ``postgres`` (PostgreSQL 13 or newer) in its own
  data directory, listening on 127.0.0.1 and a unix socket inside that directory. PostgreSQL
  refuses to run as root, so when we are root the server runs as an unprivileged OS user
  (``$HIVE_PG_OS_USER``, default ``nobody``).
* :class:`LocalMongo` runs ``mongod`` if it is on ``PATH``, else FerretDB (v1) with its
  SQLite backend, or its PostgreSQL backend when given a database URL (as the dev stack
  does). It can be stopped and started again on the same port with the same data, which
  outage tests rely on.

Servers are plain child processes: :meth:`stop` ends them, :meth:`close` also removes a
temporary data directory, and every server still running when the interpreter exits is stopped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psycopg
from psycopg import sql
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from hive_common._exit import StopAtExit

__all__ = [
    "LocalMongo",
    "LocalPostgres",
    "LocalServerError",
    "ServerBinariesNotFound",
    "ServerStartError",
    "ephemeral_port_range",
    "find_ferretdb",
    "find_mongo_server",
    "find_postgres_bin_dir",
    "free_port",
    "port_is_free",
    "quiet_port",
]

FERRETDB_GOGC = "400"
# The PostgreSQL database FerretDB keeps its documents in, beside the services' ones.
FERRETDB_DATABASE = "ferretdb"

POSTGRES_MISSING_HINT = (
    "PostgreSQL server binaries (initdb, postgres) not found on PATH, in $HIVE_PG_BIN_DIR or in "
    "/usr/lib/postgresql/*/bin; install postgresql-15 (Debian: apt-get install postgresql-15, "
    "or run scripts/install-tools.sh)"
)
MONGO_MISSING_HINT = (
    "no MongoDB-compatible server found: neither mongod nor ferretdb on PATH, in "
    "$HIVE_FERRETDB_BIN or in ~/.cache/hive/bin/ferretdb; run scripts/install-tools.sh "
    "(builds FerretDB v1.24.2) or install mongod"
)


class LocalServerError(RuntimeError):
    """A local database server could not be provided."""


class ServerBinariesNotFound(LocalServerError):
    """The server binaries are not installed; the message says what to install."""


class ServerStartError(LocalServerError):
    """The server binaries exist but the server did not become ready; includes its log tail."""


# --------------------------------------------------------------------------------------------
# Finding binaries


# Where Debian/Ubuntu packages put the server binaries, one directory per major version.
DEBIAN_POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_postgres_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or ``None``.

    Order: ``$HIVE_PG_BIN_DIR``, the directory of ``initdb`` found on ``PATH`` (symlinks
    resolved, since Debian links them from /usr/lib/postgresql/N/bin), then the newest
    ``/usr/lib/postgresql/*/bin``.
    """
    candidates: list[Path] = []
    explicit = os.environ.get("HIVE_PG_BIN_DIR")
    if explicit:
        candidates.append(Path(explicit))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
        candidates.append(Path(on_path).parent)

    def version_key(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", path)
        return tuple(int(g) for g in match.groups() if g) if match else (0,)

    candidates.extend(
        Path(p) for p in sorted(glob.glob(DEBIAN_POSTGRES_BIN_GLOB), key=version_key)[::-1]
    )
    for candidate in candidates:
        if _is_executable(candidate / "initdb") and _is_executable(candidate / "postgres"):
            return candidate
    return None


def find_ferretdb() -> Path | None:
    """A FerretDB binary: ``PATH``, then ``$HIVE_FERRETDB_BIN``, then ~/.cache/hive/bin."""
    on_path = shutil.which("ferretdb")
    if on_path:
        return Path(on_path)
    explicit = os.environ.get("HIVE_FERRETDB_BIN")
    if explicit and _is_executable(Path(explicit)):
        return Path(explicit)
    cached = Path.home() / ".cache" / "hive" / "bin" / "ferretdb"
    if _is_executable(cached):
        return cached
    return None


def find_mongo_server() -> tuple[str, Path] | None:
    """``("mongod", path)`` if mongod is on ``PATH``, else ``("ferretdb", path)``, else None."""
    mongod = shutil.which("mongod")
    if mongod:
        return ("mongod", Path(mongod))
    ferretdb = find_ferretdb()
    if ferretdb is not None:
        return ("ferretdb", ferretdb)
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (and for port 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_handed_out: set[int] = set()


def quiet_port() -> int:
    """A free port outside the ephemeral range, so that no outgoing connection (of this or
    another process) can take it between now and the moment a process binds it (a port
    from :func:`free_port` can be: a service of a second stack failed to bind one)."""
    low, high = ephemeral_port_range()
    candidates = range(20_000, low) if low > 21_000 else range(high + 1, 65_536)
    for _ in range(1000):
        port = random.choice(candidates)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    return free_port()


# --------------------------------------------------------------------------------------------
# Process management shared by both servers

_live_servers: StopAtExit[_LocalServer] = StopAtExit(lambda server: server.close())


class _LocalServer(ABC):
    """A database server run as a child process with a data directory and a log file."""

    name: str = "server"
    # Signal that makes the server shut down quickly but cleanly.
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(
        self,
        *,
        data_dir: Path | None,
        port: int,
        startup_timeout: float,
        host: str = "127.0.0.1",
    ) -> None:
        self._own_base_dir = data_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix=f"hive-{self.name}-"))
            if data_dir is None
            else data_dir.resolve()
        )
        self.host = host
        self._fixed_port = port != 0
        self._port = port
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._closed = False
        _live_servers.add(self)

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (chosen on first start when 0 was asked for, then kept)."""
        if self._port == 0:
            raise LocalServerError(f"{self.name} has not been started yet")
        return self._port

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr."""
        return self.base_dir / f"{self.name}.log"

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive (not whether it accepts connections)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts connections; no-op when running.

        Restarting keeps the port and the data. When the port was chosen automatically and
        another process grabbed it before the first start, a new port is tried.
        """
        if self._closed:
            raise LocalServerError(f"{self.name} was closed")
        if self.is_running:
            return
        self._prepare()
        attempts = 1 if (self._fixed_port or self._port != 0) else 3
        for attempt in range(attempts):
            if self._port == 0 or (attempt > 0 and not self._fixed_port):
                self._port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return
            except ServerStartError as exc:
                port_taken = "address already in use" in str(exc).lower()
                if not port_taken or attempt == attempts - 1:
                    raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (data is kept); no-op when not running."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(self.stop_signal)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and remove its data directory if this object created it."""
        self.stop()
        self._closed = True
        _live_servers.discard(self)
        if self._own_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for subclasses -----------------------------------------------------------------

    @abstractmethod
    def _prepare(self) -> None:
        """Create the data directory (idempotent)."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The server command line for the current port."""

    @abstractmethod
    def _ping(self) -> bool:
        """Whether the server accepts connections now."""

    def _run_as(self) -> pwd.struct_passwd | None:
        """The OS user to run the server as, or None for the current user."""
        return None

    def _environment(self) -> dict[str, str]:
        """Variables the server needs beyond ours (the locale is always C)."""
        return {}

    # -- internals ----------------------------------------------------------------------

    def _spawn_and_wait(self) -> None:
        command = self._command()
        user = self._run_as()
        # When our main thread dies without running atexit (SIGKILL), the kernel stops the
        # server too, so no orphan keeps the port. Only from the main thread: the parent-death
        # signal fires when the *thread* that forked exits.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            command = [setpriv, f"--pdeathsig={self.stop_signal.name}", "--", *command]
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- starting {self.name}: {' '.join(command)}\n".encode())
        self._log.flush()
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", **self._environment()}
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        except OSError as exc:
            self.stop()
            raise ServerStartError(f"could not run {command[0]}: {exc}") from exc
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise ServerStartError(
                    f"{self.name} exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            if self._ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} did not accept connections on {self.host}:{self._port} within "
                    f"{self.startup_timeout:.0f}s; log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# PostgreSQL


class LocalPostgres(_LocalServer):
    """A PostgreSQL server owned by this process.

    ``data_dir=None`` makes a temporary cluster removed by :meth:`close`; a given ``data_dir``
    is initialised on first use and kept (its parents must be searchable by the server's OS
    user). ``durable=False`` turns off fsync and friends: fine for tests and a dev stack,
    never for data you care about. Authentication is ``trust`` for the ``postgres`` superuser
    on loopback and the unix socket.
    """

    name = "postgres"
    # SIGINT = "fast shutdown": does not wait for clients to disconnect.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        port: int = 0,
        durable: bool = False,
        os_user: str | None = None,
        bin_dir: Path | None = None,
        startup_timeout: float = 60.0,
        max_connections: int = 300,
    ) -> None:
        found = bin_dir or find_postgres_bin_dir()
        if found is None:
            raise ServerBinariesNotFound(POSTGRES_MISSING_HINT)
        self.bin_dir = found
        self.durable = durable
        self.max_connections = max_connections
        self._os_user = os_user
        super().__init__(data_dir=data_dir, port=port, startup_timeout=startup_timeout)

    @property
    def cluster_dir(self) -> Path:
        """The PostgreSQL data directory (``PGDATA``)."""
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket."""
        return self.base_dir / "run"

    @property
    def dsn(self) -> str:
        """Superuser conninfo URL for the ``postgres`` maintenance database."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """Superuser conninfo URL for ``database`` on this server."""
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def ensure_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; return its conninfo URL."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def _run_as(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        name = self._os_user or os.environ.get("HIVE_PG_OS_USER") or "nobody"
        try:
            return pwd.getpwnam(name)
        except KeyError as exc:
            raise ServerStartError(
                f"PostgreSQL cannot run as root and OS user {name!r} does not exist; "
                "set HIVE_PG_OS_USER to an unprivileged user"
            ) from exc

    def _prepare(self) -> None:
        user = self._run_as()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if user is not None:
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._check_searchable_by(user)
        if (self.cluster_dir / "PG_VERSION").exists():
            return
        command = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.cluster_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ]
        if not self.durable:
            command.append("--no-sync")
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            cwd=self.base_dir,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServerStartError(f"initdb failed (exit {result.returncode}):\n{output}")

    def _check_searchable_by(self, user: pwd.struct_passwd) -> None:
        # The server chdirs into its data directory: every ancestor must be searchable.
        for parent in self.base_dir.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001 and parent.stat().st_uid != user.pw_uid:
                raise ServerStartError(
                    f"{parent} is not searchable by OS user {user.pw_name!r} that runs "
                    f"PostgreSQL; put the data directory elsewhere (e.g. under /tmp)"
                )

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self._port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
            "logging_collector": "off",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [str(self.bin_dir / "postgres"), "-D", str(self.cluster_dir)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _ping(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


# --------------------------------------------------------------------------------------------
# MongoDB-compatible server


class LocalMongo(_LocalServer):
    """A MongoDB-compatible server: ``mongod`` if installed, else FerretDB.

    FerretDB stores its documents in SQLite files in the data directory, or, given
    ``postgresql_url`` (a database of its own), in PostgreSQL. Its SQLite backend filters
    every query in FerretDB itself, reading the whole collection: finding one ticket's
    audit documents took seconds once a dev stack had run a few thousand tickets. The
    PostgreSQL backend hands simple equality filters to PostgreSQL. A data directory that
    already holds SQLite data keeps SQLite (its documents stay visible).

    :meth:`stop` then :meth:`start` brings the same server back on the same port with the
    same data. ``data_dir=None`` makes a temporary directory removed by :meth:`close`.
    """

    name = "mongo"

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        port: int = 0,
        startup_timeout: float = 60.0,
        server: tuple[str, Path] | None = None,
        postgresql_url: str | None = None,
    ) -> None:
        found = server or find_mongo_server()
        if found is None:
            raise ServerBinariesNotFound(MONGO_MISSING_HINT)
        self.kind, self.binary = found
        super().__init__(data_dir=data_dir, port=port, startup_timeout=startup_timeout)
        has_sqlite_data = any((self.base_dir / "db").glob("*.sqlite"))
        self.postgresql_url = None if has_sqlite_data else postgresql_url

    @property
    def uri(self) -> str:
        """``mongodb://`` URI of the server (no database, no credentials)."""
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def _prepare(self) -> None:
        (self.base_dir / "db").mkdir(parents=True, exist_ok=True)
        (self.base_dir / "state").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        if self.kind == "mongod":
            return [
                str(self.binary),
                "--dbpath",
                str(self.base_dir / "db"),
                "--bind_ip",
                self.host,
                "--port",
                str(self._port),
                "--nounixsocket",
                "--quiet",
            ]
        backend = (
            ["--handler=sqlite", f"--sqlite-url=file:{self.base_dir / 'db'}/"]
            if self.postgresql_url is None
            else ["--handler=postgresql", f"--postgresql-url={self.postgresql_url}"]
        )
        return [
            str(self.binary),
            *backend,
            f"--state-dir={self.base_dir / 'state'}",
            f"--listen-addr={self.host}:{self._port}",
            # "-" disables the debug/metrics HTTP listener (default 127.0.0.1:8088), which
            # would collide between several instances.
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=warn",
        ]

    def _environment(self) -> dict[str, str]:
        if self.kind == "mongod":
            return {}
        # Go collects each time the heap doubles (GOGC=100); FerretDB's live heap is small,
        # so under the audit relay's inserts it collected all the time (~11 % of its CPU).
        # At 400 it used 12-18 % less CPU per audit document (bench/JOURNAL.md, session
        # 9). An explicit GOGC wins.
        return {"GOGC": os.environ.get("GOGC", FERRETDB_GOGC)}

    def _ping(self) -> bool:
        client: MongoClient[dict[str, object]] = MongoClient(
            self.host,
            self._port,
            directConnection=True,
            serverSelectionTimeoutMS=500,
            connectTimeoutMS=500,
        )
        try:
            client.admin.command("ping")
        except PyMongoError:
            return False
        finally:
            client.close()
        return True


# --------------------------------------------------------------------------------------------
# Command line: `python -m hive_common.localdb` keeps both servers up for a dev stack.


def main(argv: list[str] | None = None) -> int:
    """Start PostgreSQL and a MongoDB-compatible server; print their URLs; stop on a signal."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m hive_common.localdb",
        description="Run local PostgreSQL and MongoDB-compatible servers until interrupted.",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(".hive/db"))
    parser.add_argument("--postgres-port", type=int, default=0)
    parser.add_argument("--mongo-port", type=int, default=0)
    parser.add_argument(
        "--database", action="append", default=[], help="PostgreSQL database to ensure (repeat)"
    )
    parser.add_argument(
        "--env-file", type=Path, help="also write HIVE_DEV_* variables (KEY=value) to this file"
    )
    args = parser.parse_args(argv)

    data_dir: Path = args.data_dir.resolve()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    postgres = LocalPostgres(data_dir=data_dir / "postgres", port=args.postgres_port)
    mongo: LocalMongo | None = None
    try:
        postgres.start()
        mongo = LocalMongo(
            data_dir=data_dir / "mongo",
            port=args.mongo_port,
            postgresql_url=postgres.ensure_database(FERRETDB_DATABASE),
        )
        mongo.start()
        urls = {name: postgres.ensure_database(name) for name in args.database}
        env = {"HIVE_DEV_POSTGRES_ADMIN_DSN": postgres.dsn, "HIVE_DEV_MONGO_URI": mongo.uri}
        env |= {f"HIVE_DEV_POSTGRES_{name.upper()}_DSN": url for name, url in urls.items()}
        if args.env_file is not None:
            args.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        print(json.dumps(env), flush=True)
        stop.wait()
    except LocalServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if mongo is not None:
            mongo.close()
        postgres.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
