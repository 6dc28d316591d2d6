"""RegistrySettings: environment prefix, defaults and consistency checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service_registry.config import RegistrySettings


def test_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVE_REGISTRY_GRPC_PORT", "6000")
    monkeypatch.setenv("HIVE_REGISTRY_EXPIRE_AFTER_SECONDS", "90")
    monkeypatch.setenv("HIVE_TICKETS_GRPC_PORT", "7000")
    settings = RegistrySettings()
    assert settings.grpc_port == 6000
    assert settings.http_port == 8001
    assert settings.health_policy().expire_after.total_seconds() == 90


@pytest.mark.parametrize(
    "overrides",
    [
        {"expire_after_seconds": 15},  # not longer than 5 s x 3 missed
        {
            "ranking_weight_spare_capacity": 0,
            "ranking_weight_success_rate": 0,
            "ranking_weight_freshness": 0,
        },
        {"registration_secret": "short"},
        {"postgres_pool_min_size": 5, "postgres_pool_max_size": 2},
    ],
)
def test_inconsistent_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RegistrySettings(**overrides)  # type: ignore[arg-type]
