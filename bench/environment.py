"""The databases a run uses and a description of the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pymongo import MongoClient

from bench import cpu
from hive_common.localdb import LocalMongo, LocalPostgres, find_ferretdb


@dataclass(slots=True)
class Databases:
    """A PostgreSQL server we may create databases on, and a MongoDB-compatible server."""

    postgres_admin_dsn: str
    mongo_uri: str
    provisioned: bool
    durable: bool | None
    # CPU-seconds sources of the servers we started (none for servers given by URL).
    cpu_sources: dict[str, Callable[[], float]] = field(default_factory=dict)

    def fresh_database(self, name: str) -> str:
        """(Re)create database ``name`` empty; return its conninfo URL."""
        with psycopg.connect(self.postgres_admin_dsn, autocommit=True, connect_timeout=10) as conn:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        return _with_database(self.postgres_admin_dsn, name)

    def postgres_version(self) -> str:
        with psycopg.connect(self.postgres_admin_dsn, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            settings = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'shared_buffers', 'max_connections')"
            ).fetchall()
        configured = ", ".join(f"{name}={value}" for name, value in settings)
        return f"PostgreSQL {row[0] if row else '?'} ({configured})"

    def mongo_version(self) -> str:
        client: MongoClient[dict[str, Any]] = MongoClient(
            self.mongo_uri, serverSelectionTimeoutMS=5000
        )
        try:
            info = client.admin.command("buildInfo")
        finally:
            client.close()
        if "ferretdbVersion" in info:
            return (
                f"FerretDB {info['ferretdbVersion']} (MongoDB wire version {info.get('version')})"
            )
        return f"MongoDB {info.get('version')}"


def _with_database(dsn: str, name: str) -> str:
    # postgresql://user@host:port/db?x -> same URL with another database.
    match = re.match(r"^(postgres(?:ql)?://[^/]*)(/[^?]*)?(\?.*)?$", dsn)
    if not match:
        raise ValueError("HIVE_BENCH_POSTGRES_DSN must be a postgresql:// URL")
    return f"{match.group(1)}/{name}{match.group(3) or ''}"


@contextlib.contextmanager
def databases(*, durable: bool) -> Iterator[Databases]:
    """Servers from HIVE_BENCH_POSTGRES_DSN / HIVE_BENCH_MONGO_URI, else local throwaway ones.

    The PostgreSQL role must be allowed to create databases (each phase gets fresh ones).
    """
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("HIVE_BENCH_POSTGRES_DSN")
        uri = os.environ.get("HIVE_BENCH_MONGO_URI")
        provisioned = not (dsn and uri)
        sources: dict[str, Callable[[], float]] = {}
        if not dsn:
            # Under /tmp: the server runs as an unprivileged user that must reach its files.
            postgres = LocalPostgres(durable=durable, max_connections=400)
            stack.callback(postgres.close)
            postgres.start()
            dsn = postgres.dsn
            pid_file = postgres.cluster_dir / "postmaster.pid"
            postmaster = int(pid_file.read_text().split()[0])
            sources["postgresql"] = lambda: cpu.postgres_seconds(postmaster)
        if not uri:
            mongo = LocalMongo()
            stack.callback(mongo.close)
            mongo.start()
            uri = mongo.uri
            fragment = str(mongo.base_dir)
            sources[mongo.kind] = lambda: sum(
                cpu.process_seconds(pid) for pid in cpu.pids_with_argument(fragment)
            )
        yield Databases(
            postgres_admin_dsn=dsn,
            mongo_uri=uri,
            provisioned=provisioned,
            durable=durable if "HIVE_BENCH_POSTGRES_DSN" not in os.environ else None,
            cpu_sources=sources,
        )


def describe_machine(dbs: Databases) -> dict[str, Any]:
    """nproc, memory, CPU model, kernel, Python, database versions."""
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    free = _run(["free", "-h"])
    mem_line = next((ln for ln in free.splitlines() if ln.startswith("Mem:")), free)
    ferret = find_ferretdb()
    return {
        "nproc": _run(["nproc"]).strip(),
        "cpu_model": cpu_model,
        "memory (free -h)": " ".join(mem_line.split()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "postgresql": dbs.postgres_version(),
        "mongodb_server": dbs.mongo_version(),
        "ferretdb_binary": str(ferret) if ferret else "none",
        "databases": "provisioned by the run (hive_common.localdb)"
        if dbs.provisioned
        else "from HIVE_BENCH_POSTGRES_DSN / HIVE_BENCH_MONGO_URI",
    }


def load_average() -> str:
    """The 1/5/15-minute load averages now."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
