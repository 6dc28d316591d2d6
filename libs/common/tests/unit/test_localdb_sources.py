"""Where test databases come from: the pure decisions, without Docker or servers."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from hive_common import localdb
from hive_common.testing.databases import (
    Source,
    choose_source,
    unavailable_action,
    unique_database_name,
)

T = TypeVar("T")


class Probe(Generic[T]):
    """Records whether a probe was called and answers a fixed value."""

    def __init__(self, answer: T) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> T:
        self.calls += 1
        return self.answer


def choose(
    env: dict[str, str], docker: Probe[bool], local: Probe[str | None]
) -> tuple[Source | None, str]:
    choice = choose_source(
        what="PostgreSQL server",
        env_var="HIVE_TEST_POSTGRES_DSN",
        env=env,
        docker_available=docker,
        local_missing=local,
    )
    return choice.source, choice.reason


def test_env_dsn_wins_without_probing_docker_or_local() -> None:
    docker, local = Probe(True), Probe[str | None](None)
    source, _ = choose({"HIVE_TEST_POSTGRES_DSN": "postgresql://x@h/db"}, docker, local)
    assert source is Source.ENV
    assert (docker.calls, local.calls) == (0, 0)


def test_blank_env_dsn_is_ignored() -> None:
    docker, local = Probe(True), Probe[str | None](None)
    source, _ = choose({"HIVE_TEST_POSTGRES_DSN": "  "}, docker, local)
    assert source is Source.DOCKER


def test_docker_before_local_binaries() -> None:
    docker, local = Probe(True), Probe[str | None](None)
    source, _ = choose({}, docker, local)
    assert source is Source.DOCKER
    assert (docker.calls, local.calls) == (1, 0)


def test_local_binaries_when_docker_does_not_answer() -> None:
    docker, local = Probe(False), Probe[str | None](None)
    source, _ = choose({}, docker, local)
    assert source is Source.LOCAL
    assert (docker.calls, local.calls) == (1, 1)


def test_docker_switch_off_skips_the_probe() -> None:
    docker, local = Probe(True), Probe[str | None](None)
    source, _ = choose({"HIVE_TEST_DOCKER": "0"}, docker, local)
    assert source is Source.LOCAL
    assert docker.calls == 0


def test_nothing_available_names_every_missing_piece() -> None:
    source, reason = choose({}, Probe(False), Probe("install postgresql-15"))
    assert source is None
    assert "HIVE_TEST_POSTGRES_DSN is not set" in reason
    assert "no Docker engine answered" in reason
    assert "install postgresql-15" in reason


@pytest.mark.parametrize(
    ("ci", "action"),
    [("true", "fail"), ("TRUE", "fail"), ("1", "fail"), ("false", "skip"), ("", "skip")],
)
def test_missing_database_fails_only_under_ci(ci: str, action: str) -> None:
    assert unavailable_action({"CI": ci}) == action


def test_missing_database_skips_without_ci_variable() -> None:
    assert unavailable_action({}) == "skip"


def test_unique_database_names_are_valid_and_distinct() -> None:
    names = {unique_database_name() for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert len(name) < 63
        assert name.replace("_", "").isalnum()
        assert name == name.lower()


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
