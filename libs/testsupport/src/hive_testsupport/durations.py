"""Test cases for a settings class's duration bounds (every service's settings tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from hive_common.config import DURATION_SUFFIXES

__all__ = ["at_their_maximums", "beyond_maximum_cases"]

_NOT_AN_INTEGER = "Input should be a valid integer, unable to parse string as an integer"
_NOT_FINITE = "Input should be a finite number"


def beyond_maximum_cases(
    settings: type[BaseSettings], maximums: Mapping[str, float], env_prefix: str
) -> list[Any]:
    """For each duration (field name -> its largest value): ``inf``, a huge number and one
    more than its maximum, each as ``({NAME: value}, the line naming its variable)``."""
    cases = []
    for name, maximum in maximums.items():
        is_int = settings.model_fields[name].annotation is int
        not_finite = _NOT_AN_INTEGER if is_int else _NOT_FINITE
        too_big = f"Input should be less than or equal to {maximum}"
        for value, message in (
            ("inf", not_finite),
            ("1e300", not_finite if is_int else too_big),
            (str(maximum + 1), too_big),
        ):
            line = f"{env_prefix}{name.upper()}: {message}"
            cases.append(pytest.param({name.upper(): value}, line, id=f"{name}={value}"))
    return cases


def at_their_maximums(
    settings: type[BaseSettings],
    maximums: Mapping[str, float],
    env_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> BaseSettings:
    """``settings`` built with every duration at its maximum (checking ``maximums`` names
    them all: a new one cannot be forgotten)."""
    durations = {n for n in settings.model_fields if n.endswith(DURATION_SUFFIXES)}
    assert set(maximums) == durations
    for name, maximum in maximums.items():
        monkeypatch.setenv(f"{env_prefix}{name.upper()}", str(maximum))
    built = settings()
    for name, maximum in maximums.items():
        assert getattr(built, name) == maximum
    return built
