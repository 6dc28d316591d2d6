"""Where the local database servers come from: finding PostgreSQL and MongoDB binaries."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hive_common import localdb


def _fake_binary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_postgres_bin_dir_from_explicit_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "pg" / "bin"
    _fake_binary(bin_dir / "initdb")
    _fake_binary(bin_dir / "postgres")
    monkeypatch.setenv("HIVE_PG_BIN_DIR", str(bin_dir))
    assert localdb.find_postgres_bin_dir() == bin_dir


def test_postgres_bin_dir_needs_both_initdb_and_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "pg" / "bin"
    _fake_binary(bin_dir / "initdb")
    monkeypatch.setenv("HIVE_PG_BIN_DIR", str(bin_dir))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(localdb, "DEBIAN_POSTGRES_BIN_GLOB", str(tmp_path / "none/*/bin"))
    assert localdb.find_postgres_bin_dir() is None


def test_postgres_bin_dir_follows_symlink_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "usr/lib/postgresql/15/bin"
    _fake_binary(real / "initdb")
    _fake_binary(real / "postgres")
    path_dir = tmp_path / "usr/local/bin"
    path_dir.mkdir(parents=True)
    (path_dir / "initdb").symlink_to(real / "initdb")
    monkeypatch.delenv("HIVE_PG_BIN_DIR", raising=False)
    monkeypatch.setenv("PATH", str(path_dir))
    assert localdb.find_postgres_bin_dir() == real


def test_postgres_bin_dir_prefers_newest_debian_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("9.6", "15", "13"):
        _fake_binary(tmp_path / f"postgresql/{version}/bin/initdb")
        _fake_binary(tmp_path / f"postgresql/{version}/bin/postgres")
    monkeypatch.delenv("HIVE_PG_BIN_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(localdb, "DEBIAN_POSTGRES_BIN_GLOB", str(tmp_path / "postgresql/*/bin"))
    assert localdb.find_postgres_bin_dir() == tmp_path / "postgresql/15/bin"


def test_missing_postgres_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localdb, "find_postgres_bin_dir", lambda: None)
    with pytest.raises(localdb.ServerBinariesNotFound, match=r"initdb.*install postgresql-15"):
        localdb.LocalPostgres()


def test_mongod_on_path_wins_over_ferretdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_binary(tmp_path / "bin/mongod")
    _fake_binary(tmp_path / "bin/ferretdb")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert localdb.find_mongo_server() == ("mongod", tmp_path / "bin/mongod")


def test_ferretdb_from_env_then_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIVE_FERRETDB_BIN", raising=False)
    assert localdb.find_mongo_server() is None

    cached = _fake_binary(tmp_path / "home/.cache/hive/bin/ferretdb")
    assert localdb.find_mongo_server() == ("ferretdb", cached)

    explicit = _fake_binary(tmp_path / "opt/ferretdb")
    monkeypatch.setenv("HIVE_FERRETDB_BIN", str(explicit))
    assert localdb.find_mongo_server() == ("ferretdb", explicit)


def test_missing_mongo_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localdb, "find_mongo_server", lambda: None)
    with pytest.raises(localdb.ServerBinariesNotFound, match=r"mongod.*ferretdb"):
        localdb.LocalMongo()


def test_free_port_is_bindable() -> None:
    import socket

    port = localdb.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536
