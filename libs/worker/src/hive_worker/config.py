"""Settings of the reference worker, from ``HIVE_WORKER_*`` environment variables.

Lists may be written comma-separated (``HIVE_WORKER_CAPABILITIES=python,shell``) or as
JSON; labels as ``key=value`` pairs (``HIVE_WORKER_LABELS=zone=a,tier=gpu``) or a JSON
object. Command-line flags (:mod:`hive_worker.cli`) override the environment.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Annotated, Any

from pydantic import Field, FiniteFloat, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hive_common.config import DAY, HOUR, LogFormat, normalise_log_level


def parse_list(value: object) -> object:
    """``"a, b"`` or ``'["a","b"]'`` -> ``["a", "b"]``; other values pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_labels(value: object) -> object:
    """``"k=v,k2=v2"`` or a JSON object -> ``{"k": "v", "k2": "v2"}``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    labels: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {pair!r} is not key=value")
        labels[key.strip()] = val.strip()
    return labels


StrList = Annotated[list[str], NoDecode]
StrMap = Annotated[dict[str, str], NoDecode]


class WorkerSettings(BaseSettings):
    """Everything the reference worker needs; build once and pass to :class:`Worker`."""

    model_config = SettingsConfigDict(
        env_prefix="HIVE_WORKER_",
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    # Where the services are.
    registry_target: str = "127.0.0.1:50051"
    tickets_target: str = "127.0.0.1:50052"
    registration_secret: SecretStr | None = Field(
        default=None,
        description="Credential for Register: the registry's registration secret "
        "(HIVE_REGISTRY_REGISTRATION_SECRET) or a service token.",
    )

    # Who this worker is.
    name: str = Field(default_factory=socket.gethostname, min_length=1)
    namespace: str = ""
    capabilities: StrList = Field(default_factory=list)
    labels: StrMap = Field(default_factory=dict)
    max_concurrent: int = Field(default=4, ge=1, le=10_000)
    version: str = "0.1.0"

    # Liveness and shutdown.
    heartbeat_interval_seconds: FiniteFloat | None = Field(
        default=None,
        gt=0,
        le=HOUR,
        description="None: use the interval the registry asks for. A longer one than the "
        "registry's is not used (the registry's is, with a warning): missing heartbeats "
        "makes the registry mark the worker UNHEALTHY, then remove it.",
    )
    drain_grace_seconds: FiniteFloat = Field(default=30.0, ge=0, le=DAY)
    call_timeout_seconds: FiniteFloat = Field(default=10.0, gt=0, le=HOUR)
    call_deadline_seconds: FiniteFloat = Field(default=30.0, gt=0, le=HOUR)
    reconnect_max_backoff_seconds: FiniteFloat = Field(default=5.0, gt=0, le=HOUR)

    # Built-in task types.
    sleep_max_seconds: FiniteFloat = Field(default=3600.0, ge=0, le=7 * DAY)
    shell_allow_list: StrList = Field(
        default_factory=list,
        description="Programs the shell task may run (exact argv[0]); empty disables it.",
    )
    shell_max_output_bytes: int = Field(default=64 * 1024, ge=0)
    shell_timeout_seconds: FiniteFloat = Field(default=300.0, gt=0, le=7 * DAY)
    http_get_timeout_seconds: FiniteFloat = Field(default=10.0, gt=0, le=HOUR)
    http_get_max_timeout_seconds: FiniteFloat = Field(default=60.0, gt=0, le=HOUR)
    http_get_max_body_bytes: int = Field(default=64 * 1024, ge=0)
    http_get_allow_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="Internal networks (CIDRs, or single addresses) http_get may reach "
        "besides public addresses; empty: none (no loopback, link-local, private ...).",
    )

    log_level: str = "INFO"
    log_format: LogFormat = "auto"

    @field_validator("capabilities", "shell_allow_list", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        return parse_list(value)

    @field_validator("http_get_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        entries = parse_list(value)
        for entry in entries if isinstance(entries, list) else ():
            try:
                ipaddress.ip_network(entry)
            except ValueError as error:
                # "10.0.0.1/8": say which network was probably meant.
                if isinstance(entry, str) and "host bits set" in str(error):
                    network = ipaddress.ip_network(entry, strict=False)
                    raise ValueError(
                        f"{entry!r} has host bits set; the network is {network}"
                    ) from None
        return entries

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: object) -> object:
        return parse_labels(value)

    @field_validator("capabilities", "shell_allow_list")
    @classmethod
    def _unique_non_empty(cls, value: list[str]) -> list[str]:
        cleaned = [item.strip() for item in value]
        if any(not item for item in cleaned):
            raise ValueError("entries must not be empty")
        return list(dict.fromkeys(cleaned))

    @field_validator("capabilities")
    @classmethod
    def _at_least_one_capability(cls, value: list[str]) -> list[str]:
        # The registry refuses to register a worker without any (nothing could be
        # assigned to it): say so here, before any call, naming the setting.
        if not value:
            raise ValueError(
                "at least one capability is required (the registry refuses a worker "
                "without any): set --capabilities or HIVE_WORKER_CAPABILITIES, "
                "e.g. python,shell"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        # WARN too, as the services take it (compose passes one level to all: a worker
        # refusing it restarted for ever while the services ran).
        return normalise_log_level(value)


__all__ = ["WorkerSettings", "parse_labels", "parse_list"]
