"""Where test databases come from: the pure decisions, without Docker or servers."""

from __future__ import annotations

from typing import Generic, TypeVar

import pytest

from hive_testsupport.databases import (
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
